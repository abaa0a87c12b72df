"""``specdec train draft --target T --data D``: a DistillSpec draft model for any target.

DistillSpec (Zhou et al. 2024) trains the draft to match the target's own next-token
distributions on text like what it will draft, since the acceptance rate of one position is
``1 - TV(target_probs, draft_probs)``; its Sec. 5 finds the forward ``KL(target || draft)`` on
the target's own generations a strong default. Here:

* **architecture and init**: the target's own architecture and tokenizer with fewer layers,
  initialised from the target: its embedding table, final norm and ``lm_head``, and the decoder
  layers ``--layers`` (default ``--num-layers`` evenly spaced, the first and last included), so
  the draft starts as a shallow copy of the target rather than from noise; ``--init`` starts
  from a draft saved earlier instead;
* **data**: the conversations of ``specdec train data``, in windows of ``--seq-len`` positions
  (:mod:`specdec.train.replies`), the loss on the positions whose next token is the target's
  reply;
* **teacher**: the target's distribution at each position, ``softmax(lm_head(f_t))`` of the
  final hidden states stored with the data (recomputed with the frozen target where a shard has
  none); ``--ce-weight`` mixes in the cross-entropy of the tokens the target wrote, and
  ``--no-distill`` trains on that cross-entropy alone.

**Embeddings**: the draft keeps the target's embedding table (and ``lm_head``) frozen and does
not store them (``"specdec_embeddings": "target"`` in its config.json; the loader takes them from
the target it drafts for), so a draft of a model with a large vocabulary ships in a few MB;
``--own-embeddings`` trains them and stores a standalone model.

The draft is saved as a Hugging Face folder (config.json, model.safetensors and the target's
tokenizer files) beside the target (``<folder>/draft/``, ``<dir>/<file stem>.draft/``) or at
``--out``; ``--drafter draft --draft FOLDER`` runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from specdec.models.config import ModelLoadError
from specdec.models.loading import LoadedModel
from specdec.train.distill import distill_loss
from specdec.train.replies import ReplyBatch, ReplyConversation, sample_reply_windows, validation_windows
from specdec.train.trainer import TrainConfig, autocast, learning_rate, make_optimizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Tokenizer files a Hugging Face target folder may hold; those present are copied into the draft.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
# Fields of a target's configuration that do not describe the draft.
DROPPED_CONFIG = (
    "gguf_file_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "auto_map",
    "quantization_config",
)


@dataclass
class DraftTrainLog:
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    val_kl: list[float] = field(default_factory=list)  # mean KL(target || draft) per reply token
    val_top1: list[float] = field(default_factory=list)  # draft argmax == target argmax


def evenly_spaced(total: int, count: int) -> list[int]:
    """``count`` layer indices of ``total``, evenly spaced with the first and last included."""
    if count >= total:
        return list(range(total))
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def parse_layers(text: str, total: int) -> list[int]:
    """``"0,15,29"`` -> ``[0, 15, 29]``; ValueError unless distinct, increasing and in range."""
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"--layers takes layer indices joined by commas, e.g. 0,15,29; got {text!r}"
        ) from None
    if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= total:
        raise ValueError(f"--layers must be increasing distinct indices in [0, {total - 1}]; got {text!r}")
    return layers


def target_weights(target: LoadedModel) -> dict[str, torch.Tensor]:
    """The target's weights by Hugging Face name in float32 (a GGUF file's dequantized)."""
    from specdec.models.loading import read_state_dict

    if target.path.is_dir():
        state: dict[str, Any] = dict(read_state_dict(target.path))
    else:
        from specdec.models.gguf import load_gguf

        state = dict(load_gguf(target.path, torch.float32, quantized=False).state)
    return {k: v.float() for k, v in state.items() if isinstance(v, torch.Tensor)}


def draft_config(
    target: LoadedModel, layers: list[int], max_position_embeddings: int | None
) -> dict[str, Any]:
    """The target's Hugging Face configuration with only ``layers``."""
    raw = {k: v for k, v in target.config.raw.items() if k not in DROPPED_CONFIG}
    raw.update(
        architectures=[target.config.architecture],
        model_type=target.config.model_type,
        num_hidden_layers=len(layers),
        hidden_act="silu",
    )
    if isinstance(raw.get("layer_types"), list):  # per-layer attention kinds (newer configs)
        raw["layer_types"] = [raw["layer_types"][i] for i in layers]
    if max_position_embeddings is not None:
        raw["max_position_embeddings"] = max_position_embeddings
    return raw


