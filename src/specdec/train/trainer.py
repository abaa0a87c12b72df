"""Train a Llama-family causal LM on packed token sequences, as a Hugging Face checkpoint.

The model is a ``transformers.LlamaForCausalLM`` (Touvron et al. 2023), so every checkpoint is
a genuine Hugging Face folder. Documents are tokenized, each followed by ``<|endoftext|>``,
and concatenated into one stream; a training batch is ``B`` random windows of ``T + 1``
tokens drawn by a generator seeded with ``(seed, step)``, so a resumed run sees the very
batches an uninterrupted one would. AdamW (Loshchilov & Hutter 2019) with linear warm-up and
cosine decay (Loshchilov & Hutter 2017); the schedule's progress is the larger of
``step / max_steps`` and ``elapsed / max_minutes``, so a time budget still ends at the floor
learning rate. Matmuls run in bfloat16 autocast (CPU with AMX, or CUDA), weights and
optimizer state in float32.

With a ``teacher`` the student is distilled from it (:mod:`specdec.train.distill`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from specdec.models.loading import fast_bf16
from specdec.train.distill import cross_entropy, distill_loss
from specdec.train.tokenizer import copy_tokenizer_files, eos_id

if TYPE_CHECKING:  # imported where used: transformers takes ~1.5 s, and every CLI call builds this parser
    from transformers import LlamaConfig, LlamaForCausalLM

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 384
    num_layers: int = 8
    num_heads: int = 6
    num_kv_heads: int = 2
    intermediate_size: int = 1024
    max_position_embeddings: int = 2048

    def llama_config(self, vocab_size: int, eos_token_id: int) -> LlamaConfig:
        """A tied-embedding Llama configuration of this shape."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.hidden_size // self.num_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            eos_token_id=eos_token_id,
            bos_token_id=None,
            pad_token_id=None,
        )


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    max_steps: int = 10_000
    max_minutes: float | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 200
    eval_batches: int = 16
    ce_weight: float = 0.0  # distillation only: weight of the data's cross-entropy
    seed: int = 0
    save_dtype: str = "bfloat16"


@dataclass(frozen=True)
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)


def pack_documents(texts: list[str], tok: Tokenizer) -> torch.Tensor:
    """Token ids of all documents, each followed by ``<|endoftext|>``: ``(N,)`` int64."""
    end = eos_id(tok)
    ids: list[int] = []
    for encoding in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(end)
    return torch.tensor(ids, dtype=torch.long)


