"""Prompt lookup settings against plain decoding, per task: CPU time ratios, one torch thread.

Each prompt of the bench's default tasks for the target (the chat tasks on a model with a chat
template, the code tasks on the demo pair) is decoded greedily by plain decoding and by
``NgramDrafter`` for every configuration asked, the best of ``--runs`` process CPU times each
(immune to waiting for a core on a shared machine). A configuration ``NxK[xM][s]``: matches of
``N`` to ``M`` tokens (default 3), at most ``K`` drafts, and with ``s`` at most ``n - 1`` after
a match of ``n`` (``scale_with_match``; without, ``K`` after any match). Chat prompts decode
plain's reply length, as the bench does. Every output is checked equal to plain's.

    .venv/bin/python scripts/ngram_sweep.py --target smollm2 --num-prompts 2 --configs 1x4,2x4,2x2,2x4x8s
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from specdec import SpeculativeGenerator, load_model
from specdec.bench.tasks import build_tasks, default_tasks
from specdec.drafters.ngram import NgramDrafter
from specdec.options import set_options


def cpu_time(
    generator: SpeculativeGenerator, prompt: list[int], n: int, runs: int
) -> tuple[list[int], float]:
    """The tokens of ``n`` greedy steps and the best CPU time of ``runs`` generations."""
    best, tokens = float("inf"), []
    for _ in range(runs):
        start = time.process_time()
        tokens = generator.generate(prompt, max_new_tokens=n, ignore_eos=True).token_ids
        best = min(best, time.process_time() - start)
    return tokens, best


def parse(config: str) -> tuple[int, int, int, bool]:
    """``NxK[xM][s]`` -> (min_ngram, K, max_ngram, scale_with_match)."""
    scaled = config.endswith("s")
    parts = [int(x) for x in config.rstrip("s").split("x")]
    if len(parts) not in (2, 3):
        raise SystemExit(f"--configs: {config!r} is not NxK[xM][s]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else 3, scaled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--num-prompts", type=int, default=2, help="prompts per task")
    parser.add_argument("--configs", default="1x4,2x4,2x2,2x4x8,2x4x8s", help="comma list of NxK[xM][s]")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument(
        "--q8-rows", action="store_true", help="a quantized target with 8-bit rows (--q8-rows)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    set_options(q8_rows=args.q8_rows)
    configs = {c: parse(c) for c in args.configs.split(",")}
    target = load_model(args.target)
    names = list(default_tasks(target.path, target.tokenizer))
    tasks = build_tasks(
        names, args.num_prompts, target.tokenizer, target.config.vocab_size, target.max_seq_len
    )
    plain = SpeculativeGenerator(target)
    times: dict[str, list[float]] = {}  # task -> [plain, config...] CPU seconds, summed over prompts
    work = [(task, list(p)) for task in tasks for p in task.prompts]
    for task, prompt in tqdm(work, desc="prompts"):
        n = task.max_new_tokens
        if task.ends_with_reply:  # a chat reply: plain's own length, as the bench decodes
            n = max(8, len(plain.generate(prompt, max_new_tokens=n).token_ids))
        reference, base = cpu_time(plain, prompt, n, args.runs)
        row = [base]
        for name, (min_n, k, max_n, scaled) in configs.items():
            drafter = NgramDrafter(k, max_ngram=max_n, min_ngram=min_n, scale_with_match=scaled)
            tokens, seconds = cpu_time(SpeculativeGenerator(target, drafter), prompt, n, args.runs)
            if tokens != reference:
                raise SystemExit(f"ngram {name} changed the output of a {task.name} prompt")
            row.append(seconds)
        totals = times.setdefault(task.name, [0.0] * len(row))
        times[task.name] = [a + b for a, b in zip(totals, row, strict=True)]
    times["all"] = [sum(col) for col in zip(*times.values(), strict=True)]
    print("task".ljust(14) + "".join(name.rjust(8) for name in configs) + "   (plain CPU time / ngram's)")
    for name, row in times.items():
        print(name.ljust(14) + "".join(f"{row[0] / t:8.2f}" for t in row[1:]))


if __name__ == "__main__":
    main()
