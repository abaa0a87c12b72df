"""Plot a drafter's training curves from the ``training.json`` of ``specdec train eagle`` or
``specdec train draft --data``: the training loss, and the validation top-1 agreement with the
target (per drafting step for an EAGLE head; with the KL for a draft model).

python scripts/plot_training.py runs/smollm2/eagle/training.json docs/figures/x.png
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


def plot(report_path: Path, out: Path) -> None:
    """Training loss (left) and validation agreement (right) of one training run."""
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
        for j in range(len(log["val_top1"][0])):
            ax2.plot(log["eval_steps"], [v[j] for v in log["val_top1"]], marker="o", label=f"draft {j + 1}")
        title = f"EAGLE head for {report['target']}"
    ax2.set(xlabel="step", title="validation: draft argmax == target argmax")
    ax2.legend()
    fig.suptitle(f"{title} ({report['data']['tokens']} training tokens)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    plot(Path(sys.argv[1]), Path(sys.argv[2]))
