"""``specdec train medusa | early-exit --target T --data D``: heads on self-distillation data.

The heads of :mod:`specdec.train.heads` (Medusa-2's self-distillation, Cai et al. 2024,
Sec. 2.3.2; the early exit distilled Draft & Verify style), trained on the conversations of
``specdec train data`` instead of the code corpus: windows of the target's chats, the loss on
the positions whose next token is the target's reply (:mod:`specdec.train.replies`), the
teacher the target's own distribution ``softmax(lm_head(f))`` at each position. Medusa reads
the final hidden states stored with the data; early exit recomputes the target's hidden states
after its exit layer (one float32 pass per conversation). The head is saved beside the target
(``<folder>/<method>/``, ``<dir>/<file stem>.<method>/``) where ``make_drafter`` and ``auto``
find it.
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from specdec.drafters.heads import save_head
from specdec.models.loading import DTYPES, LoadedModel
from specdec.train.heads import Batch, HeadTrainConfig, HeadTrainResult, default_exit_layer, fit_head
from specdec.train.replies import (
    ReplyBatch,
    ReplyConversation,
    load_replies,
    sample_reply_windows,
    validation_windows,
)


def _as_batch(batch: ReplyBatch) -> Batch:
    return batch.tokens, batch.final, batch.exit, batch.mask


def train_on_replies(
    target: LoadedModel,
    train: list[ReplyConversation],
    val: list[ReplyConversation],
    cfg: HeadTrainConfig,
    progress: bool = True,
) -> HeadTrainResult:
    """Train a fresh ``cfg.method`` head on reply windows of the target's conversations
    (early exit: conversations loaded with its ``exit_layer``)."""
    if not train or not val:
        raise ValueError(
            "the data has no training or no validation conversations; make more with 'specdec train data'"
        )
    if cfg.method == "early-exit" and train[0].exit is None:
        raise ValueError("early-exit training needs the conversations' hidden states after the exit layer")
    rng = random.Random(cfg.seed)

    def draw(_: torch.Generator) -> Batch:
        return _as_batch(sample_reply_windows(train, cfg.batch_size, cfg.window, rng))

    val_batches = [_as_batch(b) for b in validation_windows(val, cfg.batch_size, cfg.window)]
    exit_layer = default_exit_layer(target, cfg.exit_layer) if cfg.method == "early-exit" else None
    return fit_head(target, draw, val_batches, cfg, exit_layer, progress)


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser, method: str) -> None:
    from specdec.train.data import add_head_arguments

    d = HeadTrainConfig(method, steps=300)
    add_head_arguments(p)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per step")
    p.add_argument("--window", type=int, default=d.window, help="positions per window")
    p.add_argument("--lr", type=float, default=d.lr)
    if method == "medusa":
        p.add_argument("--num-heads", type=int, default=d.num_heads, help="heads (draft positions)")
    else:
        p.add_argument(
            "--exit-layer", type=int, default=None, help="exit after this many layers (default: half)"
        )
    p.add_argument("--max-minutes", type=float, default=None, help="time budget; the schedule ends with it")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-dtype", default="bfloat16", choices=list(DTYPES), help="dtype of the saved head")
    p.set_defaults(head_method=method)


def run(args: argparse.Namespace) -> int:
    from specdec.cli import UserError
    from specdec.drafters.locate import heads_folder
    from specdec.train.data import frozen_target

    method = args.head_method
    positive = ("steps", "batch_size", "window") + (("num_heads",) if method == "medusa" else ())
    target = frozen_target(args, positive)
    cfg = HeadTrainConfig(
        method, steps=args.steps, batch_size=args.batch_size, window=args.window, lr=args.lr,
        num_heads=getattr(args, "num_heads", HeadTrainConfig.num_heads),
        exit_layer=getattr(args, "exit_layer", None), seed=args.seed, max_minutes=args.max_minutes,
    )  # fmt: skip
    exit_layer = default_exit_layer(target, cfg.exit_layer) if method == "early-exit" else None
    layers = target.config.num_hidden_layers
    if exit_layer is not None and not 1 <= exit_layer < layers:
        raise UserError(f"--exit-layer must be in [1, {layers - 1}]")
    try:
        train = load_replies(args.data, target, "train", exit_layer)
        val = load_replies(args.data, target, "validation", exit_layer)
        tokens = sum(c.tokens.numel() for c in train)
        print(f"{len(train)} training conversations ({tokens} tokens), {len(val)} validation", flush=True)
        result = train_on_replies(target, train, val, cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    out = args.out or heads_folder(target, method, for_writing=True)
    save_head(result.head, out, target.config, DTYPES[args.save_dtype])
    report = {
        "config": {"method": method, "steps": cfg.steps, "batch_size": cfg.batch_size, "window": cfg.window,
                   "lr": cfg.lr, "max_minutes": cfg.max_minutes, "seed": cfg.seed, **result.head.settings()},
        "target": target.path.name,
        "data": {"folder": str(args.data), "conversations": len(train), "tokens": tokens, "validation": len(val)},
        "val_loss_before": round(result.val_loss_before, 4),
        "val_loss_after": round(result.val_loss_after, 4),
        "val_top1_before": [round(a, 4) for a in result.val_top1_before],
        "val_top1_after": [round(a, 4) for a in result.val_top1_after],
        "train_loss": [round(x, 4) for x in result.train_losses],
        "seconds": round(result.seconds, 1),
    }  # fmt: skip
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    top1 = ", ".join(f"{a:.2f}" for a in result.val_top1_after)
    print(
        f"{method}: validation loss {result.val_loss_before:.3f} -> {result.val_loss_after:.3f}, "
        f"top-1 agreement with the target [{top1}], {result.seconds:.0f}s; saved to {out}"
    )
    return 0