def batch_at(stream: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """The training windows of ``step``: ``(B, T + 1)``, the same on every run and resume."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=gen)  # (B,)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])


def eval_windows(
    stream: torch.Tensor, seq_len: int, batch_size: int, max_batches: int
) -> Iterator[torch.Tensor]:
    """Consecutive non-overlapping windows ``(B, T + 1)`` from the start of ``stream``."""
    n = min((len(stream) - 1) // seq_len, batch_size * max_batches)
    for first in range(0, n, batch_size):
        rows = range(first, min(first + batch_size, n))
        yield torch.stack([stream[r * seq_len : r * seq_len + seq_len + 1] for r in rows])


def autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bfloat16 autocast where :func:`fast_bf16`, else a no-op (float32)."""
    if fast_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_loss(
    model: LlamaForCausalLM, stream: torch.Tensor, seq_len: int, batch_size: int = 16, max_batches: int = 16
) -> float:
    """Mean next-token cross-entropy (nats) over the first windows of ``stream``."""
    was_training = model.training
    model.eval()
    device = model.device
    total, count = 0.0, 0
    for window in eval_windows(stream, seq_len, batch_size, max_batches):
        window = window.to(device)
        with autocast(device):
            logits = model(window[:, :-1]).logits  # (B, T, V)
        total += cross_entropy(logits, window[:, 1:]).item() * window.shape[0]
        count += window.shape[0]
    model.train(was_training)
    return total / max(count, 1)


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``."""
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=False)


def new_model(shape: ModelShape, tok: Tokenizer, seed: int) -> LlamaForCausalLM:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(shape.llama_config(tok.get_vocab_size(), eos_id(tok)))


def save_checkpoint(
    model: LlamaForCausalLM,
    optimizer: torch.optim.Optimizer,
    out_dir: Path,
    step: int,
    elapsed: float,
    cfg: TrainConfig,
) -> None:
    """Model (float32, Hugging Face format) + optimizer + step + elapsed time + RNG states."""
    folder = out_dir / CHECKPOINT
    model.save_pretrained(folder)
    state = {
        "step": step,
        "elapsed": elapsed,
        "optimizer": optimizer.state_dict(),
        "config": asdict(cfg),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    tmp = folder / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(folder / STATE_FILE)


def load_checkpoint(out_dir: Path, device: torch.device) -> tuple[LlamaForCausalLM, dict[str, object]]:
    """The model and trainer state saved by :func:`save_checkpoint` under ``out_dir``."""
    folder = out_dir / CHECKPOINT
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"no checkpoint to resume in {folder}")
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.nn.Module.to(model, device)  # in place (transformers' own .to() has an odd signature for mypy)
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    return model, state


def save_final(model: LlamaForCausalLM, out_dir: Path, tokenizer_dir: Path, dtype: str) -> None:
    """The finished model in ``dtype`` with the tokenizer files, ready for ``load_model``."""
    final = copy.deepcopy(model).to(getattr(torch, dtype))
    final.save_pretrained(out_dir)
    copy_tokenizer_files(tokenizer_dir, out_dir)


def train(
    model: LlamaForCausalLM,
    train_stream: torch.Tensor,
    val_stream: torch.Tensor,
    cfg: TrainConfig,
    out_dir: Path,
    tokenizer_dir: Path,
    teacher: LlamaForCausalLM | None = None,
    state: dict[str, object] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` (in place) and save it to ``out_dir``; distil from ``teacher`` if given.

    ``state`` is a trainer state from :func:`load_checkpoint` to resume from.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    device = model.device
    model.train()
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    optimizer = make_optimizer(model, cfg)
    step, elapsed_before = 0, 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        step, elapsed_before = int(str(state["step"])), float(str(state["elapsed"]))
        torch.set_rng_state(state["torch_rng"])  # type: ignore[arg-type]
        random.setstate(state["python_rng"])  # type: ignore[arg-type]
    budget = cfg.max_minutes * 60.0 if cfg.max_minutes else math.inf
    log = (out_dir / LOG_FILE).open("a")
    write = _logger(log)
    start = time.perf_counter()
    train_losses: list[float] = []
    val_losses: list[tuple[int, float]] = []
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not progress, mininterval=5.0, dynamic_ncols=True)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    def frac() -> float:
        return max(step / cfg.max_steps, elapsed() / budget)

    while frac() < 1.0:
        lr = learning_rate(cfg, step, frac())
        for group in optimizer.param_groups:
            group["lr"] = lr
        window = batch_at(train_stream, step, cfg.batch_size, cfg.seq_len, cfg.seed).to(device)
        inputs, targets = window[:, :-1], window[:, 1:]  # (B, T) each
        with autocast(device):
            logits = model(inputs).logits  # (B, T, V)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(inputs).logits  # (B, T, V)
        if teacher is not None:
            parts = distill_loss(logits, teacher_logits, targets, cfg.ce_weight)
            loss, shown = parts.loss, {"kl": parts.kl.item(), "ce": parts.ce.item()}
        else:
            loss = cross_entropy(logits, targets)
            shown = {"ce": loss.item()}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        train_losses.append(loss.item())
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()} | {"lr": f"{lr:.2e}"}, refresh=False)
        if step % cfg.eval_interval == 0 or frac() >= 1.0:
            val = evaluate_loss(model, val_stream, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
            val_losses.append((step, val))
            tokens = step * cfg.batch_size * cfg.seq_len
            record: dict[str, object] = {"step": step, "tokens": tokens, "seconds": round(elapsed(), 1)}
            write(record | {"lr": lr, "val_loss": val} | shown)
            bar.write(
                f"step {step}: val_loss {val:.4f} train {shown} ({tokens} tokens, {elapsed() / 60:.1f} min)"
            )
            save_checkpoint(model, optimizer, out_dir, step, elapsed(), cfg)
    bar.close()
    log.close()
    save_final(model, out_dir, tokenizer_dir, cfg.save_dtype)
    return TrainResult(step, step * cfg.batch_size * cfg.seq_len, elapsed(), train_losses, val_losses)


def _logger(handle: object) -> Callable[[dict[str, object]], None]:
    def write(record: dict[str, object]) -> None:
        handle.write(json.dumps(record) + "\n")  # type: ignore[attr-defined]
        handle.flush()  # type: ignore[attr-defined]

    return write
