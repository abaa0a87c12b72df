"""Plot an EAGLE head's training curve from the ``training.json`` of ``specdec train eagle``.

python scripts/plot_eagle_training.py runs/smollm2/eagle/training.json docs/figures/x.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot(report_path: Path, out: Path) -> None:
    """Training loss (left) and validation top-1 agreement per drafting step (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(report_path.read_text())
    log = report["log"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    losses = log["train_loss"]
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    ax1.plot(log["steps"], losses, alpha=0.3, label="step")
    ax1.plot(log["steps"], smooth, label=f"mean of {window}")
    ax1.set(xlabel="step", ylabel="loss (SmoothL1 + 0.1 KL)", title="training loss")
    ax1.legend()
    for j in range(len(log["val_top1"][0])):
        ax2.plot(log["eval_steps"], [v[j] for v in log["val_top1"]], marker="o", label=f"draft {j + 1}")
    ax2.set(xlabel="step", ylabel="top-1 agreement", title="validation: head argmax == target argmax")
    ax2.legend()
    fig.suptitle(f"EAGLE head for {report['target']} ({report['data']['tokens']} training tokens)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    plot(Path(sys.argv[1]), Path(sys.argv[2]))