def init_draft(
    target: LoadedModel, layers: list[int], max_position_embeddings: int | None = None
) -> PreTrainedModel:
    """A float32 draft of the target's architecture holding the target's embeddings, final norm,
    ``lm_head`` and decoder ``layers`` (renumbered 0 .. len(layers) - 1)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = draft_config(target, layers, max_position_embeddings)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights = target_weights(target)
    state = {}
    for key in model.state_dict():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
        source = f"model.layers.{layers[int(m[1])]}.{m[2]}" if m else key
        if source == "lm_head.weight" and source not in weights:  # tied in the target's checkpoint
            source = "model.embed_tokens.weight"
        if source not in weights:
            raise ValueError(f"{target.path}: no weight {source} to initialise the draft from")
        state[key] = weights[source]
    model.load_state_dict(state)
    return model


def load_init(folder: Path, target: LoadedModel) -> PreTrainedModel:
    """A draft saved earlier, in float32, to continue from (ValueError unless it shares the
    target's vocabulary); one that borrows the target's embeddings gets them back."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from specdec.models.loading import BORROWED, embedding_weights, read_state_dict

    try:
        config = AutoConfig.from_pretrained(folder)
        if getattr(config, BORROWED, None) == "target":
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            state = {k: v.float() for k, v in read_state_dict(folder).items()}
            if config.vocab_size == target.config.vocab_size:
                state.update(embedding_weights(target, config.tie_word_embeddings))
            model.load_state_dict(state, strict=False)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ValueError(f"--init {folder}: not a model folder ({str(e).splitlines()[0][:120]})") from None
    if model.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"--init {folder}: vocabulary of {model.config.vocab_size} tokens, the target has {target.config.vocab_size}"
        )
    return model


def freeze_embeddings(draft: PreTrainedModel) -> None:
    """Keep the draft's embedding table and ``lm_head`` (the target's) out of training."""
    draft.get_input_embeddings().requires_grad_(False)
    draft.get_output_embeddings().requires_grad_(False)


def draft_loss(
    draft: PreTrainedModel,
    target: LoadedModel,
    batch: ReplyBatch,
    ce_weight: float,
    distill: bool,
    subset: torch.Tensor | None = None,
    agreement: bool = True,
) -> tuple[torch.Tensor, float, float]:
    """The loss on one batch's reply positions, the mean KL(target || draft) and the draft's
    top-1 agreement with the target there (NaN without ``agreement``). With ``subset`` ``(N,)``
    token ids (the draft vocabulary the draft will score), both distributions are over those
    tokens only (the target's renormalised there) and the draft's top-1 is its best token of the
    subset, compared with the target's over the whole vocabulary."""
    device = draft.device
    mask = batch.mask.to(device)  # (B, W)
    head = draft.get_output_embeddings().weight  # (V, d)
    rows = head if subset is None else head[subset]  # (N, d)
    with autocast(device):
        hidden = draft.model(input_ids=batch.tokens.to(device)).last_hidden_state  # (B, W, d)
        student = (hidden[mask] @ rows.T).float()  # (P, N)
    with torch.no_grad():
        lm_head = target.module.lm_head
        final = batch.final.to(device)[mask].to(target.dtype)  # (P, d)
        full = lm_head(final).float() if subset is None or agreement else None  # (P, V)
        if full is None:
            teacher = (final @ lm_head.weight[subset].T).float()  # (P, N)
        else:
            teacher = full if subset is None else full[:, subset]  # (P, N)
    labels = batch.next_tokens.to(device)[mask]  # (P,)
    if subset is not None:  # the labels as positions in the subset (-100: not in it, ignored)
        where = torch.full((head.shape[0],), -100, dtype=torch.long, device=device)
        where[subset] = torch.arange(subset.numel(), device=device)
        labels = where[labels]
    parts = distill_loss(student[None], teacher[None], labels[None], ce_weight if distill else 1.0)
    best = student.argmax(-1) if subset is None else subset[student.argmax(-1)]  # (P,) token ids
    top1 = float((best == full.argmax(-1)).float().mean()) if full is not None else math.nan
    return parts.loss, float(parts.kl), top1


@torch.no_grad()
def evaluate(
    draft: PreTrainedModel, target: LoadedModel, batches: list[ReplyBatch], subset: torch.Tensor | None = None
) -> tuple[float, float]:
    """Mean KL(target || draft) and top-1 agreement over the validation batches."""
    draft.eval()
    kl, top1 = 0.0, 0.0
    for batch in batches:
        _, k, t = draft_loss(draft, target, batch, 0.0, True, subset)
        kl, top1 = kl + k, top1 + t
    draft.train()
    return kl / len(batches), top1 / len(batches)


