"""Weights kept in GGUF's quantized block formats and multiplied as they are (quant.h).

A :class:`QuantWeight` holds the raw blocks of an ``(N, K)`` weight as a GGUF file stores them
(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K; layouts of llama.cpp's ``ggml-common.h``): 4.5-8.5 bits a
weight instead of 32. :func:`quant_linear` multiplies 1..:data:`~specdec.kernels.MAX_ROWS` float32
rows by it in the CPU kernels, reading every block once for all rows and dequantizing it in
registers with float32 accumulation; the rows are never quantized. :func:`dequantize` gives the
``gguf`` library's weights bit for bit; a product differs from the product with them only by
float32 rounding (every format sums ``s * (x . q) + m * sum(x)`` per group of 32 weights, never
forming the weights). Each output
is one chain of float32 operations in column order, so a K-row pass gives the bits of K one-row
passes (batch invariance), with any thread count and in the AVX2 and AVX-512 builds alike. More rows
(prefill) dequantize a chunk of weight rows at a time and take ``F.linear``.
:class:`QuantLinear` is the ``nn.Linear`` stand-in a model plugs in, :class:`QuantEmbedding` the
``nn.Embedding`` one (the looked-up rows dequantized). The one-call forward (forward.cpp) takes a
weight as :meth:`QuantWeight.kernel_view`: uint8 ``(N, K / block, block_bytes)``, whose last size
names the format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from specdec import kernels

# GGML type id (gguf.GGMLQuantizationType) -> (name, weights per block, bytes per block)
FORMATS: dict[int, tuple[str, int, int]] = {
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}
_SUPPORTED = ", ".join(name for name, _, _ in FORMATS.values())
QUAD_FORMATS = ("Q8_0", "Q4_0", "Q4_1")  # kept in quant_q8.h's quad layout with 8-bit rows
_DEQUANTIZE_CHUNK = 1 << 22  # weights dequantized at a time above MAX_ROWS rows (16 MB of float32)


def qtype_id(qtype: int | str) -> int:
    """The GGML type id of a format given as an id, a ``GGMLQuantizationType`` or a name (``"Q4_1"``)."""
    if isinstance(qtype, str):
        for type_id, (name, _, _) in FORMATS.items():
            if name == qtype.upper():
                return type_id
        raise ValueError(f"no kernel for GGUF format {qtype!r}; supported: {_SUPPORTED}")
    type_id = int(qtype)
    if type_id not in FORMATS:
        raise ValueError(f"no kernel for GGML type {type_id}; supported: {_SUPPORTED}")
    return type_id


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """An ``(N, K)`` weight (``nn.Linear`` layout: out_features, in_features) in a GGUF block format."""

    blocks: torch.Tensor  # (N, K // block * block_bytes) uint8, contiguous: row n's blocks in blocks[n]
    qtype: int  # GGML type id
    shape: tuple[int, int]  # (N, K)
    # Products quantize their rows to 8 bits (where the format has it; quant_q8.h); Q8_0, Q4_0 and
    # Q4_1 blocks are then in quant_q8.h's quad layout: make such a weight with with_q8_rows().
    q8_rows: bool = False

    def __post_init__(self) -> None:
        name, block, block_bytes = FORMATS[qtype_id(self.qtype)]
        N, K = self.shape
        if K % block:
            raise ValueError(f"{name}: {K} columns are not whole blocks of {block}")
        expected = (N, K // block * block_bytes)
        if (
            self.blocks.dtype != torch.uint8
            or tuple(self.blocks.shape) != expected
            or not self.blocks.is_contiguous()
        ):
            raise ValueError(
                f"{name} blocks of an ({N}, {K}) weight must be a contiguous uint8 {expected} tensor, "
                f"got {self.blocks.dtype} {tuple(self.blocks.shape)}"
            )

    @property
    def name(self) -> str:
        """The format's name, e.g. ``"Q4_1"``."""
        return FORMATS[self.qtype][0]

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks: what a pass over the weight reads."""
        return self.blocks.numel()

    @property
    def block(self) -> int:
        """Weights per block (32 or 256)."""
        return FORMATS[self.qtype][1]

    def kernel_view(self) -> torch.Tensor:
        """The blocks as the kernels read them: uint8 ``(N, K / block, block_bytes)`` (a view; each
        format has its own block size in bytes, so the shape names the format), int8 where the
        products quantize their rows to 8 bits (:attr:`q8_rows`)."""
        _, block, block_bytes = FORMATS[self.qtype]
        N, K = self.shape
        view = self.blocks.view(N, K // block, block_bytes)
        return view.view(torch.int8) if self.q8_rows else view

    def with_q8_rows(self) -> QuantWeight:
        """This weight with 8-bit rows (:attr:`q8_rows`): its blocks rearranged into the quad layout
        where the format has one (Q8_0, Q4_0, Q4_1: a copy of the same size), else shared. Needs
        the CPU kernels, the only products that run 8-bit rows."""
        if self.q8_rows:
            return self
        op = kernels._op()
        if op is None:
            raise RuntimeError(f"8-bit rows need specdec's CPU kernels: {kernels.status()}")
        blocks = self.blocks
        if self.name in QUAD_FORMATS:
            blocks = op.quant_quads(blocks, self.qtype, *self.shape, True)  # type: ignore[attr-defined]
        return QuantWeight(blocks, self.qtype, self.shape, q8_rows=True)

    def gguf_blocks(self) -> torch.Tensor:
        """The blocks in GGUF's layout (the quad layout of :meth:`with_q8_rows` undone: a copy)."""
        if not (self.q8_rows and self.name in QUAD_FORMATS):
            return self.blocks
        op = kernels._op()
        assert op is not None  # (with_q8_rows made the layout with the kernels)
        return op.quant_quads(self.blocks, self.qtype, *self.shape, False)  # type: ignore[attr-defined,no-any-return]

    def rows(self, start: int, count: int) -> QuantWeight:
        """Weight rows ``start .. start + count - 1`` (a view: blocks are row-wise)."""
        return QuantWeight(
            self.blocks[start : start + count], self.qtype, (count, self.shape[1]), self.q8_rows
        )

    @classmethod
    def cat(cls, weights: list[QuantWeight]) -> QuantWeight:
        """The weights stacked row-wise (one product for several layers); one format and width."""
        first = weights[0]
        if any(
            w.qtype != first.qtype or w.shape[1] != first.shape[1] or w.q8_rows != first.q8_rows
            for w in weights
        ):
            raise ValueError("QuantWeight.cat: the weights must share one format, column count and q8_rows")
        blocks = torch.cat([w.blocks for w in weights])  # (sum N_i, row_bytes)
        return cls(blocks, first.qtype, (blocks.shape[0], first.shape[1]), first.q8_rows)

    @classmethod
    def from_gguf(cls, tensor: Any) -> QuantWeight:
        """The weight of a ``gguf.ReaderTensor`` (its ``shape`` in GGUF order: columns first),
        sharing the reader's memory map (no copy)."""
        K = int(tensor.shape[0])
        N = int(np.prod([int(n) for n in tensor.shape[1:]]))
        data = np.asarray(tensor.data).reshape(N, -1)
        return cls(torch.from_numpy(data), int(tensor.tensor_type), (N, K))

    @classmethod
    def quantize(cls, weight: torch.Tensor, qtype: int | str) -> QuantWeight:
        """``weight`` (N, K) quantized with the ``gguf`` library (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1:
        the formats it can write)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        type_id = qtype_id(qtype)
        array = weight.detach().float().cpu().numpy()  # (N, K)
        data = quantize(array, GGMLQuantizationType(type_id))  # (N, row_bytes)
        return cls(torch.from_numpy(np.ascontiguousarray(data)), type_id, (weight.shape[0], weight.shape[1]))


def q5_0_as_q8_0(qweight: QuantWeight) -> QuantWeight:
    """A Q5_0 weight as Q8_0 blocks of the same weights: each block's fp16 ``d`` and its quants
    ``q - 16`` (in -16..15) as int8. The Q8_0 product reads 34 bytes a block instead of 22 but
    widens them with one instruction per 8 weights where Q5_0 assembles five bits; its operations
    are then those of the Q5_0 product (``d * (x . q)`` per block), so the results are the same
    bits, at about twice the speed on one thread (docs/models.md)."""
    if qweight.name != "Q5_0":
        raise ValueError(f"q5_0_as_q8_0: a Q5_0 weight, got {qweight.name}")
    N, K = qweight.shape
    blocks = qweight.blocks.numpy().reshape(N, K // 32, 22)
    high = blocks[..., 2:6].copy().view(np.uint32)  # (N, K/32, 1): bit i is weight i's fifth bit
    packed = blocks[
        ..., 6:
    ]  # (N, K/32, 16): weight i < 16 in the low nibble of byte i, 16 + i in the high one
    low = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.int16)  # (N, K/32, 32)
    fifth = (high >> np.arange(32, dtype=np.uint32)) & 1  # (N, K/32, 32)
    quants = (low | (fifth.astype(np.int16) << 4)) - 16  # (N, K/32, 32) in -16..15
    out = np.concatenate([blocks[..., :2], quants.astype(np.int8).view(np.uint8)], axis=-1)  # (N, K/32, 34)
    q8_0 = QuantWeight(torch.from_numpy(np.ascontiguousarray(out.reshape(N, -1))), qtype_id("Q8_0"), (N, K))
    return q8_0.with_q8_rows() if qweight.q8_rows else q8_0


def dequantize(qweight: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(N, K)`` weights in ``dtype``: exactly the ``gguf`` library's ``dequantize`` in float32."""
    N, K = qweight.shape
    op = kernels._op()
    if op is not None:
        blocks = qweight.blocks.view(torch.int8) if qweight.q8_rows else qweight.blocks  # int8: its layout
        weight = op.quant_dequantize(blocks, qweight.qtype, N, K)  # type: ignore[attr-defined]
    else:  # (no kernels: no 8-bit rows either, so GGUF's layout)
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        array = gguf_dequantize(qweight.blocks.numpy(), GGMLQuantizationType(qweight.qtype))
        weight = torch.from_numpy(np.ascontiguousarray(array)).reshape(N, K)
    return weight.to(dtype)


