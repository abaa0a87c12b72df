"""``specdec train heads``: train Medusa / EAGLE / early-exit heads by self-distillation.

The target stays frozen. It reads packed sequences of the training corpus once (bf16
weights on CPU); its final hidden states ``f`` (and, for early exit, the hidden states after
layer L) are kept, and the heads learn to reproduce the target's *own* next-token
distributions ``softmax(lm_head(f))`` — self-distillation, so no labels beyond the target are
needed and the heads imitate what the verifier will accept:

* early exit:  ``KL(target_t || lm_head(ExitHead(h^L_t)))`` (LayerSkip, Elhoushi et al. 2024,
  trains the early exit on the data; we distil, Draft & Verify style);
* Medusa:      head k at token t vs the target's distribution of token t+k+2, i.e.
  ``KL(target_{t+k+1} || head_k(f_t))`` (Cai et al. 2024, Sec. 2.3.2 self-distillation);
* EAGLE:       feature regression ``SmoothL1(f^_{t+1}, f_{t+1})`` plus ``0.1 *`` the
  cross-entropy of the head's token distribution against the target's (Li et al. 2024,
  Sec. 4.2), with uniform noise U(-0.1, 0.1) on the input features (Sec. 4.3).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from specdec.drafters.heads import METHODS, EagleHead, ExitHead, Head, MedusaHeads, new_head, save_head
from specdec.models.loading import DTYPES, LoadedModel, load_model


@dataclass(frozen=True)
class HeadTrainConfig:
    method: str
    steps: int = 150
    batch_size: int = 8  # windows per step
    window: int = 64  # tokens per training window, cut at random from the target's sequences
    seq_len: int = 256  # tokens per sequence the target reads (the context of the features)
    num_sequences: int = 96  # training sequences, read once by the target
    val_sequences: int = 12
    lr: float = 2e-3
    num_heads: int = 4  # Medusa
    exit_layer: int | None = None  # early exit; default num_layers // 2
    seed: int = 0
    # float32 by default: CPUs without native bf16 matmuls (AVX2 only) run bf16 many times slower
    target_dtype: str = "float32"
    max_minutes: float | None = None  # time budget; the schedule ends with it


@dataclass(frozen=True)
class HeadTrainResult:
    head: Head
    val_loss_before: float
    val_loss_after: float
    val_top1_before: list[float]  # per draft position: head argmax == target argmax
    val_top1_after: list[float]
    train_losses: list[float]
    seconds: float


@dataclass(frozen=True)
class Features:
    """What the frozen target computed on a set of sequences (float32)."""

    tokens: torch.Tensor  # (N, T) long
    final: torch.Tensor  # (N, T, d) final normed hidden states
    exit: torch.Tensor | None  # (N, T, d) hidden states after layer exit_layer
    exit_layer: int | None


def pack_tokens(target: LoadedModel, texts: list[str], seq_len: int, count: int, seed: int) -> torch.Tensor:
    """``count`` sequences ``(count, seq_len)`` of consecutive tokens from shuffled documents
    joined by EOS."""
    if target.tokenizer is None:
        raise ValueError(f"{target.path} has no tokenizer: cannot tokenize the training corpus")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eos = target.tokenizer.eos_token_id
    stream: list[int] = []
    for i in order:
        stream += target.tokenizer.encode(texts[i], add_special_tokens=False)
        if eos is not None:
            stream.append(eos)
        if len(stream) >= count * seq_len:
            break
    count = min(count, len(stream) // seq_len)
    if count == 0:
        raise ValueError("the corpus is too small for one training sequence")
    return torch.tensor(stream[: count * seq_len]).view(count, seq_len)


@torch.no_grad()
def target_features(
    target: LoadedModel, tokens: torch.Tensor, exit_layer: int | None, batch_size: int, dtype: str = "float32"
) -> Features:
    """Run the frozen target over ``tokens`` ``(N, T)`` in batches, its weights cast to ``dtype``
    (a bf16 copy is ~2x faster on CPU; the features are returned in float32)."""
    module = target.module
    if DTYPES[dtype] != target.dtype:
        module = copy.deepcopy(module).to(DTYPES[dtype])
    N, T = tokens.shape
    finals, exits = [], []
    for i in range(0, N, batch_size):
        batch = tokens[i : i + batch_size].to(target.device)  # (B, T)
        pos = torch.arange(T, device=batch.device)[None].expand(batch.shape[0], -1)  # (B, T)
        cache = module.new_cache(batch.shape[0], T)
        h = module.model.embed_tokens(batch)  # (B, T, d)
        if exit_layer is not None:
            h = module.run_layers(h, pos, cache, layers=range(exit_layer))
            exits.append(h.float().cpu())
            h = module.run_layers(h, pos, cache, layers=range(exit_layer, len(module.model.layers)))
        else:
            h = module.run_layers(h, pos, cache)
        finals.append(module.model.norm(h).float().cpu())
    return Features(tokens, torch.cat(finals), torch.cat(exits) if exits else None, exit_layer)


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean ``KL(teacher || student)`` over rows; logits ``(..., V)``."""
    s = F.log_softmax(student_logits.float(), -1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float(), -1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def head_loss(
    head: Head,
    target: LoadedModel,
    tokens: torch.Tensor,
    final: torch.Tensor,
    exit: torch.Tensor | None,
    noise: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Training loss of ``head`` on one batch, and top-1 agreement with the target per draft
    position. ``tokens`` ``(B, T)``, ``final`` / ``exit`` ``(B, T, d)``; ``mask`` ``(B, T)`` bool
    (early exit and Medusa): the positions scored (e.g. those whose next token is a reply's),
    default all. Medusa's head ``k`` at ``t`` is scored where ``t`` and ``t + k + 1`` both are."""
    lm_head = target.module.lm_head
    lm_dtype = lm_head.weight.dtype

    def logits(x: torch.Tensor) -> torch.Tensor:
        return lm_head(x.to(lm_dtype)).float()

    def agree(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.argmax(-1) == b.argmax(-1)).float().mean()) if a.shape[0] else 0.0

    rows = torch.ones(final.shape[:2], dtype=torch.bool, device=final.device) if mask is None else mask
    if isinstance(head, ExitHead):
        assert exit is not None
        student, teacher = logits(head(exit[rows])), logits(final[rows])  # (N, V)
        return _kl(student, teacher), [agree(student, teacher)]
    if isinstance(head, MedusaHeads):
        feats = head(final)  # (B, T, K, d)
        with torch.no_grad():
            target_logits = logits(final)  # (B, T, V)
        losses, top1 = [feats.sum() * 0.0], []
        for k in range(head.num_heads):
            pairs = rows[:, : -(k + 1)] & rows[:, k + 1 :]  # (B, T-k-1): head k at t, target at t+k+1
            student = logits(feats[:, : -(k + 1), k][pairs])  # (N, V)
            teacher = target_logits[:, k + 1 :][pairs]  # (N, V)
            if student.shape[0]:
                losses.append(_kl(student, teacher))
            top1.append(agree(student, teacher))
        return torch.stack(losses).sum(), top1
    if mask is not None:
        raise ValueError("EAGLE heads train on every position (train eagle scores replies itself)")
    assert isinstance(head, EagleHead)
    inputs = final[:, :-1]  # (B, T-1, d) f_t
    if noise:
        inputs = inputs + (torch.rand_like(inputs) - 0.5) * 0.2
    B, T1 = inputs.shape[:2]
    pos = torch.arange(T1, device=inputs.device)[None].expand(B, -1)  # (B, T-1)
    embeds = target.module.model.embed_tokens(tokens[:, 1:]).to(inputs.dtype)  # (B, T-1, d) x_{t+1}
    predicted = head(embeds, inputs, pos, head.new_cache(B, T1))  # (B, T-1, d) f^_{t+1}
    wanted = final[:, 1:]  # (B, T-1, d) f_{t+1}
    student, teacher = logits(predicted), logits(wanted)
    loss = F.smooth_l1_loss(predicted, wanted) + 0.1 * _kl(student, teacher)
    return loss, [agree(student, teacher)]


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]
"""One batch for :func:`head_loss`: tokens ``(B, T)``, final ``(B, T, d)``, exit ``(B, T, d)`` or
None, mask ``(B, T)`` bool or None (every position)."""


def evaluate(head: Head, target: LoadedModel, batches: list[Batch]) -> tuple[float, list[float]]:
    """Mean loss and top-1 agreement per draft position over fixed validation batches."""
    head.eval()
    total, top1 = 0.0, None
    with torch.no_grad():
        for tokens, final, exit, mask in batches:
            loss, agree = head_loss(head, target, tokens, final, exit, mask=mask)
            total += float(loss)
            top1 = agree if top1 is None else [a + b for a, b in zip(top1, agree, strict=True)]
    head.train()
    return total / len(batches), [a / len(batches) for a in top1 or []]


def packed_batches(feats: Features, batch_size: int) -> list[Batch]:
    """``feats`` as consecutive batches of whole sequences (validation)."""
    out: list[Batch] = []
    for i in range(0, feats.tokens.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        exit = feats.exit[sl] if feats.exit is not None else None
        out.append((feats.tokens[sl], feats.final[sl], exit, None))
    return out


def default_exit_layer(target: LoadedModel, exit_layer: int | None) -> int:
    return exit_layer or max(1, target.config.num_hidden_layers // 2)


def train_head(
    target: LoadedModel,
    train_tokens: torch.Tensor,  # (N, T) long
    val_tokens: torch.Tensor,  # (N', T) long
    cfg: HeadTrainConfig,
    progress: bool = True,
) -> HeadTrainResult:
    """Train a fresh head of ``cfg.method`` on the frozen ``target`` over packed sequences."""
    exit_layer = default_exit_layer(target, cfg.exit_layer) if cfg.method == "early-exit" else None
    train = target_features(target, train_tokens, exit_layer, cfg.batch_size, cfg.target_dtype)
    val = target_features(target, val_tokens, exit_layer, cfg.batch_size, cfg.target_dtype)
    return train_head_on(target, train, val, cfg, progress)


def train_head_on(
    target: LoadedModel, train: Features, val: Features, cfg: HeadTrainConfig, progress: bool = True
) -> HeadTrainResult:
    """Train a fresh head on features the target already computed (shared between methods)."""
    if cfg.method == "early-exit" and (train.exit is None or val.exit is None):
        raise ValueError("early-exit training needs features with the exit layer's hidden states")
    N, T = train.tokens.shape
    W = min(cfg.window, T)

    def draw(gen: torch.Generator) -> Batch:  # random windows of the packed sequences
        seq = torch.randint(N, (cfg.batch_size, 1), generator=gen)  # (B, 1)
        idx = torch.randint(T - W + 1, (cfg.batch_size, 1), generator=gen) + torch.arange(W)  # (B, W)
        exit = train.exit[seq, idx] if train.exit is not None else None
        return train.tokens[seq, idx], train.final[seq, idx], exit, None

    return fit_head(target, draw, packed_batches(val, cfg.batch_size), cfg, train.exit_layer, progress)


def fit_head(
    target: LoadedModel,
    draw: Callable[[torch.Generator], Batch],
    val: list[Batch],
    cfg: HeadTrainConfig,
    exit_layer: int | None,
    progress: bool = True,
) -> HeadTrainResult:
    """Train a fresh head of ``cfg.method`` on batches ``draw(generator)`` gives, scored on ``val``
    before and after; AdamW, linear warm-up then cosine decay to 10 % over ``cfg.steps`` or
    ``cfg.max_minutes``, whichever ends first."""
    from tqdm import tqdm

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    head = new_head(cfg.method, target.config, num_heads=cfg.num_heads, exit_layer=exit_layer)
    if isinstance(head, ExitHead):
        head.init_from(target.module)
    head = head.to(target.device).float().train()
    val_before, top1_before = evaluate(head, target, val)

    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, cfg.steps // 20)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=f"train {cfg.method} heads", disable=not progress)
    for step in bar:
        minutes = (time.perf_counter() - start) / 60
        if cfg.max_minutes is not None and minutes > cfg.max_minutes:
            break
        done = max((step - warmup) / max(1, cfg.steps - warmup), minutes / (cfg.max_minutes or math.inf))
        factor = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * done))
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * factor
        tokens, final, exit, mask = draw(gen)
        loss, _ = head_loss(head, target, tokens, final, exit, noise=True, mask=mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    val_after, top1_after = evaluate(head, target, val)
    head = head.eval().requires_grad_(False)
    seconds = time.perf_counter() - start
    return HeadTrainResult(head, val_before, val_after, top1_before, top1_after, losses, seconds)


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method",
        required=True,
        help=f"{' | '.join(METHODS)}, or several joined by commas (one target pass)",
    )
    p.add_argument("--target", default="demo-target", help="target folder or demo-target (frozen)")
    p.add_argument(
        "--out", default=None, help="output folder (default: <target folder>/<method>); one method only"
    )
    defaults = HeadTrainConfig("medusa")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="windows per step")
    p.add_argument("--window", type=int, default=defaults.window, help="tokens per training window")
    p.add_argument(
        "--seq-len", type=int, default=defaults.seq_len, help="tokens per sequence the target reads"
    )
    p.add_argument("--num-sequences", type=int, default=defaults.num_sequences)
    p.add_argument("--val-sequences", type=int, default=defaults.val_sequences)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--num-heads", type=int, default=defaults.num_heads, help="Medusa heads")
    p.add_argument("--exit-layer", type=int, default=None, help="early exit after this many layers")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--target-dtype", default=defaults.target_dtype, choices=list(DTYPES), help="dtype of the target pass"
    )
    p.add_argument("--save-dtype", default="bfloat16", choices=list(DTYPES), help="dtype of the saved heads")