def distill_on_replies(
    draft: PreTrainedModel,
    target: LoadedModel,
    train: list[ReplyConversation],
    val: list[ReplyConversation],
    cfg: TrainConfig,
    distill: bool = True,
    progress: bool = True,
    subset: torch.Tensor | None = None,
) -> DraftTrainLog:
    """Distil ``draft`` (in place) from the frozen ``target`` on its reply windows: AdamW, warm-up
    then cosine decay over ``cfg.max_steps`` or ``cfg.max_minutes``, whichever ends first;
    over the ``subset`` token ids only if given (:func:`draft_loss`)."""
    from tqdm import tqdm

    if not train or not val:
        raise ValueError(
            "the data has no training or no validation conversations; make more with 'specdec train data'"
        )
    target.module.requires_grad_(False)
    draft.train()
    optimizer = make_optimizer(draft, cfg)
    rng = random.Random(cfg.seed)
    val_batches = validation_windows(val, cfg.batch_size, cfg.seq_len)[: cfg.eval_batches]
    budget = cfg.max_minutes * 60.0 if cfg.max_minutes else math.inf
    log = DraftTrainLog()
    start = time.perf_counter()
    step = 0
    bar = tqdm(total=cfg.max_steps, desc="train draft", disable=not progress)

    def frac() -> float:
        return max(step / cfg.max_steps, (time.perf_counter() - start) / budget)

    def record_eval() -> None:
        kl, top1 = evaluate(draft, target, val_batches, subset)
        log.eval_steps.append(step)
        log.val_kl.append(kl)
        log.val_top1.append(top1)

    record_eval()
    while frac() < 1.0:
        lr = learning_rate(cfg, step, frac())
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample_reply_windows(train, cfg.batch_size, cfg.seq_len, rng)
        loss, kl, _ = draft_loss(draft, target, batch, cfg.ce_weight, distill, subset, agreement=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), cfg.grad_clip)
        optimizer.step()
        log.steps.append(step)
        log.train_loss.append(float(loss.detach()))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{log.train_loss[-1]:.3f}", kl=f"{kl:.3f}")
        if step % cfg.eval_interval == 0 and frac() < 1.0:
            record_eval()
    bar.close()
    record_eval()
    draft.eval().requires_grad_(False)
    return log


def save_draft(
    draft: PreTrainedModel, target: LoadedModel, out: Path, dtype: str, borrow_embeddings: bool = False
) -> None:
    """``draft`` in ``dtype`` as a Hugging Face folder with the target's tokenizer files; with
    ``borrow_embeddings`` without its embedding table, ``lm_head`` and tokenizer (the target's)."""
    import copy

    from safetensors.torch import save_file

    from specdec.models.loading import BORROWED

    out.mkdir(parents=True, exist_ok=True)
    if borrow_embeddings:
        config = draft.config.to_dict()
        config[BORROWED] = "target"
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        skip = ("model.embed_tokens.weight", "lm_head.weight")
        state = {
            k: v.detach().to(getattr(torch, dtype)).contiguous()
            for k, v in draft.state_dict().items()
            if k not in skip
        }
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    standalone = copy.deepcopy(draft).to(getattr(torch, dtype))
    if hasattr(standalone.config, BORROWED):  # continued from a draft that borrowed them
        delattr(standalone.config, BORROWED)
    standalone.save_pretrained(out)
    if target.path.is_dir():
        for name in TOKENIZER_FILES:
            if (target.path / name).is_file():
                shutil.copyfile(target.path / name, out / name)
    elif target.tokenizer is not None:
        target.tokenizer.save(out)


