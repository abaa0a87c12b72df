"""A lean Llama-family decoder (Llama 1-3, Mistral, Qwen2) for speculative decoding.

Touvron et al. 2023 (Llama), with grouped-query attention (Ainslie et al. 2023), SwiGLU
(Shazeer 2020), RMSNorm and rotary embeddings (Su et al. 2021; Llama-3 frequency scaling).
Parameter names follow Hugging Face's so a checkpoint's state dict loads as it is, and a
model saved by specdec loads in ``transformers``.

Every forward pass reads and writes a preallocated :class:`~specdec.cache.KVCache`:
``forward(tokens, input_pos, cache, attn_mask=None)``. ``input_pos`` are the RoPE positions;
``cache_slots`` (defaults to ``input_pos``) are where the new keys/values go; a tree of draft
tokens passes distinct slots and positions plus its own attention mask.

A model loaded quantized from a GGUF file (:meth:`Transformer.use_quantized`) holds its matrices
in their block formats: :class:`~specdec.kernels.quant.QuantLinear` for the products (the
tied ``lm_head`` on the embedding's blocks), :class:`~specdec.kernels.quant.QuantEmbedding`
for the lookup, norms in float32, activations in float32. A file may store a layer's q, k and
v (or gate and up) in different formats (a Q4_K_M file keeps v in Q6_K): those stay apart and
the one-call forward multiplies each with its own format's kernel
(:meth:`DecoderLayer.kernel_weights`).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from specdec import kernels
from specdec.cache import KVCache
from specdec.kernels.quant import QuantEmbedding, QuantLinear, QuantWeight, quant_linear
from specdec.models.config import ModelConfig
from specdec.sampling import SamplingParams, chain_draws, spread_rows

DEFAULT_CACHE_SLOTS = 8192


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose few-row products take
    :func:`specdec.kernels.linear` on CPUs where BLAS is slow for them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return kernels.rms_norm(x, self.weight, self.eps)
        # Normalise in float32, cast back, then scale: the order Hugging Face uses.
        normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse rotary frequencies ``(D/2,)``, with Llama-3 or linear scaling if configured.
    Computed on the CPU even inside ``torch.device("meta")`` (where load_model builds the module):
    ops on meta tensors run Python kernels that import torch._dynamo (about 1 s per process)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, blended, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    return inv_freq.float()


Weight = torch.Tensor | QuantWeight  # a float matrix, or one kept in a GGUF block format


def matmul(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a float or a quantized ``weight`` ``(N, K)``: (..., K) -> (..., N)."""
    if isinstance(weight, QuantWeight):
        return quant_linear(x, weight, bias)
    return kernels.linear(x, weight, bias)


def kernel_tensor(weight: Weight) -> torch.Tensor:
    """``weight`` as the one-call forward reads it (a quantized one as its block view)."""
    return weight.kernel_view() if isinstance(weight, QuantWeight) else weight


def fuse_quantized(*linears: QuantLinear) -> tuple[QuantWeight, torch.Tensor | None] | None:
    """:func:`fuse_linears` for quantized layers: their blocks stacked row-wise (blocks are
    row-wise, so each layer's weight becomes a view of the fused one), or None where their
    formats differ (the layers then stay apart)."""
    if len({lin.qweight.qtype for lin in linears}) != 1:
        return None
    fused = QuantWeight.cat([lin.qweight for lin in linears])
    has_bias = [lin.bias is not None for lin in linears]
    if any(has_bias) and not all(has_bias):
        raise ValueError("fuse_quantized: either all layers have a bias or none")
    bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None  # type: ignore[union-attr]
    start = 0
    for lin in linears:
        n = lin.out_features
        lin.set_qweight(fused.rows(start, n))
        if bias is not None:
            lin.bias = nn.Parameter(bias[start : start + n], requires_grad=False)
        start += n
    return fused, bias


