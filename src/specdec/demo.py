"""``specdec demo``: plain vs speculative decoding on held-out code, side by side.

Completes a few prompts from the held-out (test) split of the demo corpus with plain decoding
and with speculative decoding on the shipped pair, streams the speculative text with accepted
draft tokens marked (green on a terminal, ``[...]`` elsewhere), and prints a table: tokens/s,
speed-up, acceptance rate, mean accepted length and whether the outputs are identical.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from specdec.commands.common import add_model_arguments
from specdec.engine import SpecStats, SpeculativeGenerator
from specdec.models.tokenizer import Tokenizer

GREEN, BOLD, DIM, RESET = "\033[32m", "\033[1m", "\033[2m", "\033[0m"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--num-prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--prompt", action="append", default=None, help="your own prompt (repeatable)")
    p.add_argument("--no-color", action="store_true", help="mark accepted drafts with [...] instead")


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


def demo_prompts(n: int) -> list[tuple[str, str]]:
    from specdec.bench.tasks import code_prompts, held_out_files

    prompts = []
    for name, text in code_prompts(held_out_files(), n):
        lines = text.splitlines(keepends=True)
        prompts.append((name, "".join(lines[-12:])))  # the last lines of the opening: short prompts
    return prompts


class Marker:
    """Writes streamed tokens, marking those that were accepted drafts."""

    def __init__(self, tokenizer: Tokenizer, color: bool) -> None:
        self.tokenizer, self.color = tokenizer, color
        self.ids: list[int] = []
        self.shown = ""

    def write(self, token_ids: list[int], kinds: list[str]) -> None:
        for token, kind in zip(token_ids, kinds, strict=True):
            self.ids.append(token)
            text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
            piece, self.shown = text[len(self.shown) :], text
            if kind == "accepted" and piece:
                piece = f"{GREEN}{piece}{RESET}" if self.color else f"[{piece}]"
            sys.stdout.write(piece)
        sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    from specdec.commands.common import build_generator

    spec = build_generator(args)
    if spec.drafter is None:
        from specdec.cli import UserError

        raise UserError("the demo compares against speculative decoding: pick a drafter other than none")
    if spec.target.tokenizer is None:
        from specdec.cli import UserError

        raise UserError("the demo needs a target folder with a tokenizer")
    plain = SpeculativeGenerator(spec.target)
    color = sys.stdout.isatty() and not args.no_color
    prompts = [("your prompt", p) for p in args.prompt] if args.prompt else demo_prompts(args.num_prompts)
    b, r = (BOLD, RESET) if color else ("", "")

    room = spec.target.max_seq_len - args.max_new_tokens - args.num_draft_tokens - 1
    if room < 1:
        from specdec.cli import UserError

        raise UserError(f"--max-new-tokens {args.max_new_tokens} does not fit the context of {spec.target.max_seq_len}")
    prompts = [(name, spec.target.tokenizer.encode(text)[-room:]) for name, text in prompts]  # what fits
    for gen in (plain, spec):  # warm-up: first calls pay one-off allocation costs
        gen.generate(prompts[0][1], max_new_tokens=8)

    totals = {"plain": Totals(), "speculative": Totals()}
    identical = 0
    print(f"{b}specdec demo{r}: target {spec.target.path.name} ({spec.target.config.num_parameters / 1e6:.1f}M "
          f"params, {str(spec.target.dtype).replace('torch.', '')}), drafter {args.drafter}, "
          f"K = {args.num_draft_tokens}")
    legend = f"{GREEN}green{RESET}" if color else "[bracketed]"
    print(f"accepted draft tokens are {legend}; the rest come from the target itself\n")
    for name, prompt in prompts:
        print(f"{b}--- {name} ---{r}")
        text = spec.target.tokenizer.decode(prompt)
        print(f"{DIM if color else ''}{text}{RESET if color else ''}", end="")
        reference = plain.generate(prompt, max_new_tokens=args.max_new_tokens)
        totals["plain"].add(reference.stats)
        marker = Marker(spec.target.tokenizer, color)
        stream = spec.stream(prompt, max_new_tokens=args.max_new_tokens)
        for chunk in stream:
            marker.write(chunk.token_ids, chunk.kinds)
        totals["speculative"].add(stream.stats)
        same = stream.output.token_ids == reference.token_ids
        identical += same
        s = stream.stats
        print(f"\n{DIM if color else ''}[plain {reference.stats.tokens_per_s:.0f} tok/s | speculative "
              f"{s.tokens_per_s:.0f} tok/s | mean accepted length {s.mean_accepted_length:.2f} | "
              f"identical: {'yes' if same else 'no'}]{RESET if color else ''}\n")

    base = totals["plain"].tokens_per_s
    print(f"{b}{'method':<13} {'tokens/s':>9} {'speed-up':>9} {'acceptance':>11} {'mean acc. len':>14} {'identical':>10}{r}")
    for label, t in totals.items():
        acceptance = f"{t.accepted / t.drafted:.1%}" if t.drafted else "-"
        tau = f"{t.committed / t.steps:.2f}" if t.steps else "-"
        same = "-" if label == "plain" else f"{identical}/{len(prompts)}"
        print(f"{label:<13} {t.tokens_per_s:>9.1f} {t.tokens_per_s / base:>8.2f}x {acceptance:>11} {tau:>14} {same:>10}")
    if spec.target.dtype != torch.float32:
        print("(bf16/fp16 verify passes may round differently from one-token steps; use --dtype float32 "
              "for bit-exact comparisons)")
    return 0
