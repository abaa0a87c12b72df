"""Small trained modules that turn a frozen target into its own drafter, and their files.

Three kinds, one per drafter; all feed the target's frozen ``lm_head`` (Medusa-1 style heads
with a shared vocabulary projection keep each head at ``d*d`` parameters, so the shipped files
stay small):

* :class:`ExitHead` — early exit after layer ``L`` (Elhoushi et al. 2024, LayerSkip, Sec. 3;
  Zhang et al. 2023, Draft & Verify): ``lm_head(x + W x)`` with ``x = RMSNorm(h_L)``; the norm
  starts as the target's final norm and ``W`` at zero, i.e. "the target's head on layer L".
* :class:`MedusaHeads` — K residual SiLU blocks on the target's last hidden state (Cai et al.
  2024, Medusa, Sec. 2.1.1): head ``k`` (0-based) predicts the token ``k + 2`` places after the
  hidden state's token; ``W`` starts at zero, as in the paper.
* :class:`EagleHead` — EAGLE's auto-regression head (Li et al. 2024, Sec. 4.1): ``fc`` maps
  ``concat(embed(x_{t+1}), f_t)`` to ``d``, one decoder layer predicts the feature ``f_{t+1}``;
  features are the target's final normed hidden states, so ``lm_head(f)`` are logits.

A head folder holds ``config.json`` (``method`` plus the sizes) and ``model.safetensors``; the
drafters look for ``<target folder>/<method>/`` by default.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specdec import kernels
from specdec.cache import KVCache
from specdec.models.config import ModelConfig, ModelLoadError
from specdec.models.llama import (
    DecoderLayer,
    Linear,
    RMSNorm,
    Transformer,
    causal_mask,
    check_feature_layers,
    compact_copies,
    rope_inv_freq,
)
from specdec.sampling import SamplingParams, chain_draws, logits_to_probs, sample, spread_rows

METHODS = ("early-exit", "medusa", "eagle")


class ExitHead(nn.Module):
    """Exit head after the first ``exit_layer`` decoder layers of the target."""

    method = "early-exit"

    def __init__(self, cfg: ModelConfig, exit_layer: int) -> None:
        super().__init__()
        if not 1 <= exit_layer < cfg.num_hidden_layers:
            raise ValueError(f"exit_layer must be in [1, {cfg.num_hidden_layers - 1}], got {exit_layer}")
        self.exit_layer = exit_layer
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        nn.init.zeros_(self.proj.weight)

    def init_from(self, target: Transformer) -> ExitHead:
        """Start as the target's own final norm (the adapter is zero)."""
        with torch.no_grad():
            self.norm.weight.copy_(target.model.norm.weight.float())
        return self

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Layer-L hidden states ``(..., d)`` -> features for the target's ``lm_head`` ``(..., d)``."""
        x: torch.Tensor = self.norm(h)
        adapter: torch.Tensor = self.proj(x)
        return x + adapter

    def settings(self) -> dict[str, Any]:
        return {"exit_layer": self.exit_layer}