def fuse_any(*linears: nn.Module) -> tuple[Weight, torch.Tensor | None] | None:
    """The fused weight of float layers (:func:`fuse_linears`) or of quantized ones
    (:func:`fuse_quantized`); None for a mix, or quantized layers of different formats."""
    if all(isinstance(lin, QuantLinear) for lin in linears):
        return fuse_quantized(*linears)  # type: ignore[arg-type]
    if all(isinstance(lin, nn.Linear) for lin in linears):
        return fuse_linears(*linears)  # type: ignore[arg-type]
    return None


def fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of ``linears`` into one matrix and make each
    layer's parameters views into it; returns ``(weight, bias)`` of the fused product."""
    weight = torch.cat([lin.weight.detach() for lin in linears])  # (sum N_i, K)
    has_bias = [lin.bias is not None for lin in linears]
    if any(has_bias) and not all(has_bias):
        raise ValueError("fuse_linears: either all layers have a bias or none")
    bias = torch.cat([lin.bias.detach() for lin in linears]) if all(has_bias) else None  # type: ignore[union-attr]
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[start : start + n], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start : start + n], requires_grad=False)
        start += n
    return weight, bias


# The slots of a layer's kernel weights that hold product matrices (DecoderLayer.kernel_weights).
PRODUCT_SLOTS = (1, 3, 5, 6, 7, 8, 9)


def compact_copies(
    weights: list[torch.Tensor | None], extra: list[torch.Tensor]
) -> tuple[list[torch.Tensor | None], list[torch.Tensor]] | None:
    """``weights`` (``kernels.LAYER_WEIGHTS`` per layer, the order ``kernels.decoder_layers``
    reads) with every product matrix swapped for its exact bfloat16 copy, and the copies of the
    ``extra`` matrices; None if one of them has none (a model keeps one kernel path). Widening
    back is exact, so the kernels give the same bits from half the bytes."""
    products = [
        i for i, w in enumerate(weights) if i % kernels.LAYER_WEIGHTS in PRODUCT_SLOTS and w is not None
    ]
    copies = []
    for weight in [*(weights[i] for i in products), *extra]:
        copy = kernels.exact_bfloat16(weight)  # type: ignore[arg-type]
        if copy is None:
            return None
        copies.append(copy)
    compact = list(weights)
    for i, copy in zip(products, copies, strict=False):
        compact[i] = copy
    return compact, copies[len(products) :]


