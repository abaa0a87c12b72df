"""Write a benchmark result as JSON, a markdown table and a speed-up plot (matplotlib, Agg)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from specdec.bench.runner import BenchConfig, BenchResult, Row


def to_dict(result: BenchResult) -> dict[str, Any]:
    rows = [
        {**asdict(r), "efficiency": r.efficiency, "decode_efficiency": r.decode_efficiency} for r in result.rows
    ]
    return {"config": asdict(result.config), "meta": result.meta, "rows": rows, "sources": result.sources}


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _split(row: Row) -> str:
    if not row.time_split:
        return "–"
    parts = (row.time_split.get(k, 0.0) * 100 for k in ("prefill", "draft", "verify", "overhead"))
    return " / ".join(f"{p:.0f}" for p in parts)


def decoding(config: BenchConfig) -> str:
    """``greedy``, or the sampling settings of a sampled run."""
    s = config.sampling
    if s.greedy:
        return "greedy"
    cuts = (f", top-k {s.top_k}" if s.top_k else "") + (f", top-p {s.top_p}" if s.top_p else "")
    return f"sampled at temperature {s.temperature}{cuts}"


def _identical(row: Row) -> str:
    if row.identical_fraction is None:
        return "–"
    return "yes" if row.identical else f"no ({row.identical_fraction:.0%})"


def to_markdown(result: BenchResult) -> str:
    """One table: a line per (task, method); ``overall`` sums tokens and time over tasks."""
    head = (
        "| task | method | tok/s | × plain | × HF | × plain, × HF (CPU time) | τ | accept | K/step "
        "| × plain / τ (all, decode) | prefill / draft / verify / other % | identical |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in result.rows:
        if r.error:
            continue
        cells = [
            r.task,
            r.method,
            _num(r.tokens_per_s, ".1f"),
            _num(r.speedup_vs_plain, ".2f"),
            _num(r.speedup_vs_hf, ".2f"),
            f"{_num(r.cpu_speedup_vs_plain, '.2f')}, {_num(r.cpu_speedup_vs_hf, '.2f')}",
            _num(r.tau, ".2f"),
            _num(r.acceptance_rate, ".0%"),
            _num(r.mean_draft_len, ".1f"),
            f"{_num(r.efficiency, '.2f')}, {_num(r.decode_efficiency, '.2f')}",
            _split(r),
            _identical(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    m, c = result.meta, result.config
    target = m.get("target", {})
    draft = m.get("draft", {})
    footer = [
        f"{m['date_utc']} UTC · {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads; "
        f"{', '.join(m['isa']) or 'no AVX'}) · torch {m['torch']} · transformers {m['transformers']}"
        + (f" · kernels: {m['kernels']}" if "kernels" in m else ""),
        f"target {Path(target.get('path', c.target)).name} ({target.get('parameters', 0) / 1e6:.1f}M), "
        f"draft {Path(draft.get('path', c.draft)).name} ({draft.get('parameters', 0) / 1e6:.1f}M), "
        f"{m['dtype']}, {decoding(c)}, batch 1, "
        + (f"prompts of {Path(c.prompts_file).name}" if c.prompts_file else f"{_prompts_per_task(result)} prompts/task")
        + f", median of {c.runs} runs, "
        f"K = {c.num_draft_tokens} unless NAME@K (NAME@KxW: tree of width W).",
    ]
    if m.get("draft_vocab"):
        scored = ", ".join(f"{name} {size}" for name, size in m["draft_vocab"].items())
        footer.append(f"Drafts score the most frequent tokens only (draft_vocab.json): {scored}.")
    if m.get("parallel_threads"):
        split = ", ".join(f"{name} {t['target']} + {t['draft']}" for name, t in m["parallel_threads"].items())
        footer.append(f"Parallel rows draft in a thread of their own; torch threads, target + draft: {split}.")
    llama = m.get("llama_cpp")
    if llama:
        footer.append(
            f"llama.cpp ({llama['bin_dir']}): "
            + (
                f"llama-bench plain generation {llama['tg_tokens_per_s']:.1f} tok/s "
                f"({llama['tg_tokens']} tokens, no prompt, {llama['threads']} threads, {llama['model_type']}); "
                "its rows run llama.cpp's own kernels on the GGUF file, so their tokens are not compared"
                if "tg_tokens_per_s" in llama
                else f"not measured ({llama.get('error')})"
            )
            + "."
        )
    if m.get("cut_prompts"):
        footer.append("Prompts cut to fit the context: " + "; ".join(m["cut_prompts"]) + ".")
    failed = {r.method: r.error for r in result.rows if r.error and r.task == "overall"}
    footer += [f"Not measured: {method} ({error})" for method, error in failed.items()]
    return "\n".join(lines) + "\n\n" + "\n\n".join(footer) + "\n"


def _prompts_per_task(result: BenchResult) -> str:
    counts = sorted({len(sources) for sources in result.sources.values()})
    return "/".join(str(n) for n in counts) or "0"


def plot(result: BenchResult, path: Path) -> None:
    """Grouped bars per task and method: new tokens/s, the speed-up over plain and (if run)
    over HF generate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if not r.error]
    tasks = list(dict.fromkeys(r.task for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    baselines = [("tokens_per_s", ""), ("speedup_vs_plain", "plain decoding")]
    if any(r.speedup_vs_hf for r in rows):
        baselines.append(("speedup_vs_hf", f"HF generate ({decoding(result.config)})"))
    fig, axes = plt.subplots(1, len(baselines), figsize=(6 * len(baselines), 3.8), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    colormap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    palette = [colormap(i) for i in range(colormap.N)]  # one colour per method
    cell = {(r.task, r.method): r for r in rows}
    for ax, (attr, label) in zip(axes[0], baselines, strict=True):
        if attr == "tokens_per_s":
            ax.set_ylabel("new tokens/s")
            ax.set_title("throughput (batch 1)")
        for j, method in enumerate(methods):
            values = [getattr(cell[(t, method)], attr) or 0.0 if (t, method) in cell else 0.0 for t in tasks]
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(tasks))]
            ax.bar(xs, values, width, label=method, color=palette[j % len(palette)])
        ax.set_xticks(range(len(tasks)), tasks, rotation=30 if len(tasks) > 4 else 0, fontsize="small")
        if attr == "tokens_per_s":
            continue
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylabel(f"speed-up over {label}")
        ax.set_title(f"new tokens/s ÷ {label}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(methods), 6), fontsize="small")
    fig.suptitle(
        f"{result.meta['dtype']}, {decoding(result.config)}, batch 1 — {result.meta['date_utc']} UTC", fontsize="small"
    )
    rows_of_legend = -(-len(methods) // 6)
    fig.tight_layout(rect=(0, 0.05 * rows_of_legend + 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(result: BenchResult, out: Path) -> dict[str, Path]:
    """``bench.json``, ``bench.md`` and ``speedup.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "plot": out / "speedup.png"}
    paths["json"].write_text(json.dumps(to_dict(result), indent=1))
    paths["markdown"].write_text(to_markdown(result))
    plot(result, paths["plot"])
    return paths