def _draft_vocab_ids(target: LoadedModel, size: int) -> torch.Tensor | None:
    """The ids the draft will score with ``--draft-vocab size`` (None for 0: every token);
    ValueError where the target has no draft_vocab.json."""
    from specdec.drafters.vocab import resolve_draft_vocab

    if size < 0:
        raise ValueError(f"--draft-vocab must be >= 0, got {size}")
    if size == 0:
        return None
    try:
        vocab = resolve_draft_vocab(target, size)
    except ModelLoadError as e:
        raise ValueError(f"--draft-vocab {size}: {e}") from None
    return None if vocab is None else vocab.ids


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags ``specdec train draft`` takes for a draft trained on self-distillation data."""
    p.add_argument(
        "--target", default=None, help="with --data: the frozen target (name, GGUF file or folder)"
    )
    p.add_argument("--data", type=Path, default=None, help="train on this 'specdec train data' folder")
    p.add_argument(
        "--layers", default=None, help="with --data: the target's layers the draft starts from, e.g. 0,15,29"
    )
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=0,
        help="with --data: train over the N most frequent tokens of the target's draft_vocab.json "
        "(draft with the same --draft-vocab N); 0: the whole vocabulary",
    )
    p.add_argument(
        "--own-embeddings",
        action="store_true",
        help="with --data: train the embedding table and lm_head and store them (default: the target's, frozen)",
    )


def run(args: argparse.Namespace, shape_defaults: dict[str, int]) -> int:
    """``train draft --data D``: ``shape_defaults`` are the corpus draft's shape flags, which a
    draft of the target's own shape refuses to change."""
    from specdec.cli import UserError
    from specdec.drafters.locate import heads_folder
    from specdec.models.loading import load_model
    from specdec.train.data import require_data

    if args.teacher is not None:
        raise UserError(
            "--teacher names the corpus draft's teacher; with --data name the target with --target"
        )
    if args.resume or args.max_files is not None:
        raise UserError(
            "--resume and --max-files are for the draft trained on the code corpus (without --data)"
        )
    changed = [name for name, value in shape_defaults.items() if getattr(args, name) != value]
    if changed:
        flag = "--" + changed[0].replace("_", "-")
        raise UserError(
            f"{flag}: a draft trained with --data has the target's shape; pick its layers with --layers"
        )
    if args.layers is not None and args.init is not None:
        raise UserError(
            "--layers picks the target's layers to start from; --init starts from a saved draft: choose one"
        )
    require_data(args.data)
    if not 0.0 <= args.ce_weight <= 1.0 or (args.no_distill and args.ce_weight):
        raise UserError("--ce-weight must be in [0, 1], and has no meaning with --no-distill")
    cfg = TrainConfig(
        seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr or 1e-3, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, max_steps=args.max_steps, max_minutes=args.max_minutes,
        weight_decay=args.weight_decay, eval_interval=args.eval_interval, eval_batches=args.eval_batches,
        ce_weight=args.ce_weight, seed=args.seed, save_dtype=args.save_dtype,
    )  # fmt: skip
    if (
        cfg.seq_len < 2
        or cfg.batch_size < 1
        or cfg.max_steps < 1
        or cfg.eval_interval < 1
        or cfg.eval_batches < 1
    ):
        raise UserError("--seq-len must be >= 2; --batch-size, --max-steps and the --eval flags >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        target = load_model(args.target or "smollm2", dtype="float32", device=args.device)
        total = target.config.num_hidden_layers
        layers = parse_layers(args.layers, total) if args.layers else evenly_spaced(total, args.num_layers)
        from specdec.train.replies import load_replies

        train = load_replies(args.data, target, "train")
        val = load_replies(args.data, target, "validation")
        if args.init is not None:
            draft, layers = load_init(args.init, target), []
        else:
            draft = init_draft(target, layers, args.max_position_embeddings)
        torch.nn.Module.to(
            draft, target.device
        )  # in place (transformers' .to() has an odd signature for mypy)
        if not args.own_embeddings:
            freeze_embeddings(draft)
        params = sum(p.numel() for p in draft.parameters() if p.requires_grad)
        tokens = sum(c.tokens.numel() for c in train)
        start_from = f"{args.init}" if args.init is not None else f"the target's layers {layers}"
        print(
            f"draft of {params / 1e6:.2f}M trained parameters from {start_from}; {len(train)} training conversations "
            f"({tokens} tokens), {len(val)} validation",
            flush=True,
        )
        subset = _draft_vocab_ids(target, args.draft_vocab)
        start = time.perf_counter()
        log = distill_on_replies(draft, target, train, val, cfg, distill=not args.no_distill, subset=subset)
    except (ModelLoadError, ValueError) as e:
        raise UserError(str(e)) from None
    out = args.out or heads_folder(target, "draft", for_writing=True)
    save_draft(draft, target, out, cfg.save_dtype, borrow_embeddings=not args.own_embeddings)
    report = {
        "config": asdict(cfg),
        "layers": layers,
        "init": str(args.init) if args.init is not None else None,
        "distilled": not args.no_distill,
        "embeddings": "own" if args.own_embeddings else "target",
        "draft_vocab": args.draft_vocab or None,
        "target": target.path.name,
        "data": {
            "folder": str(args.data),
            "conversations": len(train),
            "tokens": tokens,
            "validation": len(val),
        },
        "parameters": params,
        "seconds": round(time.perf_counter() - start, 1),
        "log": asdict(log),
    }
    (out / "training.json").write_text(json.dumps(report) + "\n")
    print(
        f"draft: validation KL(target || draft) {log.val_kl[0]:.3f} -> {log.val_kl[-1]:.3f}, top-1 agreement "
        f"{log.val_top1[0]:.2f} -> {log.val_top1[-1]:.2f}; saved to {out} (run it with --drafter draft --draft {out})"
    )
    return 0
