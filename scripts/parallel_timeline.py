"""Parallel draft / verify against sequential speculation: speed, identical output, timeline.

Runs plain decoding, sequential speculation (``draft``; one and two torch threads), the same
chain drafted one phase after the other by the parallel loop (``overlap=False``, for a timeline
on the same footing) and parallel speculation (``parallel=True``: one torch thread for the
target, one for the draft thread) on the bench's code prompts, or with ``--tasks`` the first prompts of the real-model chat tasks.
Writes a JSON of the numbers and a plot of the draft and verify phases of one request in both
schedules.

    python scripts/parallel_timeline.py --out docs/figures/parallel_timeline_demo
    python scripts/parallel_timeline.py --target smollm2 --draft src/specdec/assets/smollm2/draft \
        --dtype auto --tasks conversation,summarisation,qa,coding --out runs/parallel_timeline_smollm2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from specdec import SpeculativeGenerator, load_model, make_drafter
from specdec.bench.tasks import code_prompts, held_out_files, real_task
from specdec.engine.parallel import ParallelSpeculation, Timeline


def run(modes: dict, prompts: list[str], new_tokens: int, runs: int) -> dict:  # type: ignore[type-arg]
    """Per mode (``name: (generator, the target's torch threads)``): the mean over prompts of the
    median tok/s over ``runs``, the outputs, tau and the timeline of the first prompt's last run.
    Runs go round the modes, so that a machine whose load drifts slows them alike."""
    times: dict[tuple[str, int], list[float]] = {}
    last: dict[tuple[str, int], object] = {}
    timelines: dict[str, Timeline | None] = dict.fromkeys(modes)
    for _ in range(runs):
        for name, (gen, threads) in modes.items():
            torch.set_num_threads(threads)
            for i, prompt in enumerate(prompts):
                out = gen.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)
                times.setdefault((name, i), []).append(out.stats.total_s)
                last[(name, i)] = out
                if gen.parallel is not None and i == 0:
                    timelines[name] = gen.parallel.timeline
            torch.set_num_threads(1)
    results = {}
    for name in modes:
        outs = [last[(name, i)] for i in range(len(prompts))]
        rates = [len(o.token_ids) / statistics.median(times[(name, i)]) for i, o in enumerate(outs)]  # type: ignore[attr-defined]
        results[name] = {
            "tok_s": statistics.mean(rates),
            "tau": statistics.mean(o.stats.mean_accepted_length for o in outs),  # type: ignore[attr-defined]
            "outputs": [o.token_ids for o in outs],  # type: ignore[attr-defined]
            "timeline": timelines[name],
        }
    return results


def plot(timelines: dict[str, Timeline], path: Path, until_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(timelines), 1, figsize=(10, 1.6 * len(timelines) + 0.6), sharex=True)
    colours = {"verify": "tab:blue", "draft": "tab:orange"}
    for ax, (name, timeline) in zip(axes, timelines.items(), strict=True):
        for row, lane in enumerate(("verify", "draft")):
            spans = [(p.start * 1e3, (p.end - p.start) * 1e3) for p in timeline.phases if p.lane == lane]
            spans = [(s, w) for s, w in spans if s < until_s * 1e3]
            ax.broken_barh(spans, (row - 0.35, 0.7), color=colours[lane])
        ax.set_yticks([0, 1], ["target: verify", "draft"])
        ax.set_title(
            f"{name} (windows kept / dropped: {timeline.kept} / {timeline.dropped}; the first draft reads the prompt)",
            fontsize=9,
        )
    axes[-1].set_xlabel("ms since the request started")
    axes[-1].set_xlim(0, until_s * 1e3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="demo-target")
    p.add_argument("--draft", default="demo-draft")
    p.add_argument("-k", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--plot-ms", type=float, default=40.0, help="the timeline's span")
    p.add_argument("--out", default="runs/parallel_timeline", help="output path without suffix")
    p.add_argument("--dtype", default="float32", help="the target's dtype (auto: a GGUF file's blocks)")
    p.add_argument("--tasks", default=None, help="chat tasks of the real-model suite instead of code prompts")
    args = p.parse_args()
    torch.set_num_threads(1)
    target = load_model(args.target, dtype=args.dtype)
    prompts: list = []  # type: ignore[type-arg]  # text, or a chat prompt's token ids
    if args.tasks is None:
        prompts = [text for _, text in code_prompts(held_out_files(), args.num_prompts)]
    else:
        for name in args.tasks.split(","):
            task = real_task(name, args.num_prompts, target.tokenizer, target.config.vocab_size, 2048)
            prompts += [list(ids) for ids in task.prompts]

    def drafter():  # type: ignore[no-untyped-def]
        return make_drafter("draft", target, draft=args.draft, num_draft_tokens=args.k)

    staged = SpeculativeGenerator(target, drafter(), parallel=True)
    staged.parallel = ParallelSpeculation(drafter(), overlap=False)
    sequential = SpeculativeGenerator(target, drafter())
    modes = {  # name: (generator, the target's torch threads)
        "plain": (SpeculativeGenerator(target), 1),
        "sequential": (sequential, 1),
        "sequential, 2 torch threads": (sequential, 2),
        "parallel loop, phases one after the other": (staged, 1),
        "parallel": (SpeculativeGenerator(target, drafter(), parallel=True), 1),
    }
    for gen, _ in modes.values():  # warm up (kernels, caches, the draft thread)
        gen.generate(prompts[0], max_new_tokens=8)
    results = run(modes, prompts, args.max_new_tokens, args.runs)
    reference = results["plain"]["outputs"]
    report = {
        name: {
            "tok_s": round(r["tok_s"], 1),
            "x_plain": round(r["tok_s"] / results["plain"]["tok_s"], 3),
            "x_sequential": round(r["tok_s"] / results["sequential"]["tok_s"], 3),
            "tau": round(r["tau"], 2),
            "identical": r["outputs"] == reference,
        }
        for name, r in results.items()
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "target": args.target,
        "dtype": args.dtype,
        "draft": args.draft,
        "k": args.k,
        "prompts": args.tasks or "code",
        "threads": "1 target + 1 draft",
    }
    out.with_suffix(".json").write_text(json.dumps({**meta, "modes": report}, indent=1) + "\n")
    for name, row in report.items():
        print(f"{name:45s} {row}")
    staged_phases = results["parallel loop, phases one after the other"]["timeline"].phases
    busy = {
        lane: sum(p.end - p.start for p in staged_phases if p.lane == lane) for lane in ("draft", "verify")
    }
    share = busy["draft"] / (busy["draft"] + busy["verify"])
    print(
        f"draft share of the sequential schedule (first prompt): {share:.1%}; at most {1 / (1 - share):.2f}x by overlap"
    )
    timelines = {
        name: results[name]["timeline"] for name in ("parallel loop, phases one after the other", "parallel")
    }
    plot(timelines, out.with_suffix(".png"), args.plot_ms / 1e3)
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