def quant_linear(x: torch.Tensor, qweight: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, dequantize(qweight), bias)`` in ``x``'s dtype: the kernel of quant.h for
    1..MAX_ROWS rows on a CPU with the kernels, else chunks of dequantized weight rows."""
    N, K = qweight.shape
    rows = x.numel() // K if K else 0
    if (
        0 < rows <= kernels.MAX_ROWS
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and not (torch.is_grad_enabled() and x.requires_grad)
    ):
        op = kernels._op()
        if op is not None:
            blocks = qweight.kernel_view()  # int8 where the rows are quantized to 8 bits
            return op.quant_linear(x, blocks, qweight.qtype, N, K, bias)  # type: ignore[attr-defined,no-any-return]
    chunk = max(1, _DEQUANTIZE_CHUNK // max(K, 1))  # weight rows dequantized at a time
    if N <= chunk:
        return F.linear(x, dequantize(qweight, x.dtype).to(x.device), bias)
    parts = []
    for n0 in range(0, N, chunk):
        part = qweight.rows(n0, min(chunk, N - n0))
        parts.append(F.linear(x, dequantize(part, x.dtype).to(x.device)))  # (..., chunk)
    y = torch.cat(parts, dim=-1)  # (..., N)
    return y if bias is None else y + bias


def embedding(ids: torch.Tensor, qweight: QuantWeight) -> torch.Tensor:
    """``F.embedding(ids, dequantize(qweight))`` ``(..., K)`` float32, dequantizing only the rows looked up."""
    flat = ids.reshape(-1).to(torch.long)  # (n,)
    rows = QuantWeight(
        qweight.blocks.index_select(0, flat), qweight.qtype, (flat.numel(), qweight.shape[1]), qweight.q8_rows
    )
    return dequantize(rows).view(*ids.shape, qweight.shape[1])


class QuantLinear(nn.Module):
    """``nn.Linear`` with its weight in a GGUF block format (:func:`quant_linear`); no training."""

    def __init__(self, qweight: QuantWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("blocks", qweight.blocks)  # counted in the module's memory and state_dict
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized ``(N, K)`` float32 weight, a new tensor each time: for code that reads
        an ``nn.Linear``'s weight once (e.g. rows of an ``lm_head``), not for products."""
        return dequantize(self.qweight)

    def set_qweight(self, qweight: QuantWeight) -> None:
        """Swap in another weight of the same shape (e.g. a view of a fused matrix)."""
        if qweight.shape != self.qweight.shape:
            raise ValueError(f"QuantLinear.set_qweight: shape {qweight.shape}, expected {self.qweight.shape}")
        self.qweight = qweight
        self.blocks = qweight.blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        """The product with the quantized weight."""
        return quant_linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.qweight.name}"


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` with its table in a GGUF block format: the rows looked up are dequantized
    (float32). Its ``qweight`` may also serve a tied ``lm_head`` (:class:`QuantLinear`)."""

    def __init__(self, qweight: QuantWeight) -> None:
        super().__init__()
        self.qweight = qweight
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("blocks", qweight.blocks)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized ``(V, K)`` float32 table, a new tensor each time (see :attr:`QuantLinear.weight`)."""
        return dequantize(self.qweight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., K)
        """The rows of ``ids``, dequantized to float32."""
        return embedding(ids, self.qweight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.qweight.name}"