class MedusaHeads(nn.Module):
    """``num_heads`` residual blocks ``x + SiLU(W x + b)``; head ``k`` looks ``k + 2`` ahead."""

    method = "medusa"

    def __init__(self, cfg: ModelConfig, num_heads: int) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.num_heads = num_heads
        blocks = [Linear(cfg.hidden_size, cfg.hidden_size) for _ in range(num_heads)]
        for block in blocks:
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``(..., d)`` -> one feature per head ``(..., num_heads, d)``."""
        return torch.stack([h + F.silu(block(h)) for block in self.blocks], dim=-2)

    def settings(self) -> dict[str, Any]:
        return {"num_heads": self.num_heads}


class EagleHead(nn.Module):
    """One feature-level autoregressive decoder layer with its own KV cache.

    With ``feature_layers`` (EAGLE-3, Li et al. 2025, Sec. 3.3) the target's feature at a token is
    the outputs of those decoder layers and its final normed hidden state, concatenated, and
    ``fuse`` maps them to one ``d``-vector (:meth:`target_features`); without, the final normed
    hidden state alone (EAGLE-1). Either way the head reads and predicts ``d``-vectors."""

    method = "eagle"
    inv_freq: torch.Tensor  # (D/2,) a buffer: RoPE frequencies

    def __init__(
        self, cfg: ModelConfig, intermediate_size: int | None = None, feature_layers: tuple[int, ...] = ()
    ) -> None:
        """``cfg``: the target's configuration; the layer's MLP width defaults to the target's."""
        super().__init__()
        if intermediate_size is not None:
            cfg = dataclasses.replace(cfg, intermediate_size=intermediate_size)
        self.config = cfg
        self.feature_layers = check_feature_layers(tuple(feature_layers), cfg.num_hidden_layers)
        d = cfg.hidden_size
        self.fuse = Linear((len(feature_layers) + 1) * d, d, bias=False) if feature_layers else None
        self.fc = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.layer = DecoderLayer(cfg, layer_idx=0)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self._kernel_weights: tuple[Any, ...] | None = None  # (key, float32 weights, compact weights)

    def target_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's input features ``(..., d)`` from the target's rows ``(..., (n + 1) d)``
        (``n = len(feature_layers)``; see :class:`DrafterCapabilities`)."""
        return hidden if self.fuse is None else self.fuse(hidden.to(self.fuse.weight.dtype))

    def new_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        cfg, p = self.config, self.fc.weight
        return KVCache(
            1, batch_size, cfg.num_key_value_heads, max_seq_len, cfg.head_dim, dtype=p.dtype, device=p.device
        )

    def forward(
        self,
        token_embeds: torch.Tensor,  # (B, T, d) embeddings of x_{t+1}
        features: torch.Tensor,  # (B, T, d) features f_t
        input_pos: torch.Tensor,  # (B, T) positions t
        cache: KVCache,
        attn_mask: torch.Tensor | None = None,  # (B, T, S) bool
        cache_slots: torch.Tensor | None = None,  # (B, T); defaults to input_pos
    ) -> torch.Tensor:
        """Predicted features ``f_{t+1}`` ``(B, T, d)``; writes keys/values at ``cache_slots``."""
        inputs = torch.cat([token_embeds, features], dim=-1)  # (B, T, 2d)
        copies = self._kernel_copies(inputs)
        x = kernels.linear(inputs, copies[0]) if copies is not None else self.fc(inputs)  # (B, T, d)
        if attn_mask is None:
            mask = causal_mask(input_pos, int(input_pos.max()) + 1)  # (B, 1, T, S)
        else:
            mask = attn_mask[:, None]
        slots = input_pos if cache_slots is None else cache_slots
        if copies is not None:  # the layer below in one C++ call (inference on a CPU)
            cfg, weights = self.config, copies[1]
            return kernels.decoder_layers(
                x, input_pos, self.inv_freq, cache.k, cache.v, slots, mask, mask.shape[-1], 0, 1, weights,
                cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps,
            )  # fmt: skip
        freqs = input_pos[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        return self.layer(x, cos, sin, cache, slots, mask)  # type: ignore[no-any-return]

    def draft_chain(
        self,
        tokens: torch.Tensor,  # (T,) x_{t+1} of entries start..
        features: torch.Tensor,  # (T, d) f_t of those entries
        start: int,
        num_tokens: int,
        cache: KVCache,
        embed: torch.Tensor,  # (V, d) the target's embedding
        rows: tuple[torch.Tensor | None, torch.Tensor],  # ((N,) ids or None, (N, d) lm_head rows)
        sampling: SamplingParams,
        generator: torch.Generator | None,
        vocab_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """EAGLE's chain in one C++ call, or None where the kernels do not apply (the caller then
        runs its own loop): feed entries ``start..`` from ``tokens`` and ``features``, then
        ``num_tokens`` times pick a draft from ``rows`` on the last predicted feature and feed it
        with that feature, all but the last. Greedy picks the argmax; sampling draws (by inverse
        transform, with a uniform from ``generator``) from the distribution
        ``sampling.logits_to_probs`` makes of the logits. Returns the ``(K,)`` drafts and, when
        sampling, those ``(K, V)`` distributions (zero outside the rows' ids; None when greedy).
        The cache's slots beyond ``start + T`` are the drafts' (the caller rolls back)."""
        copies = self._kernel_copies(features[-1:])  # the few-row copies, whatever T is
        if copies is None:
            return None
        cfg, (fc, weights), (ids, head) = self.config, copies, rows
        common = (
            tokens,
            features,
            start,
            num_tokens,
            self.inv_freq,
            embed,
            fc,
            cache.k,
            cache.v,
            weights,
            head,
            ids,
        )
        shape = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps)
        if sampling.greedy:
            return kernels.eagle_greedy(*common, *shape), None
        drafts, probs = kernels.eagle_sample(*common, *chain_draws(sampling, num_tokens, generator), *shape)
        return drafts, spread_rows(probs, ids, vocab_size)

    def _kernel_copies(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]] | None:
        """``(fc weight, the layer's weights in kernels.decoder_layers' order)`` for the kernels,
        or None where they do not apply (autograd, another device, no kernels). q/k/v and gate/up
        are fused into copies; for passes of up to ``kernels.MAX_ROWS`` tokens every product
        weight is its exact bfloat16 copy where all have one (a head saved in bfloat16: the same
        bits from half the bytes, as :meth:`Transformer.fuse` does for the target). Remade
        whenever a parameter changes, so training the head stays possible."""
        if not kernels.fused_layers_apply(inputs):
            return None
        params = [self.fc.weight, *self.layer.parameters()]
        key = tuple((p.data_ptr(), p._version) for p in params)
        if self._kernel_weights is None or self._kernel_weights[0] != key:
            weights = self.layer.kernel_weights()
            copies = compact_copies(weights, [self.fc.weight])
            compact, (fc,) = copies if copies is not None else (weights, [self.fc.weight])
            self._kernel_weights = (key, (self.fc.weight, weights), (fc, compact))
        rows = inputs.numel() // inputs.shape[-1]
        chosen: tuple[torch.Tensor, list[torch.Tensor | None]]
        chosen = self._kernel_weights[2] if rows <= kernels.MAX_ROWS else self._kernel_weights[1]
        return chosen

    def settings(self) -> dict[str, Any]:
        fused = {"feature_layers": list(self.feature_layers)} if self.feature_layers else {}
        return {"intermediate_size": self.config.intermediate_size, **fused}


Head = ExitHead | MedusaHeads | EagleHead


def new_head(method: str, cfg: ModelConfig, **settings: Any) -> Head:
    """A freshly initialised head of ``method`` for a target with configuration ``cfg``."""
    if method == "early-exit":
        return ExitHead(cfg, int(settings.get("exit_layer") or max(1, cfg.num_hidden_layers // 2)))
    if method == "medusa":
        return MedusaHeads(cfg, int(settings.get("num_heads") or 4))
    if method == "eagle":
        size, layers = settings.get("intermediate_size"), settings.get("feature_layers") or ()
        return EagleHead(cfg, None if size is None else int(size), tuple(int(i) for i in layers))
    raise ValueError(f"unknown head method {method!r}; choose {', '.join(METHODS)}")


def save_head(head: Head, folder: str | Path, cfg: ModelConfig, dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (in ``dtype``, default the head's own)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"method": head.method, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size}
    meta.update(head.settings())
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    return folder


def load_head(
    folder: str | Path, cfg: ModelConfig, method: str, dtype: torch.dtype, device: torch.device | str
) -> Head:
    """Load a head saved by :func:`save_head`, checking it was trained for this target's sizes."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"no {method} heads in {folder}; train them with "
            f"'specdec train heads --method {method} --target <target> --out {folder}'"
        )
    meta = json.loads(config_path.read_text())
    if meta.get("method") != method:
        raise ModelLoadError(f"{folder} holds {meta.get('method')!r} heads, not {method!r}")
    if (meta.get("hidden_size"), meta.get("vocab_size")) != (cfg.hidden_size, cfg.vocab_size):
        raise ModelLoadError(
            f"{folder}: heads were trained for hidden size {meta.get('hidden_size')} / vocabulary "
            f"{meta.get('vocab_size')}, the target has {cfg.hidden_size} / {cfg.vocab_size}"
        )
    settings = {k: v for k, v in meta.items() if k not in ("method", "hidden_size", "vocab_size")}
    head = new_head(method, cfg, **settings)
    head.load_state_dict(load_file(str(folder / "model.safetensors")))
    head = head.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if isinstance(head, EagleHead):  # keep the rotary frequencies in float32, as the target does
        head.inv_freq = rope_inv_freq(cfg).to(device)
    return head


def resolve_head(
    head: Head | str | Path | None,
    target_path: Path,
    cfg: ModelConfig,
    method: str,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Head:
    """A head object as given (a copy in the target's dtype and device if it is in others), else
    loaded from ``head`` (a folder) or ``<target>/<method>/``."""
    if isinstance(head, nn.Module):
        p = next(head.parameters())
        if p.dtype == dtype and p.device == torch.device(device):
            return head
        moved: Head = copy.deepcopy(head).to(device=device, dtype=dtype)
        return moved
    return load_head(head if head is not None else target_path / method, cfg, method, dtype, device)


def pick_tokens(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft tokens ``(K,)`` from head logits ``(K, V)``: the argmax when greedy, else samples,
    returned with the exact distributions ``(K, V)`` they were drawn from (for rejection
    sampling)."""
    if sampling.greedy:
        return logits.argmax(-1), None
    draft_probs = logits_to_probs(logits, sampling)  # (K, V) float32
    return sample(draft_probs, generator), draft_probs