def project_rows(h: torch.Tensor, compact: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``h @ weight.T`` for hidden states ``h`` ``(..., d)`` and output rows ``weight`` ``(N, d)``:
    a few float32 rows read ``compact``, the kernels' exact bfloat16 copy of ``weight`` (the same
    values from half the bytes); everything else reads ``weight`` itself."""
    rows = h.numel() // h.shape[-1]
    if compact.dtype != h.dtype and h.dtype == torch.float32 and kernels.fused_layers_apply(h):
        if 0 < rows <= kernels.MAX_ROWS:
            return kernels.linear(h, compact)
    return kernels.linear(h, weight)


def check_feature_layers(layers: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """``layers`` if they increase within ``0 .. num_layers - 1`` (the decoder layers whose
    outputs a pass returns, see :meth:`Transformer.forward`), else ValueError."""
    if list(layers) != sorted(set(layers)) or any(not 0 <= i < num_layers for i in layers):
        raise ValueError(
            f"feature layers must increase within the target's {num_layers} layers, got {list(layers)}"
        )
    return tuple(layers)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, d, bias=False)
        self.qkv: tuple[Weight, torch.Tensor | None] | None = None  # fused, see fuse()

    def fuse(self) -> None:
        """Store q/k/v weights in one matrix (the three parameters become views of it) so a
        pass makes one product instead of three; state-dict names and values are unchanged.
        Quantized layers of different formats stay apart (``qkv`` None): the one-call forward
        multiplies them as parts of one product (:meth:`DecoderLayer.kernel_weights`)."""
        self.qkv = fuse_any(self.q_proj, self.k_proj, self.v_proj)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, d)
        cos: torch.Tensor,  # (B, 1, T, D)
        sin: torch.Tensor,  # (B, 1, T, D)
        cache: KVCache,
        slots: torch.Tensor,  # (B, T)
        mask: torch.Tensor | None,  # (B, 1, T, S) bool, True = may attend; None = all S slots
        kv_len: int | None = None,  # slots read; default mask.shape[-1]
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        if self.qkv is not None:
            qkv = matmul(x, *self.qkv).view(B, T, H + 2 * Hkv, D).transpose(1, 2)  # (B, H+2Hkv, T, D)
            qk, v = qkv.split([H + Hkv, Hkv], dim=1)
            qk = qk * cos + rotate_half(qk) * sin  # RoPE on queries and keys in one go
            q, k = qk.split([H, Hkv], dim=1)  # (B, H, T, D), (B, Hkv, T, D)
        else:
            q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        cache.write(self.layer_idx, slots, k, v)
        S = kv_len if kv_len is not None else mask.shape[-1]  # type: ignore[union-attr]
        keys, values = cache.read(self.layer_idx, S)  # (B, Hkv, S, D)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads
        )  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, bias=False)
        self.up_proj = Linear(d, f, bias=False)
        self.down_proj = Linear(f, d, bias=False)
        self.gate_up: tuple[Weight, torch.Tensor | None] | None = None  # fused, see fuse()

    def fuse(self) -> None:
        self.gate_up = fuse_any(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = matmul(x, *self.gate_up).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a :class:`Linear` or :class:`~specdec.kernels.quant.QuantLinear` as the
    one-call forward reads it."""
    return layer.qweight.kernel_view() if isinstance(layer, QuantLinear) else layer.weight  # type: ignore[return-value]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def kernel_weights(self) -> list[torch.Tensor | None]:
        """The ``kernels.LAYER_WEIGHTS`` (10) weights ``kernels.decoder_layers`` reads per layer,
        in its order: input norm, q/k/v weight, q/k/v bias (or None), o_proj, post-attention norm,
        gate/up weight, down_proj, then the k, v and up parts (None where q/k/v and gate/up are
        one matrix). The matrices :meth:`Attention.fuse` / :meth:`MLP.fuse` made where they exist;
        else concatenated copies of float layers (which leave the parameters as they are,
        trainable); else, for quantized layers of different formats, which cannot be one matrix,
        the parts: q in the q/k/v slot with k and v at the end (gate and up likewise), each
        multiplied with its own format's kernel into its columns of the fused output. Quantized
        matrices come as their block views (:func:`kernel_tensor`)."""
        attn, mlp = self.self_attn, self.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        has_bias = attn.q_proj.bias is not None
        k_part = v_part = up_part = None
        if attn.qkv is not None:
            qkv_weight, qkv_bias = kernel_tensor(attn.qkv[0]), attn.qkv[1]
        elif all(isinstance(lin, nn.Linear) for lin in projections):
            qkv_weight = torch.cat([lin.weight.detach() for lin in projections])
            qkv_bias = torch.cat([lin.bias.detach() for lin in projections]) if has_bias else None  # type: ignore[union-attr]
        else:
            qkv_weight, k_part, v_part = (linear_weight(lin) for lin in projections)
            qkv_bias = torch.cat([lin.bias.detach() for lin in projections]) if has_bias else None  # type: ignore[union-attr]
        if mlp.gate_up is not None:
            gate_up = kernel_tensor(mlp.gate_up[0])
        elif all(isinstance(lin, nn.Linear) for lin in (mlp.gate_proj, mlp.up_proj)):
            gate_up = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()])
        else:
            gate_up, up_part = linear_weight(mlp.gate_proj), linear_weight(mlp.up_proj)
        return [
            self.input_layernorm.weight, qkv_weight, qkv_bias, linear_weight(attn.o_proj),
            self.post_attention_layernorm.weight, gate_up, linear_weight(mlp.down_proj), k_part, v_part, up_part,
        ]  # fmt: skip

    def forward(self, x, cos, sin, cache, slots, mask, kv_len=None):  # type: ignore[no-untyped-def]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, slots, mask, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Named ``model`` inside :class:`Transformer` so state-dict keys match Hugging Face's."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Weights come from a checkpoint (or the caller draws them): no N(0, 1) draw here, which
        # on the meta device load_model builds on imports torch._dynamo (see rope_inv_freq).
        table = torch.zeros(cfg.vocab_size, cfg.hidden_size)  # (V, d)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=table)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def causal_mask(input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Chain mask ``(B, 1, T, S)``: the token at position p sees slots 0..p."""
    slots = torch.arange(kv_len, device=input_pos.device)
    return (slots[None, None, :] <= input_pos[:, :, None])[:, None]


