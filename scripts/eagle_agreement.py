"""How often EAGLE heads agree with their target on the bench's chat tasks, per drafting step.

The target (as the bench runs it) answers every prompt of the real-model suite greedily; then,
teacher-forced on prompt + reply with the target's features in float32, each head's drafting
step ``j`` at a reply position predicts the next token from a chain that starts ``j`` positions
earlier (EAGLE-3's training-time test, :func:`specdec.train.eagle.unrolled_features`). Printed:
the top-1 agreement with the target's reply per step (step ``j`` given the steps before it were
right, which is what a chain's acceptance needs), and step 1's per task. The bench's prompts are
never trained on, so this is held-out agreement. ``--speed K``: then each head drafts chains of
K on the same prompts (greedy, one thread, output checked equal to plain), and its CPU time
against plain decoding's (the best of two runs per prompt) and τ are printed.

    .venv/bin/python scripts/eagle_agreement.py HEAD_FOLDER [HEAD_FOLDER ...] [--target smollm2] [--speed 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from specdec import SpeculativeGenerator, load_model
from specdec.bench.real_tasks import REAL_TASKS, load_records, render
from specdec.drafters.eagle import EagleDrafter
from specdec.drafters.heads import EagleHead, load_head
from specdec.train.eagle import unrolled_features

STEPS = 3


@torch.inference_mode()
def agreement(
    target, head: EagleHead, replies: list[tuple[str, list[int], list[int]]]
) -> tuple[list[float], dict[str, float]]:  # type: ignore[no-untyped-def]
    """Per-step top-1 agreement over all replies, and step 1's per task."""
    hits, totals = [0] * STEPS, [0] * STEPS
    tasks: dict[str, list[int]] = {}
    for task, prompt, reply in replies:
        ids = torch.tensor(prompt + reply)  # (L,)
        L, P = ids.shape[0], len(prompt)
        _, rows = target(
            ids[None, :-1], torch.arange(L - 1), target.new_cache(1, L), num_logits=0, return_hidden=True,
            feature_layers=head.feature_layers,
        )  # fmt: skip
        features = head.target_features(rows.float())  # (1, L-1, d): f_0 .. f_{L-2}
        embeds = target.module.model.embed_tokens(ids[None, 1:]).float()  # (1, L-1, d): x_1 .. x_{L-1}
        for j, out in enumerate(unrolled_features(head, embeds, features, STEPS)):
            predicted = target.module.lm_head(out[0]).argmax(-1)  # (L-1,): entry t predicts x_{t+2}
            right = (predicted[:-1] == ids[2:])[max(P - 1, j) :]  # reply positions with a chain
            hits[j] += int(right.sum())
            totals[j] += right.numel()
            if j == 0:
                count = tasks.setdefault(task, [0, 0])
                count[0] += int(right.sum())
                count[1] += right.numel()
    return [h / max(1, n) for h, n in zip(hits, totals, strict=True)], {
        k: a / max(1, b) for k, (a, b) in tasks.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("heads", nargs="+", help="EAGLE head folders")
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--speed", type=int, default=0, help="also time chains of this K (0: no)")
    args = parser.parse_args()
    runner = load_model(args.target)  # the target as the bench runs it answers
    plain = SpeculativeGenerator(runner)
    replies = []
    prompts = [(task, record) for task in REAL_TASKS for record in load_records(task)]
    for task, record in tqdm(prompts, desc="greedy replies"):
        _, ids = render(record.messages, runner.tokenizer, runner.config.vocab_size)
        replies.append((task, ids, plain.generate(ids, max_new_tokens=args.max_new_tokens).token_ids))
    target = load_model(args.target, dtype="float32")  # features as the heads were trained on them
    for folder in args.heads:
        head = load_head(folder, target.config, "eagle", torch.float32, "cpu")
        assert isinstance(head, EagleHead)
        steps, per_task = agreement(target, head, replies)
        print(f"{folder}: steps {' / '.join(f'{a:.3f}' for a in steps)}")
        print("  step 1 per task: " + ", ".join(f"{k} {v:.2f}" for k, v in per_task.items()))
    if args.speed:
        torch.set_num_threads(1)
        base = sum(cpu_time(plain, ids, len(reply), reply)[0] for _, ids, reply in replies)
        for folder in args.heads:
            drafter = EagleDrafter(runner, folder, num_draft_tokens=args.speed)
            spec = SpeculativeGenerator(runner, drafter)
            runs = [cpu_time(spec, ids, len(reply), reply) for _, ids, reply in replies]
            seconds, steps = sum(r[0] for r in runs), sum(r[1] for r in runs)
            tokens = sum(len(reply) for _, _, reply in replies)
            print(
                f"{folder}: K = {args.speed}, {base / seconds:.3f}x plain (CPU time), tau {tokens / steps:.2f}"
            )


def cpu_time(
    generator: SpeculativeGenerator, prompt: list[int], n: int, want: list[int]
) -> tuple[float, int]:
    """The best CPU time of two ``n``-token greedy generations (checked equal to ``want``) and the
    verify passes of one."""
    best, steps = float("inf"), 0
    for _ in range(2):
        start = time.process_time()
        out = generator.generate(prompt, max_new_tokens=n, ignore_eos=True)
        best = min(best, time.process_time() - start)
        if out.token_ids != want[:n]:
            raise SystemExit("a drafter changed the output")
        steps = out.stats.verify_steps
    return best, steps


if __name__ == "__main__":
    main()
