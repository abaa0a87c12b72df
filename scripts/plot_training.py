"""Plot a drafter's training curves from the ``training.json`` of ``specdec train eagle`` or
``specdec train draft --data``: the training loss, and the validation top-1 agreement with the
target (per drafting step for an EAGLE head; with the KL for a draft model).

python scripts/plot_training.py runs/smollm2/eagle/training.json docs/figures/x.png
python scripts/plot_training.py EAGLE3.json x.png --against EAGLE1.json   (two EAGLE runs, one dashed)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _smooth(values: list[float]) -> tuple[list[float], int]:
    """Running means over a twentieth of the curve, and that window."""
    window = max(1, len(values) // 20)
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
        for i in range(len(values))
    ], window


def _features(report: dict[str, Any]) -> str:
    """What an EAGLE head reads, for a legend."""
    layers = report["config"].get("feature_layers") or []
    return f"EAGLE-3, layers {', '.join(map(str, layers))} + final" if layers else "EAGLE-1, final state"


def plot(report_path: Path, out: Path, against: Path | None = None) -> None:
    """Training loss (left) and validation agreement (right) of one training run; with
    ``against``, a second EAGLE run's curves dashed on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report: dict[str, Any] = json.loads(report_path.read_text())
    log = report["log"]
    is_draft = "val_kl" in log
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    smooth, window = _smooth(log["train_loss"])
    ax1.plot(log["steps"], log["train_loss"], alpha=0.3, label="step")
    ax1.plot(log["steps"], smooth, label=f"mean of {window}")
    loss_name = "KL(target || draft)" if is_draft else "SmoothL1 + 0.1 KL"
    ax1.set(xlabel="step", ylabel=f"loss ({loss_name})", title="training loss")
    ax1.legend()
    if is_draft:
        ax1.set_yscale("log")
        ax2.plot(log["eval_steps"], log["val_top1"], marker="o", label="top-1 agreement")
        ax2.set(ylabel="top-1 agreement", ylim=(0, 1))
        kl_axis = ax2.twinx()
        kl_axis.plot(
            log["eval_steps"], log["val_kl"], marker="s", color="tab:orange", label="KL (right, log)"
        )
        kl_axis.set(yscale="log", ylabel="KL(target || draft)")
        kl_axis.legend(loc="center right")
        title = f"draft model ({len(report['layers']) or '?'} layers) for {report['target']}"
    else:
        other = json.loads(against.read_text()) if against is not None else None
        tag = f" ({_features(report)})" if other else ""
        for j in range(len(log["val_top1"][0])):
            ax2.plot(
                log["eval_steps"],
                [v[j] for v in log["val_top1"]],
                marker="o",
                color=f"C{j}",
                label=f"draft {j + 1}{tag}",
            )
        if other is not None:
            olog = other["log"]
            ax1.plot(olog["steps"], _smooth(olog["train_loss"])[0], "--", label=f"mean, {_features(other)}")
            ax1.legend()
            for j in range(len(olog["val_top1"][0])):
                values = [v[j] for v in olog["val_top1"]]
                ax2.plot(
                    olog["eval_steps"],
                    values,
                    "--",
                    marker="x",
                    color=f"C{j}",
                    label=f"draft {j + 1} ({_features(other)})",
                )
        title = f"EAGLE head for {report['target']}"
    ax2.set(xlabel="step", title="validation: draft argmax == target argmax")
    ax2.legend(fontsize="small")
    fig.suptitle(f"{title} ({report['data']['tokens']} training tokens)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    args = sys.argv[1:]
    versus = Path(args[args.index("--against") + 1]) if "--against" in args else None
    paths = [a for i, a in enumerate(args) if a != "--against" and (i == 0 or args[i - 1] != "--against")]
    plot(Path(paths[0]), Path(paths[1]), versus)
