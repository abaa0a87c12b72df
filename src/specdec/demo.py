"""``specdec demo``: plain vs speculative decoding on a real model, side by side.

By default SmolLM2-135M-Instruct (``--target smollm2``) answers a short conversation, writes a
summary and rewrites an email, once with plain decoding and once with speculative decoding and
the best drafter it has (``--drafter auto``). The speculative reply streams with each token
coloured by where it came from (accepted draft / recovered / bonus / target); a table then shows
tokens/s, speed-up, acceptance, mean accepted length and whether the two texts are identical.
A target without a chat template (``--target demo-target``, the small code pair) completes
held-out code instead.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from rich.console import Console

from specdec.commands.chat import ReplyPrinter, color_system_of, legend
from specdec.commands.common import add_model_arguments
from specdec.engine import SpecStats, SpeculativeGenerator
from specdec.engine.generator import GenerationStream

Messages = list[dict[str, str]]

# Written for this demo. The rewrite and the summary quote their input, where drafting from the
# context (n-gram lookup) pays most; the conversation is a second turn.
CHAT_PROMPTS: list[tuple[str, Messages]] = [
    (
        "conversation",
        [
            {"role": "user", "content": "I want to start running. How often should I go in the first month?"},
            {
                "role": "assistant",
                "content": "Three short runs a week is a good start, with a rest day between them.",
            },
            {"role": "user", "content": "And how long should each run be?"},
        ],
    ),
    (
        "summary",
        [
            {
                "role": "user",
                "content": "Summarize this paragraph in two sentences.\n\n"
                "The town library reopened on Monday after a year of repairs. The old roof leaked every "
                "winter, so the council replaced it and added solar panels that now power the reading "
                "rooms. The children's section doubled in size, and a new cafe sits by the entrance. "
                "Opening hours are longer too: the library now stays open until eight in the evening "
                "on weekdays.",
            }
        ],
    ),
    (
        "rewrite",
        [
            {
                "role": "user",
                "content": "Rewrite this email so that it sounds polite and professional.\n\n"
                "hey, the report you sent is late again and half the numbers are wrong. fix it by "
                "friday or i will tell the manager. also stop sending me files without a subject line.",
            }
        ],
    ),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.set_defaults(target="smollm2", drafter="auto")
    p.add_argument("--num-prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--prompt", action="append", default=None, help="your own prompt (repeatable)")
    p.add_argument("--no-color", action="store_true", help="plain text, no colours")


@dataclass
class Totals:
    tokens: int = 0
    seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    committed: int = 0

    def add(self, stats: SpecStats) -> None:
        self.tokens += stats.new_tokens
        self.seconds += stats.total_s - stats.prefill_s
        self.drafted += stats.draft_positions  # acceptance per drafted position (a tree: per depth)
        self.accepted += stats.accepted_tokens
        self.steps += stats.verify_steps
        self.committed += stats.committed_tokens

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def code_prompts(n: int) -> list[tuple[str, str]]:
    """The last lines of held-out code files: prompts for the demo pair, which has no chat template."""
    from specdec.bench.tasks import code_prompts as openings
    from specdec.bench.tasks import held_out_files

    return [
        (name, "".join(text.splitlines(keepends=True)[-12:])) for name, text in openings(held_out_files(), n)
    ]


def run(args: argparse.Namespace) -> int:
    from specdec.cli import UserError
    from specdec.commands.common import build_generator

    spec = build_generator(args)
    if spec.drafter is None:
        raise UserError("the demo compares against speculative decoding: pick a drafter other than none")
    tokenizer = spec.target.tokenizer
    if tokenizer is None:
        raise UserError("the demo needs a target with a tokenizer")
    chat = tokenizer.chat_template is not None
    plain = SpeculativeGenerator(spec.target)
    console = Console(file=sys.stdout, no_color=args.no_color or None, highlight=False)
    colors = color_system_of(console)
    bold = "bold" if colors else ""
    if args.prompt:
        prompts: list[tuple[str, Messages | str]] = [
            ("your prompt", [{"role": "user", "content": p}] if chat else p) for p in args.prompt
        ]
    elif chat:
        prompts = list(CHAT_PROMPTS[: args.num_prompts])
    else:
        prompts = list(code_prompts(args.num_prompts))

    def answer(gen: SpeculativeGenerator, prompt: Messages | str, max_new_tokens: int) -> GenerationStream:
        if isinstance(prompt, list):
            return gen.chat_stream(prompt, max_new_tokens=max_new_tokens)
        return gen.stream(prompt, max_new_tokens=max_new_tokens)

    for gen in (plain, spec):  # warm-up: first calls pay one-off allocation costs
        for _ in answer(gen, prompts[0][1], 8):
            pass

    totals = {"plain": Totals(), "speculative": Totals()}
    identical = 0
    console.print(
        f"specdec demo: {spec.target.path.name} ({spec.target.config.num_parameters / 1e6:.0f}M parameters, "
        f"{str(spec.target.dtype).replace('torch.', '')}, {torch.get_num_threads()} thread(s)), "
        f"drafter {type(spec.drafter).__name__}, greedy",
        style=bold, markup=False, highlight=False,
    )  # fmt: skip
    if colors:
        console.print(legend())
    for name, prompt in prompts:
        console.print(f"\n--- {name} ---", style=bold, markup=False)
        if isinstance(prompt, list):
            for message in prompt:
                console.print(f"{message['role']}: {message['content']}", style="dim", markup=False)
            console.print("assistant: ", style="dim", end="", markup=False)
        else:
            console.print(prompt, style="dim", end="", markup=False)
        reference = answer(plain, prompt, args.max_new_tokens)
        for _ in reference:
            pass
        totals["plain"].add(reference.stats)
        printer = ReplyPrinter(sys.stdout, tokenizer, colors)
        stream = answer(spec, prompt, args.max_new_tokens)
        for chunk in stream:
            printer.add(chunk)
        totals["speculative"].add(stream.stats)
        same = stream.output.token_ids == reference.output.token_ids
        identical += same
        s = stream.stats
        console.print(
            f"\n[plain {reference.stats.tokens_per_s:.0f} tok/s | speculative {s.tokens_per_s:.0f} tok/s | "
            f"mean accepted length {s.mean_accepted_length:.2f} | identical text: {'yes' if same else 'NO'}]",
            style="dim", markup=False,
        )  # fmt: skip

    base = totals["plain"].tokens_per_s
    console.print(
        f"\n{'method':<13} {'tokens/s':>9} {'speed-up':>9} {'acceptance':>11} {'mean acc. len':>14} {'identical':>10}",
        style=bold, markup=False,
    )  # fmt: skip
    for label, t in totals.items():
        acceptance = f"{t.accepted / t.drafted:.1%}" if t.drafted else "-"
        tau = f"{t.committed / t.steps:.2f}" if t.steps else "-"
        same_text = "-" if label == "plain" else f"{identical}/{len(prompts)}"
        console.print(
            f"{label:<13} {t.tokens_per_s:>9.1f} {t.tokens_per_s / base:>8.2f}x {acceptance:>11} {tau:>14} {same_text:>10}",
            markup=False,
        )  # fmt: skip
    return 0 if identical == len(prompts) or spec.target.dtype != torch.float32 else 1
