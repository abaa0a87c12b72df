"""Replay recorded speculative steps through draft-length policies, free of timing noise.

Tuning ``adaptive`` by timing it is slow on a shared machine: runs differ by about 10 %,
as much as the policies do. This script separates the two things a policy's speed depends on:

1. **traces**: the bench's prompts decoded with the draft model at ``K_max`` drafts per step,
   recording how many drafts each step accepted. A chain of K <= K_max drafts would have
   accepted ``min(accepted, K)`` of them: greedy acceptance of a prefix does not depend on the
   drafts after it (under sampling the same holds in distribution);
2. **costs**: the time of a step with K drafts (draft call + verify pass + engine), per K,
   measured in the engine (best of ``--rounds``, the K's alternating);

then replays every trace through fixed K = 1..K_max and through the real ``AdaptiveDrafter``
(on a fake clock that advances by the measured costs), and prints tokens per second relative to
plain decoding (K = 0). It is how ``acceptance_ema`` was chosen (docs/drafters.md).

    .venv/bin/python scripts/adaptive_replay.py [--temperature 0.7] [--acceptance-ema 0.3,0.15]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import specdec
from specdec.bench.tasks import build_tasks
from specdec.drafters.adaptive import AdaptiveDrafter
from specdec.drafters.base import DraftContext, DraftProposal, empty_proposal
from specdec.drafters.registry import DrafterSpec, make_drafter
from specdec.sampling import SamplingParams
from specdec.verify.chain import VerifyResult

Trace = list[tuple[int, int]]  # per step: (drafts proposed, drafts accepted)


class Recorder:
    """Wraps a drafter; records ``(num_drafted, num_accepted)`` per verify step."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.steps = inner, []
        self.num_draft_tokens, self.model = inner.num_draft_tokens, inner.model
        self.draft_vocab = inner.draft_vocab

    def prefill(self, prompt_ids, target_out) -> None:  # type: ignore[no-untyped-def]
        self.inner.prefill(prompt_ids, target_out)

    def propose(self, ctx: DraftContext) -> DraftProposal:
        return self.inner.propose(ctx)

    def on_verified(self, result: VerifyResult) -> None:
        self.steps.append((result.num_drafted, result.num_accepted))
        self.inner.on_verified(result)


def record_traces(target, tasks, k_max: int, temperature: float) -> dict[str, list[Trace]]:  # type: ignore[no-untyped-def]
    recorder = Recorder(make_drafter("draft", DrafterSpec(target, num_draft_tokens=k_max, dtype="float32")))
    gen = specdec.SpeculativeGenerator(target, recorder)
    traces: dict[str, list[Trace]] = {}
    for task in tasks:
        for i, prompt in enumerate(task.prompts):
            recorder.steps = []
            gen.generate(list(prompt), max_new_tokens=task.max_new_tokens, temperature=temperature, seed=1000 * i)
            traces.setdefault(task.name, []).append(recorder.steps)
    return traces


def measure_costs(target, prompt, k_max: int, rounds: int) -> dict[int, tuple[float, float]]:  # type: ignore[no-untyped-def]
    """K -> (draft seconds, rest of the step in seconds), per step, best of ``rounds``."""
    gens = {0: specdec.SpeculativeGenerator(target, None)}
    for k in range(1, k_max + 1):
        gens[k] = specdec.SpeculativeGenerator(
            target, make_drafter("draft", DrafterSpec(target, num_draft_tokens=k, dtype="float32"))
        )
    best: dict[int, tuple[float, float]] = {}
    for _ in range(rounds):
        for k, gen in gens.items():
            stats = gen.generate(list(prompt), max_new_tokens=128).stats
            steps = max(1, stats.verify_steps)
            draft = stats.draft_s / steps
            rest = (stats.total_s - stats.prefill_s) / steps - draft
            if k not in best or draft + rest < sum(best[k]):
                best[k] = (draft, rest)
    return best


