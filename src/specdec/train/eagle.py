"""``specdec train eagle``: an EAGLE head for any target, trained on self-distillation data.

The head is :class:`~specdec.drafters.heads.EagleHead` (EAGLE-1's feature-level decoder layer,
Li et al. 2024, drafting a dynamic tree at inference as in EAGLE-2): it reads
``(embed(x_{t+1}), f_t)`` and predicts the target's next feature ``f_{t+1}``, whose logits come
from the target's frozen ``lm_head``. With ``--feature-layers`` (the default) ``f_t`` is
EAGLE-3's fusion (Li et al. 2025, Sec. 3.3): a learned map of the outputs of a low and a middle
decoder layer and the final normed hidden state. The map starts as the identity on the final
state, so a fused head starts as the EAGLE-1 head it would be (``--init`` may name one).

What it takes from EAGLE-3 (Li et al. 2025, Sec. 3.2) is the **training-time test**: at
inference only the first draft reads a target feature, the next ones read the head's own
predictions. Training unrolls that: step 0 reads the target's features, step ``j`` reads the
features step ``j - 1`` predicted one position earlier, and each entry attends exactly to what
it would see while drafting: the target-feature entries up to ``t - j`` and its own chain's
entries of steps ``1 .. j`` (a mask over the concatenated keys of all steps). Every step is
trained to predict the target's feature (SmoothL1) and distribution (forward KL through the
frozen ``lm_head``, on a sample of rows, since a 49k-token ``lm_head`` dominates the cost).

Data: the records of ``specdec train data`` and the target's hidden states stored with them
(recomputed where a shard has none). Windows of ``--window`` tokens are cut at random, ending
in the target's reply (what the drafter drafts).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from specdec.cache import KVCache
from specdec.drafters.heads import EagleHead, load_head, save_head
from specdec.models.llama import check_feature_layers
from specdec.models.loading import LoadedModel


@dataclass(frozen=True)
class EagleTrainConfig:
    steps: int = 300
    batch_size: int = 8  # windows per step
    window: int = 64  # tokens per window
    ttt_steps: int = 3  # unrolled drafting steps (1 = EAGLE-1's training)
    kl_rows: int = 192  # rows per step whose full-vocabulary KL is computed
    lr: float = 1e-3
    intermediate_size: int | None = None  # the head's MLP width (default: the target's)
    init_from_last_layer: bool = True  # start the head's layer as a copy of the target's last
    noise: float = 0.1  # uniform noise U(-noise, noise) on the target's features (EAGLE Sec. 4.3)
    max_minutes: float | None = None
    eval_interval: int = 50
    seed: int = 0
    init: str | None = None  # a saved head folder to continue from (its weights, a new schedule)
    feature_layers: tuple[int, ...] = ()  # EAGLE-3: target layers fused with the final state


@dataclass
class EagleTrainLog:
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    val_top1: list[list[float]] = field(default_factory=list)  # per eval: agreement per drafting step


def default_feature_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low and middle layers for a target of ``num_layers`` (its high one is the final
    normed state): layer 2 (or earlier, in a shallow target) and the middle one."""
    return tuple(sorted({min(2, (num_layers - 1) // 3), num_layers // 2}))


@dataclass(frozen=True)
class Conversation:
    tokens: torch.Tensor  # (L,) long
    features: torch.Tensor  # (L-1, (n+1) d) float32: the target's rows for t = 0 .. L-2 (n feature layers)
    reply_start: int


def load_conversations(
    folder: str | Path,
    target: LoadedModel,
    split: str,
    feature_layers: tuple[int, ...] = (),
    progress: bool = False,
) -> list[Conversation]:
    """The records of one split with the target's rows for them: its final normed hidden states
    (stored, else recomputed), after the outputs of ``feature_layers`` (computed once and kept in
    the data folder as ``features-<layers>-<split>.safetensors``)."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    from specdec.train.data import check_manifest, read_hidden, read_records

    check_manifest(Path(folder), target)
    records = read_records(folder, split)
    hidden = read_hidden(folder)
    layers: dict[str, torch.Tensor] = {}
    cached = Path(folder) / f"features-{'-'.join(map(str, feature_layers))}-{split}.safetensors"
    if feature_layers and cached.is_file():
        layers = load_file(str(cached))
    out, added = [], False
    for rec in tqdm(records, desc=f"target features ({split})", disable=not progress):
        ids = torch.tensor(rec.token_ids)  # (L,)
        h = hidden.get(rec.key)
        if h is None:
            h = _features(target, ids[:-1])
        if feature_layers:
            if rec.key not in layers:
                layers[rec.key] = _layer_outputs(target, ids[:-1], feature_layers).to(torch.bfloat16)
                added = True
            h = torch.cat([layers[rec.key].float(), h.float()], dim=-1)  # (L-1, (n+1) d)
        out.append(Conversation(ids, h.float(), rec.reply_start))
    if added:
        save_file({k: v.contiguous() for k, v in layers.items()}, str(cached))
    return out


@torch.inference_mode()
def _features(target: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """The target's final normed hidden states ``(T, d)`` over ``ids`` ``(T,)``."""
    cache = target.new_cache(1, ids.shape[0])
    _, h = target(ids[None], torch.arange(ids.shape[0]), cache, num_logits=0, return_hidden=True)
    return h[0].float().clone()


@torch.inference_mode()
def _layer_outputs(target: LoadedModel, ids: torch.Tensor, feature_layers: tuple[int, ...]) -> torch.Tensor:
    """The outputs of decoder layers ``feature_layers`` over ``ids`` ``(T,)``, concatenated
    ``(T, n d)``: the layers up to the last of them run, no further."""
    module, T = target.module, ids.shape[0]
    cache = target.new_cache(1, T)
    pos = torch.arange(T)[None]  # (1, T)
    h = module.model.embed_tokens(ids[None]).float()  # (1, T, d)
    kept = module.layer_outputs(h, pos, cache, list(feature_layers), kv_len=T)
    return torch.cat([k[0].float() for k in kept], dim=-1)


def sample_windows(
    convs: list[Conversation], batch_size: int, window: int, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch_size`` windows: tokens ``x_{t+1}`` ``(B, W)``, features ``f_t`` ``(B, W+1, d)``
    (the last column only as a target) and the valid mask ``(B, W)`` (short conversations are
    padded)."""
    d = convs[0].features.shape[1]
    tokens = torch.zeros(batch_size, window, dtype=torch.long)
    feats = torch.zeros(batch_size, window + 1, d)
    valid = torch.zeros(batch_size, window, dtype=torch.bool)
    for b in range(batch_size):
        c = convs[rng.randrange(len(convs))]
        last = c.features.shape[0] - 1  # f index of the last target feature
        hi = max(0, last - window)
        lo = min(hi, max(0, c.reply_start - window // 4))
        s = rng.randint(lo, hi)
        n = min(window, last - s)  # entries t = s .. s+n-1 have a next feature to predict
        tokens[b, :n] = c.tokens[s + 1 : s + 1 + n]
        feats[b, : n + 1] = c.features[s : s + n + 1]
        valid[b, :n] = True
    return tokens, feats, valid


def ttt_mask(window: int, step: int) -> torch.Tensor:
    """Attention of step ``step``'s entries over the keys of steps ``0 .. step`` ``(W, (step+1) W)``:
    the entry at ``t`` sees step 0's entries ``<= t - step`` and step ``i``'s entry at ``t - step + i``
    (the keys a drafting chain has when it drafts its ``step``-th token after ``t - step``).
    Entries with ``t < step`` have no such chain (they are left out of the loss); they see their
    own key, so that no row is fully masked (which would give NaN)."""
    t = torch.arange(window)[:, None]  # (W, 1)
    p = torch.arange(window)[None, :]  # (1, W)
    parts = [p <= t - step] + [p == t - step + i for i in range(1, step + 1)]
    if step:
        parts[-1] = parts[-1] | ((p == t) & (t < step))
    return torch.cat(parts, dim=1)  # (W, (step+1) W)


def unrolled_features(
    head: EagleHead, embeds: torch.Tensor, feats: torch.Tensor, ttt_steps: int
) -> list[torch.Tensor]:
    """The head's predictions at each drafting step, ``[(B, W, d)] * ttt_steps``: step 0 reads
    ``feats`` ``(B, W, d)`` (f_t), step ``j`` the prediction of step ``j-1`` one position earlier.
    Keys of all steps are kept in one cache, each step's in its own block of slots."""
    B, W, _ = embeds.shape
    cfg = head.config
    pos = torch.arange(W)[None].expand(B, -1)  # (B, W)
    k = torch.zeros(1, B, cfg.num_key_value_heads, 0, cfg.head_dim)
    v = torch.zeros_like(k)
    outputs = []
    inputs = feats
    for j in range(ttt_steps):
        cache = KVCache(1, B, cfg.num_key_value_heads, 1, cfg.head_dim)
        blank = torch.zeros(1, B, cfg.num_key_value_heads, W, cfg.head_dim)
        cache.k, cache.v = torch.cat([k, blank], 3), torch.cat([v, blank], 3)  # (1, B, H, (j+1) W, D)
        cache.max_seq_len = (j + 1) * W
        mask = ttt_mask(W, j)[None].expand(B, -1, -1)  # (B, W, (j+1) W)
        out = head(embeds, inputs, pos, cache, attn_mask=mask, cache_slots=pos + j * W)  # (B, W, d)
        outputs.append(out)
        k, v = cache.k, cache.v
        inputs = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], 1)  # (B, W, d) f^_t from t-1
    return outputs


def eagle_loss(
    head: EagleHead,
    target: LoadedModel,
    tokens: torch.Tensor,  # (B, W)
    feats: torch.Tensor,  # (B, W+1, d)
    valid: torch.Tensor,  # (B, W) bool
    cfg: EagleTrainConfig,
    gen: torch.Generator,
    noise: bool,
) -> tuple[torch.Tensor, list[float]]:
    """Training loss over the unrolled steps and the top-1 agreement with the target per step."""
    lm_head = target.module.lm_head
    inputs = feats[:, :-1]  # (B, W, (n+1) d)
    if noise and cfg.noise:
        inputs = inputs + (torch.rand(inputs.shape, generator=gen) * 2 - 1) * cfg.noise
    inputs = head.target_features(inputs)  # (B, W, d)
    embeds = target.module.model.embed_tokens(tokens).float()  # (B, W, d)
    wanted = feats[:, 1:, -embeds.shape[-1] :]  # (B, W, d) f_{t+1}: the final normed state
    outputs = unrolled_features(head, embeds, inputs, cfg.ttt_steps)
    W = tokens.shape[1]
    losses, top1 = [], []
    for j, out in enumerate(outputs):
        ok = valid & (torch.arange(W) >= j)[None]  # (B, W): the chain starts inside the window
        if not bool(ok.any()):
            top1.append(0.0)
            continue
        pred, goal = out[ok], wanted[ok]  # (N, d)
        reg = F.smooth_l1_loss(pred, goal)
        rows = torch.randperm(pred.shape[0], generator=gen)[: cfg.kl_rows]
        student = F.log_softmax(lm_head(pred[rows]).float(), -1)  # (R, V)
        with torch.no_grad():
            teacher = F.log_softmax(lm_head(goal[rows]).float(), -1)  # (R, V)
        kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        losses.append(reg + 0.1 * kl)
        top1.append(float((student.argmax(-1) == teacher.argmax(-1)).float().mean()))
    return torch.stack(losses).mean(), top1


def new_eagle_head(target: LoadedModel, cfg: EagleTrainConfig) -> EagleHead:
    """A fresh head (``cfg.init``: a saved one); its decoder layer starts as the target's last one
    where the shapes allow."""
    if cfg.init is not None:
        head = load_head(cfg.init, target.config, "eagle", torch.float32, "cpu")
        assert isinstance(head, EagleHead)
        if head.feature_layers != cfg.feature_layers:
            if head.feature_layers:
                raise ValueError(
                    f"{cfg.init} fuses layers {list(head.feature_layers)}, not {list(cfg.feature_layers)} "
                    f"(--feature-layers {','.join(map(str, head.feature_layers))} continues it)"
                )
            fused = EagleHead(target.config, head.config.intermediate_size, cfg.feature_layers)
            fused.load_state_dict(head.state_dict(), strict=False)  # all but the new fusion
            head = _fuse_as_final(fused)
        return head.float().requires_grad_(True).train()
    head = EagleHead(target.config, cfg.intermediate_size, cfg.feature_layers)
    torch.manual_seed(cfg.seed)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    if cfg.init_from_last_layer:
        last = target.module.model.layers[-1]
        own = head.layer.state_dict()
        theirs = {k: v.float() for k, v in last.state_dict().items() if k in own and own[k].shape == v.shape}
        own.update(theirs)
        head.layer.load_state_dict(own)
    return _fuse_as_final(head).float().train()


@torch.no_grad()
def _fuse_as_final(head: EagleHead) -> EagleHead:
    """``head`` with its fusion set to pass the final normed state through (the others weigh 0)."""
    if head.fuse is not None:
        d = head.config.hidden_size
        head.fuse.weight.zero_()
        head.fuse.weight[:, -d:] = torch.eye(d)
    return head


@torch.no_grad()
def evaluate(
    head: EagleHead, target: LoadedModel, convs: list[Conversation], cfg: EagleTrainConfig, batches: int = 4
) -> list[float]:
    """Top-1 agreement with the target per drafting step on fixed validation windows."""
    rng, gen = random.Random(1234), torch.Generator().manual_seed(1234)
    head.eval()
    sums = [0.0] * cfg.ttt_steps
    for _ in range(batches):
        batch = sample_windows(convs, cfg.batch_size, cfg.window, rng)
        _, top1 = eagle_loss(head, target, *batch, cfg, gen, noise=False)
        sums = [a + b for a, b in zip(sums, top1, strict=True)]
    head.train()
    return [s / batches for s in sums]


def train_eagle(
    target: LoadedModel,
    train: list[Conversation],
    val: list[Conversation],
    cfg: EagleTrainConfig,
    progress: bool = True,
) -> tuple[EagleHead, EagleTrainLog]:
    """Train a fresh EAGLE head with training-time test on the target's conversations."""
    from tqdm import tqdm

    if not train or not val:
        raise ValueError(
            "the data has no training or no validation conversations; make more with 'specdec train data'"
        )
    target.module.requires_grad_(False)
    head = new_eagle_head(target, cfg)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, cfg.steps // 20)
    rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    log = EagleTrainLog()
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train eagle", disable=not progress)
    for step in bar:
        elapsed = (time.perf_counter() - start) / 60
        if cfg.max_minutes is not None and elapsed > cfg.max_minutes:
            break
        done = max(step / cfg.steps, elapsed / cfg.max_minutes if cfg.max_minutes else 0.0)
        lr = cfg.lr * ((step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * done)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        if step % cfg.eval_interval == 0:
            log.eval_steps.append(step)
            log.val_top1.append(evaluate(head, target, val, cfg))
        loss, _ = eagle_loss(
            head, target, *sample_windows(train, cfg.batch_size, cfg.window, rng), cfg, gen, True
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        log.steps.append(step)
        log.train_loss.append(float(loss.detach()))
        bar.set_postfix(loss=f"{log.train_loss[-1]:.3f}")
    log.eval_steps.append(len(log.steps))
    log.val_top1.append(evaluate(head, target, val, cfg))
    return head.eval().requires_grad_(False), log


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    from specdec.train.data import add_head_arguments

    d = EagleTrainConfig()
    add_head_arguments(p)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per step")
    p.add_argument("--window", type=int, default=d.window, help="tokens per window")
    p.add_argument("--ttt-steps", type=int, default=d.ttt_steps, help="unrolled drafting steps (1: EAGLE-1)")
    p.add_argument("--kl-rows", type=int, default=d.kl_rows, help="rows per step scored over the vocabulary")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--intermediate-size", type=int, default=None, help="the head's MLP width")
    p.add_argument("--no-init", action="store_true", help="random layer instead of the target's last")
    p.add_argument("--init", default=None, help="continue from this saved head folder (a new schedule)")
    p.add_argument("--max-minutes", type=float, default=None, help="time budget; the schedule ends with it")
    p.add_argument("--eval-interval", type=int, default=d.eval_interval)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--feature-layers",
        default="auto",
        help="EAGLE-3: comma list of target layers whose outputs are fused with its final state "
        "(auto: a low and the middle one; none: the final state alone, EAGLE-1)",
    )


def parse_feature_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """``--feature-layers``: ``auto``, ``none`` or a comma list of increasing layer indices."""
    from specdec.cli import UserError

    if text == "auto":
        return default_feature_layers(num_layers)
    if text == "none":
        return ()
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(
            f"--feature-layers: expected auto, none or a comma list of layers, got {text!r}"
        ) from None
    try:
        return check_feature_layers(layers, num_layers)
    except ValueError as e:
        raise UserError(f"--feature-layers: {e}") from None


def run(args: argparse.Namespace) -> int:
    from specdec.cli import UserError
    from specdec.drafters.locate import heads_folder
    from specdec.train.data import frozen_target

    target = frozen_target(args, ("steps", "batch_size", "window", "ttt_steps", "kl_rows", "eval_interval"))
    layers = parse_feature_layers(args.feature_layers, target.config.num_hidden_layers)
    cfg = EagleTrainConfig(
        args.steps, args.batch_size, args.window, args.ttt_steps, args.kl_rows, args.lr,
        args.intermediate_size, not args.no_init, EagleTrainConfig.noise, args.max_minutes,
        args.eval_interval, args.seed, args.init, layers,
    )  # fmt: skip
    try:
        train = load_conversations(args.data, target, "train", layers, progress=True)
        val = load_conversations(args.data, target, "validation", layers, progress=True)
        tokens = sum(c.tokens.numel() for c in train)
        print(f"{len(train)} training conversations ({tokens} tokens), {len(val)} validation", flush=True)
        start = time.perf_counter()
        head, log = train_eagle(target, train, val, cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    out = args.out or heads_folder(target, "eagle", for_writing=True)
    save_head(head, out, target.config, torch.bfloat16)
    report = {
        "config": asdict(cfg),
        "target": target.path.name,
        "data": {"conversations": len(train), "tokens": tokens, "validation": len(val)},
        "seconds": round(time.perf_counter() - start, 1),
        "log": asdict(log),
    }
    (out / "training.json").write_text(json.dumps(report) + "\n")
    top1 = ", ".join(f"{a:.2f}" for a in log.val_top1[-1])
    print(f"eagle: top-1 agreement with the target per drafting step [{top1}]; saved to {out}")
    return 0