class Transformer(nn.Module):
    inv_freq: torch.Tensor  # (D/2,) buffer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head: Linear | QuantLinear = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self._layer_weights: list[torch.Tensor | None] | None = None  # set by fuse()
        # (embedding, lm_head) the kernels read, set by fuse(); a tuple, so not registered as parameters
        self._kernel_io: tuple[torch.Tensor, torch.Tensor] | None = None
        # The same for prefill (more than kernels.MAX_ROWS tokens, torch's BLAS): the float32
        # originals, which BLAS reads as they are (the bfloat16 copies would be widened per pass).
        self._prefill_weights: list[torch.Tensor | None] | None = None
        self._prefill_io: tuple[torch.Tensor, torch.Tensor] | None = None

    def fuse(self) -> None:
        """Fuse q/k/v and gate/up projections for inference (see :meth:`Attention.fuse`).
        Parameters stay in place as views, so heads and the state dict see the same names.

        Also lists the weights the one-call CPU forward reads (``kernels.model_forward``): each
        float32 matrix that holds only bfloat16 values (a bfloat16 checkpoint loaded in float32)
        as its exact bfloat16 copy, which gives bit-identical results from half the bytes.
        Quantized q/k/v (or gate/up) of different formats stay apart and run as parts of one
        product (:meth:`DecoderLayer.kernel_weights`)."""
        weights: list[torch.Tensor | None] = []
        for layer in self.decoder_layers():
            layer.self_attn.fuse()
            layer.mlp.fuse()
            weights += layer.kernel_weights()
        self._layer_weights = weights  # kernels.LAYER_WEIGHTS per layer, in decoder_layers' order
        embed = self.model.embed_tokens
        embed_weight = embed.qweight.kernel_view() if isinstance(embed, QuantEmbedding) else embed.weight
        head = self.lm_head
        tied = (
            isinstance(head, QuantLinear)
            and isinstance(embed, QuantEmbedding)
            and head.qweight is embed.qweight
        )
        self._kernel_io = (embed_weight, embed_weight if tied else linear_weight(head))
        self._prefill_weights, self._prefill_io = weights, self._kernel_io
        self._compact_weights()

    def decoder_layers(self) -> list[DecoderLayer]:
        """The decoder layers, typed."""
        return [cast(DecoderLayer, layer) for layer in self.model.layers]

    def use_quantized(self, weights: dict[str, QuantWeight]) -> None:
        """Swap the layers whose weights are given (Hugging Face names, ``model.layers.0.self_attn.
        q_proj.weight``, ``model.embed_tokens.weight``, ``lm_head.weight``) for their stand-ins on
        GGUF blocks (:class:`QuantLinear`, :class:`QuantEmbedding`), keeping biases; a tied
        ``lm_head`` then runs on the embedding's blocks. Call before :meth:`fuse`."""
        for name, qweight in weights.items():
            parent_name, _, attr = name.removesuffix(".weight").rpartition(".")
            parent = self.get_submodule(parent_name)
            old = getattr(parent, attr)
            if isinstance(old, nn.Embedding):
                setattr(parent, attr, QuantEmbedding(qweight))
            elif isinstance(old, nn.Linear):
                setattr(parent, attr, QuantLinear(qweight, old.bias))
            else:
                raise ValueError(f"use_quantized: {name} is not the weight of a linear layer or an embedding")
        embed = self.model.embed_tokens
        if self.config.tie_word_embeddings and isinstance(embed, QuantEmbedding):
            self.lm_head = QuantLinear(embed.qweight)

    @property
    def quantized(self) -> bool:
        """Whether some matrix is kept in a GGUF block format (:meth:`use_quantized`)."""
        return any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in self.modules())

    def _reference_weight(self) -> torch.Tensor:
        """A weight whose dtype is the model's (activations, cache) and device its device: the
        lm_head's, or the final norm's where the lm_head is quantized (float32 then)."""
        head = self.lm_head
        return head.weight if isinstance(head, nn.Linear) else self.model.norm.weight

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the activations and the cache (float32 for a quantized model)."""
        return self._reference_weight().dtype

    @property
    def device(self) -> torch.device:
        return self._reference_weight().device

    def _kernel_weights(self, num_tokens: int) -> tuple[list[torch.Tensor | None], tuple[torch.Tensor, ...]]:
        """The weights the kernels read for a pass over ``num_tokens`` tokens per sequence, and
        ``(embedding, lm_head)``: the compact copies for decoding and verification, the float32
        originals for prefill. Both give the same values."""
        if num_tokens > kernels.MAX_ROWS:
            return self._prefill_weights, self._prefill_io  # type: ignore[return-value]
        return self._layer_weights, self._kernel_io  # type: ignore[return-value]

    def _compact_weights(self) -> None:
        """Swap every product's weight the kernels read for its exact bfloat16 copy, if all have one."""
        weights = self._layer_weights
        if weights is None or self.device.type != "cpu" or kernels.load() is None:
            return  # (the kernels are CPU-only: no need to build them for a model on another device)
        embed, head = self._kernel_io  # type: ignore[misc]
        compact = compact_copies(weights, [embed] + ([] if head is embed else [head]))
        if compact is None:
            return  # one weight needs float32: keep them all
        self._layer_weights, io = compact
        self._kernel_io = (io[0], io[-1])

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .to() / .float() convert each parameter on its own: rebuild the fused matrices after.
        fused = self._layer_weights is not None
        out = super()._apply(fn, recurse)
        if fused:
            self.fuse()
        return out

    def new_cache(
        self, batch_size: int = 1, max_seq_len: int | None = None, num_layers: int | None = None
    ) -> KVCache:
        """A cache for ``max_seq_len`` slots (default: the context, capped at
        ``DEFAULT_CACHE_SLOTS`` so a 128k-context model does not allocate gigabytes up front)."""
        cfg = self.config
        if max_seq_len is None:
            max_seq_len = min(cfg.max_position_embeddings, DEFAULT_CACHE_SLOTS)
        p = self._reference_weight()
        return KVCache(
            num_layers if num_layers is not None else cfg.num_hidden_layers,
            batch_size,
            cfg.num_key_value_heads,
            max_seq_len,
            cfg.head_dim,
            dtype=p.dtype,
            device=p.device,
        )

    def rope(self, input_pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = input_pos[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _attention_inputs(
        self,
        input_pos: torch.Tensor,  # (B, T)
        attn_mask: torch.Tensor | None,
        cache_slots: torch.Tensor | None,
        kv_len: int | None,
        kernels_prefill: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Cache slots ``(B, T)``, the attention mask ``(B, 1, T, S)`` (None: a single new token
        sees every slot) and the number of slots attention reads.

        ``kernels_prefill``: the kernels' prefill (more than ``kernels.MAX_ROWS`` tokens) takes
        None for the causal mask of a pass from slot 0, and then skips the masked half of the
        scores instead of computing and discarding it (2x less attention work)."""
        slots = input_pos if cache_slots is None else cache_slots
        if kv_len is None:
            kv_len = int(attn_mask.shape[-1]) if attn_mask is not None else int(slots.max()) + 1
        plain = kernels_prefill and attn_mask is None and cache_slots is None
        if plain and input_pos.shape[1] == kv_len > kernels.MAX_ROWS:
            if bool((input_pos == torch.arange(kv_len)).all()):  # every row at positions 0..T-1
                return slots, None, kv_len
        if attn_mask is None:
            single = input_pos.shape[0] == 1 and input_pos.shape[1] == 1 and cache_slots is None
            attn_mask = None if single else causal_mask(input_pos, kv_len)
        elif attn_mask.dim() == 3:
            attn_mask = attn_mask[:, None]
        return slots, attn_mask, kv_len

    def run_layers(
        self,
        h: torch.Tensor,  # (B, T, d)
        input_pos: torch.Tensor,  # (B, T)
        cache: KVCache,
        attn_mask: torch.Tensor | None = None,
        cache_slots: torch.Tensor | None = None,
        layers: range | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """Run decoder layers ``layers`` (default: all) over hidden states ``h``.

        ``kv_len``: how many cache slots attention reads (default: up to the highest slot
        written, which costs a device sync; the engine passes it).
        """
        layers = layers if layers is not None else range(len(self.model.layers))
        if self._layer_weights is not None and layers.step == 1 and kernels.fused_layers_apply(h):
            slots, attn_mask, kv_len = self._attention_inputs(input_pos, attn_mask, cache_slots, kv_len, True)
            cfg, (weights, _) = self.config, self._kernel_weights(h.shape[1])
            with kernels.bf16_rows(self.runs_bfloat16):
                return kernels.decoder_layers(  # the loop below in one C++ call
                    h, input_pos, self.inv_freq, cache.k, cache.v, slots, attn_mask, kv_len, layers.start,
                    layers.stop, weights, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                    cfg.rms_norm_eps,
                )  # fmt: skip
        slots, attn_mask, kv_len = self._attention_inputs(input_pos, attn_mask, cache_slots, kv_len)
        cos, sin = self.rope(input_pos, h.dtype)
        for i in layers:
            h = self.model.layers[i](h, cos, sin, cache, slots, attn_mask, kv_len)
        return h

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T)
        input_pos: torch.Tensor,  # (B, T) or (T,)
        cache: KVCache,
        attn_mask: torch.Tensor | None = None,  # (B, T, S) bool, True = may attend
        cache_slots: torch.Tensor | None = None,  # (B, T); defaults to input_pos
        num_logits: int | None = None,
        return_hidden: bool = False,
        kv_len: int | None = None,
        feature_layers: tuple[int, ...] = (),
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, T', V)`` for the last ``num_logits`` tokens (all if None; none for 0, when
        only the hidden states are wanted).

        With ``return_hidden`` also the final normed hidden states ``(B, T, d)``; with
        ``feature_layers`` too, the outputs of those decoder layers before them, concatenated:
        ``(B, T, (len(feature_layers) + 1) d)`` (EAGLE-3's low, middle and high features). For a
        single token with the default mask, ``kv_len`` must be its position + 1 (the default).
        """
        if input_pos.dim() == 1:
            input_pos = input_pos[None].expand(tokens.shape[0], -1)
        if feature_layers:
            logits, h = self._forward_features(
                tokens, input_pos, cache, attn_mask, cache_slots, num_logits, kv_len, feature_layers
            )
            return (logits, h) if return_hidden else logits
        if self._layer_weights is not None and kernels.fused_layers_apply(self._reference_weight()):
            # The module path below in one C++ call (CPU; float32 activations whatever the weights).
            slots, mask, kv_len = self._attention_inputs(input_pos, attn_mask, cache_slots, kv_len, True)
            cfg, (weights, (embed, head)) = self.config, self._kernel_weights(tokens.shape[1])
            with kernels.bf16_rows(self.runs_bfloat16):
                logits, h = kernels.model_forward(
                    tokens, input_pos, self.inv_freq, embed, cache.k, cache.v, slots,
                    mask, kv_len, weights, self.model.norm.weight, head,
                    tokens.shape[1] if num_logits is None else num_logits, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                    cfg.rms_norm_eps,
                )  # fmt: skip
            dtype = self.dtype  # float32 from the kernel; the model's dtype outside
            logits, h = logits.to(dtype), h.to(dtype)
            return (logits, h) if return_hidden else logits
        h = self.model.embed_tokens(tokens)  # (B, T, d)
        h = self.run_layers(h, input_pos, cache, attn_mask, cache_slots, kv_len=kv_len)
        logits, h = self._norm_logits(h, num_logits, float32=False)
        return (logits, h) if return_hidden else logits

    def _norm_logits(
        self, h: torch.Tensor, num_logits: int | None, float32: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The final norm of the last layer's output ``h`` ``(B, T, d)`` and the logits of its last
        ``num_logits`` rows (all if None): with ``float32``, the one-call CPU forward's float32
        norm and :meth:`project` (its values), else the modules'."""
        norm = self.model.norm
        h = kernels.rms_norm(h, norm.weight.float(), norm.eps) if float32 else norm(h)  # (B, T, d)
        rows = h if num_logits is None else h[:, h.shape[1] - num_logits :]
        return (self.project(rows) if float32 else self.lm_head(rows)), h

    def layer_outputs(
        self,
        h: torch.Tensor,  # (B, T, d)
        input_pos: torch.Tensor,  # (B, T)
        cache: KVCache,
        stops: list[int],
        attn_mask: torch.Tensor | None = None,
        cache_slots: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> list[torch.Tensor]:
        """The outputs of decoder layers ``stops`` (increasing) over hidden states ``h``: the
        layers run in segments that end at them (:meth:`run_layers`), up to the last one."""
        outputs, start = [], 0
        for stop in stops:
            if stop >= start:
                h = self.run_layers(
                    h, input_pos, cache, attn_mask, cache_slots, range(start, stop + 1), kv_len
                )
                start = stop + 1
            outputs.append(h)
        return outputs

    def _forward_features(
        self,
        tokens: torch.Tensor,  # (B, T)
        input_pos: torch.Tensor,  # (B, T)
        cache: KVCache,
        attn_mask: torch.Tensor | None,
        cache_slots: torch.Tensor | None,
        num_logits: int | None,
        kv_len: int | None,
        feature_layers: tuple[int, ...],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` with the outputs of ``feature_layers`` kept: the layers run in segments
        that end at those layers, with the same values as one pass (where the one-call CPU
        forward runs, float32 activations and its norm, as in :meth:`forward_reusing`)."""
        num_layers = len(self.model.layers)
        check_feature_layers(feature_layers, num_layers)
        fast = self.reuses_layers()
        h = self.model.embed_tokens(tokens)  # (B, T, d)
        h = h.float() if fast else h
        *kept, h = self.layer_outputs(
            h, input_pos, cache, [*feature_layers, num_layers - 1], attn_mask, cache_slots, kv_len
        )
        logits, h = self._norm_logits(h, num_logits, float32=fast)
        features = torch.cat([*kept, h], dim=-1)  # (B, T, (len(feature_layers) + 1) d)
        return logits.to(self.dtype), features.to(self.dtype)

    @property
    def runs_bfloat16(self) -> bool:
        """A model run in bfloat16 (its own weights bfloat16, not exact copies of float32 ones):
        the kernels' products may round its rows to bfloat16 (``kernels.bf16_rows``)."""
        return self.dtype == torch.bfloat16

    def reuses_layers(self) -> bool:
        """Whether :meth:`forward_reusing` gives exactly the values of :meth:`forward`: where the
        one-call CPU forward runs, whose rows do not depend on the pass around them."""
        return self._layer_weights is not None and kernels.fused_layers_apply(self._reference_weight())

    def forward_reusing(
        self,
        tokens: torch.Tensor,  # (1, T)
        input_pos: torch.Tensor,  # (1, T)
        cache: KVCache,
        num_layers: int,
        hidden: torch.Tensor,  # (1, T-1, d) float32: output of layers < num_layers for tokens[:, :-1]
        kv_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(tokens, input_pos, cache, return_hidden=True, kv_len=kv_len)`` for a pass
        whose first T-1 tokens already went through layers ``0 .. num_layers - 1`` (their keys
        and values in ``cache``, their output ``hidden``): those layers run for the last token
        only, the others for all T. Float32 activations throughout, as in the one-call
        forward, so the values are the same where :meth:`reuses_layers`."""
        last = self.model.embed_tokens(tokens[:, -1:]).float()  # (1, 1, d)
        last = self.run_layers(last, input_pos[:, -1:], cache, layers=range(num_layers), kv_len=kv_len)
        h = torch.cat([hidden.float(), last], dim=1)  # (1, T, d)
        h = self.run_layers(
            h, input_pos, cache, layers=range(num_layers, len(self.model.layers)), kv_len=kv_len
        )
        logits, h = self._norm_logits(h, None, float32=True)  # (the one-call forward's float32 norm)
        dtype = self.dtype
        return logits.to(dtype), h.to(dtype)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """``lm_head(h)`` for final normed hidden states or head features ``(..., d)`` -> ``(..., V)``;
        a few float32 rows read the exact bfloat16 copy of the head the kernels use (see
        :meth:`fuse`), which gives the same values from half the bytes."""
        if isinstance(self.lm_head, QuantLinear):
            return quant_linear(h, self.lm_head.qweight)
        head = self._kernel_io[1] if self._kernel_io is not None else self.lm_head.weight
        return project_rows(h, head, self.lm_head.weight)

    def draft_chain(
        self,
        tokens: torch.Tensor,  # (1, T)
        start: int,
        num_tokens: int,
        cache: KVCache,
        sampling: SamplingParams,
        generator: torch.Generator | None = None,
        vocab: tuple[torch.Tensor, torch.Tensor] | None = None,  # ((N,) ids, (N, d) their kernel rows)
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Chain drafting in one C++ call, or None where the kernels do not apply (the caller then
        runs its own loop): feed ``tokens`` ``(1, T)`` at positions ``start..``, then
        ``num_tokens`` times pick a draft from the last logits and feed it, all but the last.
        Greedy picks the argmax; sampling draws (by inverse transform, with a uniform from
        ``generator``) from the distribution ``sampling.logits_to_probs`` makes of the logits
        (temperature, top-k, top-p), computed in C++. With ``vocab`` only those tokens are
        scored (a reduced draft vocabulary). Returns the ``(K,)`` drafts and, when sampling,
        their ``(K, V)`` distributions (zero outside ``vocab``; None when greedy); ``cache``
        holds ``start + T + num_tokens - 1`` slots."""
        if self._layer_weights is None or not kernels.fused_layers_apply(self._reference_weight()):
            return None
        cfg, (embed, head) = self.config, self._kernel_io  # type: ignore[misc]
        ids, head = vocab if vocab is not None else (None, head)
        common = (tokens, start, num_tokens, self.inv_freq, embed, cache.k, cache.v, self._layer_weights)
        shape = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps)
        norm = self.model.norm.weight
        with kernels.bf16_rows(self.runs_bfloat16):
            if sampling.greedy:
                drafts, probs = kernels.draft_greedy(*common, norm, head, ids, *shape), None
            else:
                draws = chain_draws(sampling, num_tokens, generator)
                drafts, rows = kernels.draft_sample(*common, norm, head, ids, *draws, *shape)
                probs = spread_rows(rows, ids, cfg.vocab_size)  # (K, V)
        cache.truncate(start + tokens.shape[1] + num_tokens - 1)
        return drafts, probs  # (K,), (K, V) or None