def run(args: argparse.Namespace) -> int:
    from specdec.cli import UserError
    from specdec.train.corpus import read_split

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"unknown --method {(unknown or [''])[0]!r}; choose from {', '.join(METHODS)}")
    if args.out and len(methods) > 1:
        raise UserError("--out names one head folder: train one method, or drop --out (<target>/<method>)")
    for name in ("steps", "batch_size", "window", "seq_len", "num_sequences", "val_sequences", "num_heads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    target = load_model(args.target, dtype="float32")
    cfgs = [
        HeadTrainConfig(
            method,
            args.steps,
            args.batch_size,
            args.window,
            args.seq_len,
            args.num_sequences,
            args.val_sequences,
            args.lr,
            args.num_heads,
            args.exit_layer,
            args.seed,
            args.target_dtype,
        )
        for method in methods
    ]
    cfg = cfgs[0]
    try:
        exit_layer = default_exit_layer(target, cfg.exit_layer) if "early-exit" in methods else None
        if exit_layer is not None and not 1 <= exit_layer < target.config.num_hidden_layers:
            raise ValueError(f"--exit-layer must be in [1, {target.config.num_hidden_layers - 1}]")
        train_tokens = pack_tokens(target, read_split("train"), cfg.seq_len, cfg.num_sequences, cfg.seed)
        val_tokens = pack_tokens(target, read_split("validation"), cfg.seq_len, cfg.val_sequences, cfg.seed)
        print(f"reading {train_tokens.numel() + val_tokens.numel()} tokens with the target ...", flush=True)
        train = target_features(target, train_tokens, exit_layer, cfg.batch_size, cfg.target_dtype)
        val = target_features(target, val_tokens, exit_layer, cfg.batch_size, cfg.target_dtype)
        for method_cfg in cfgs:
            result = train_head_on(target, train, val, method_cfg)
            out = Path(args.out) if args.out else target.path / method_cfg.method
            _save(result, method_cfg, target, out, DTYPES[args.save_dtype])
    except ValueError as e:
        raise UserError(str(e)) from None
    return 0


def _save(
    result: HeadTrainResult, cfg: HeadTrainConfig, target: LoadedModel, out: Path, dtype: torch.dtype
) -> None:
    save_head(result.head, out, target.config, dtype)
    settings = result.head.settings()
    report = {
        "config": {**asdict(cfg), **settings},
        "target": target.path.name,
        "val_loss_before": round(result.val_loss_before, 4),
        "val_loss_after": round(result.val_loss_after, 4),
        "val_top1_before": [round(a, 4) for a in result.val_top1_before],
        "val_top1_after": [round(a, 4) for a in result.val_top1_after],
        "final_train_loss": round(result.train_losses[-1], 4),
        "seconds": round(result.seconds, 1),
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    top1 = ", ".join(f"{a:.2f}" for a in result.val_top1_after)
    print(
        f"{cfg.method}: validation loss {result.val_loss_before:.3f} -> {result.val_loss_after:.3f}, "
        f"top-1 agreement with the target [{top1}], {result.seconds:.0f}s; saved to {out}"
    )