class FakeDrafter:
    """Proposes K dummy tokens and advances a fake clock by the measured draft time."""

    def __init__(self, costs: dict[int, tuple[float, float]], k_max: int, noise: float, seed: int) -> None:
        self.costs, self.num_draft_tokens, self.now = costs, k_max, 0.0
        self.noise, self.rng = noise, random.Random(seed)
        self.model = self.draft_vocab = None

    def spend(self, seconds: float) -> None:
        """Advance the clock; ``noise`` adds one-sided random delays (a shared machine's)."""
        self.now += seconds * (1.0 + self.noise * abs(self.rng.gauss(0.0, 1.0)))

    def clock(self) -> float:
        return self.now

    def prefill(self, prompt_ids, target_out) -> None:  # type: ignore[no-untyped-def]
        pass

    def propose(self, ctx: DraftContext) -> DraftProposal:
        k = min(self.num_draft_tokens, ctx.max_draft_tokens)
        self.spend(self.costs[k][0])
        return DraftProposal(torch.zeros(k, dtype=torch.long)) if k else empty_proposal()

    def on_verified(self, result: VerifyResult) -> None:
        pass


def replay_fixed(trace: Trace, costs: dict[int, tuple[float, float]], k: int) -> tuple[int, float]:
    """(tokens, seconds) of a fixed K on one trace."""
    tokens = sum(min(accepted, k, drafted) + 1 for drafted, accepted in trace)
    return tokens, sum(sum(costs[min(k, drafted)]) for drafted, _ in trace)


def replay_adaptive(traces: list[Trace], costs, k_max: int, noise: float, seed: int, **kwargs) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    """(tokens, seconds) of ``AdaptiveDrafter`` over the traces in order (one drafter, as in the
    bench: what it learns carries over from prompt to prompt). The seconds are the exact
    costs; the drafter sees them with ``noise``."""
    fake = FakeDrafter(costs, k_max, noise, seed)
    policy = AdaptiveDrafter(fake, max_draft_tokens=k_max, clock=fake.clock, **kwargs)
    tokens, seconds = 0, 0.0
    for trace in traces:
        policy.prefill([], None)  # type: ignore[arg-type]
        for drafted, accepted in trace:
            ctx = DraftContext([], SamplingParams(), max_draft_tokens=drafted)
            k = policy.propose(ctx).num_tokens
            fake.spend(costs[k][1])
            seconds += sum(costs[k])
            got = min(accepted, k)
            policy.on_verified(VerifyResult([0] * (got + 1), got, k, bonus=got == k))
            tokens += got + 1
    return tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--num-prompts", type=int, default=3)
    parser.add_argument("--k-max", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="cost measurements per K (best kept)")
    parser.add_argument("--acceptance-ema", default="0.3,0.15", help="comma list of adaptive variants")
    parser.add_argument("--noise", type=float, default=0.0, help="timing noise adaptive sees (0.2: +16 %% on average)")
    parser.add_argument("--seeds", type=int, default=5, help="noise seeds averaged")
    args = parser.parse_args()
    torch.set_num_threads(1)
    target = specdec.load_model("demo-target", dtype="float32")
    config = target.config
    tasks = build_tasks(["code", "edit", "long"], args.num_prompts, target.tokenizer, config.vocab_size, config.max_position_embeddings)
    start = time.time()
    traces = record_traces(target, tasks, args.k_max, args.temperature)
    costs = measure_costs(target, tasks[0].prompts[0], args.k_max, args.rounds)
    print(f"traces and costs in {time.time() - start:.0f} s; ms per step (draft + rest):")
    print("  " + ", ".join(f"K={k}: {1e3 * d:.2f} + {1e3 * r:.2f}" for k, (d, r) in sorted(costs.items())))
    plain = 1.0 / sum(costs[0])  # tokens per second of plain decoding
    variants = [float(v) for v in args.acceptance_ema.split(",")]
    header = [f"K={k}" for k in range(1, args.k_max + 1)] + [f"adaptive {v}" for v in variants]
    print("| task | " + " | ".join(header) + " |")
    print("|---|" + "---|" * len(header))
    means: list[list[float]] = []
    for name, task_traces in traces.items():
        row = []
        for k in range(1, args.k_max + 1):
            tokens, seconds = map(sum, zip(*(replay_fixed(t, costs, k) for t in task_traces), strict=True))
            row.append(tokens / seconds / plain)
        for v in variants:
            rates = []
            for seed in range(args.seeds if args.noise else 1):
                tokens, seconds = replay_adaptive(task_traces, costs, args.k_max, args.noise, seed, acceptance_ema=v)
                rates.append(tokens / seconds / plain)
            row.append(statistics.mean(rates))
        means.append(row)
        print(f"| {name} | " + " | ".join(f"{x:.2f}" for x in row) + " |")
    print("| mean | " + " | ".join(f"{statistics.mean(col):.2f}" for col in zip(*means, strict=True)) + " |")


if __name__ == "__main__":
    main()
