"""Dequantizers for the GGUF tensor types specdec loads: F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1, Q4_K, Q5_K and Q6_K (the block layouts of ggml's ``ggml-common.h``).

Each function takes the raw blocks of one tensor as a ``uint8`` tensor ``(N, type_size)``
(N blocks) and returns their values in float32 ``(N, block_size)``. Every product is taken
in the order ggml's reference code takes it (``gguf.quants`` follows the same order), so the
values are bit-identical to ``gguf.quants.dequantize``; the tests check that.

Legacy formats hold blocks of 32 weights, the K formats super-blocks of 256 weights made of
sub-blocks of 32 (Q4_K, Q5_K) or 16 (Q6_K) with their own quantized scales.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

QK = 32  # weights per block of the legacy formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)
QK_K = 256  # weights per super-block of the K formats


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Two bytes per row ``(N, 2)`` read as one float16, widened: ``(N, 1)`` float32."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Bytes ``(N, G, 32)`` (or ``(N, 16)``) -> low nibbles then high nibbles along a new axis:
    ``(N, G, 2, 32)``; the low nibbles are the first half of a group's weights."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-2)


def dequant_f32(blocks: torch.Tensor) -> torch.Tensor:
    """F32: 4 bytes per weight, little-endian IEEE single."""
    return blocks.contiguous().view(torch.float32).clone()


def dequant_f16(blocks: torch.Tensor) -> torch.Tensor:
    """F16: 2 bytes per weight, IEEE half."""
    return blocks.contiguous().view(torch.float16).float()


def dequant_bf16(blocks: torch.Tensor) -> torch.Tensor:
    """BF16: 2 bytes per weight, the high half of a float32."""
    return blocks.contiguous().view(torch.bfloat16).float()


def dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0, 34 bytes per 32 weights: ``d`` (f16), ``qs`` (32 x int8); ``w = qs * d``."""
    d = _f16(blocks[:, :2])  # (N, 1)
    qs = blocks[:, 2:].contiguous().view(torch.int8).float()  # (N, 32)
    return qs * d


def dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0, 18 bytes per 32 weights: ``d`` (f16), ``qs`` (16 bytes: weight j in the low nibble
    of byte j, weight j + 16 in its high nibble); ``w = d * (q - 8)``."""
    d = _f16(blocks[:, :2])  # (N, 1)
    q = _nibbles(blocks[:, 2:]).reshape(-1, QK).to(torch.int8) - 8  # (N, 32)
    return d * q.float()


def dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_1, 20 bytes per 32 weights: ``d`` (f16), ``m`` (f16), ``qs`` as in Q4_0;
    ``w = d * q + m``."""
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])  # (N, 1) each
    q = _nibbles(blocks[:, 4:]).reshape(-1, QK).float()  # (N, 32)
    return d * q + m


def _five_bits(blocks: torch.Tensor, qh: int) -> torch.Tensor:
    """The 32 five-bit quants ``(N, 32)`` int16 of a Q5_0 / Q5_1 block: the low 4 bits as in Q4_0
    (the 16 bytes after the 4 bytes of ``qh``, which starts at byte ``qh``), the fifth bit of
    weight j bit j of the little-endian uint32 ``qh``."""
    shifts = torch.arange(8, dtype=torch.uint8)
    high = ((blocks[:, qh : qh + 4, None] >> shifts) & 1).reshape(-1, QK)  # (N, 32)
    low = _nibbles(blocks[:, qh + 4 :]).reshape(-1, QK)  # (N, 32)
    return (low | (high << 4)).to(torch.int16)


def dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_0, 22 bytes per 32 weights: ``d`` (f16), ``qh`` (4 bytes: fifth bits), ``qs`` as in
    Q4_0; ``w = d * (q - 16)``."""
    d = _f16(blocks[:, :2])  # (N, 1)
    return d * (_five_bits(blocks, 2) - 16).float()


def dequant_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_1, 24 bytes per 32 weights: ``d``, ``m`` (f16), ``qh``, ``qs`` as in Q5_0;
    ``w = d * q + m``."""
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])  # (N, 1) each
    return d * _five_bits(blocks, 4).float() + m


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and 8 six-bit mins of a Q4_K / Q5_K super-block from its 12 bytes
    ``(N, 12)``. Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; bytes 8-11
    hold the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble), whose top 2 bits
    are the spare top bits of bytes 0-3 (scales) and 4-7 (mins). Returns ``(N, 8)`` each."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((a & 63, (c & 0x0F) | ((a >> 6) << 4)), dim=1)
    mins = torch.cat((b & 63, (c >> 4) | ((b >> 6) << 4)), dim=1)
    return scales, mins


def dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K, 144 bytes per 256 weights: ``d``, ``dmin`` (f16), 12 bytes of packed 6-bit scales
    and mins, ``qs`` (128 bytes: 4 runs of 32 bytes, run i holding sub-block 2i in its low
    nibbles and 2i + 1 in its high nibbles); ``w = (d * scale) * q - dmin * min``."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])  # (N, 1)
    scales, mins = _k_scales(blocks[:, 4:16])  # (N, 8)
    sub_scale = (d * scales.float()).unsqueeze(-1)  # (N, 8, 1)
    sub_min = (dmin * mins.float()).unsqueeze(-1)  # (N, 8, 1)
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return (sub_scale * q - sub_min).reshape(n, QK_K)


def dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_K, 176 bytes per 256 weights: ``d``, ``dmin`` (f16), 12 bytes of scales and mins as in
    Q4_K, ``qh`` (32 bytes: bit j of byte l is the fifth bit of weight l of sub-block j), ``qs``
    (128 bytes, the low 4 bits as in Q4_K); ``w = (d * scale) * q - dmin * min``."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])  # (N, 1)
    scales, mins = _k_scales(blocks[:, 4:16])  # (N, 8)
    sub_scale = (d * scales.float()).unsqueeze(-1)  # (N, 8, 1)
    sub_min = (dmin * mins.float()).unsqueeze(-1)  # (N, 8, 1)
    shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    high = (blocks[:, 16:48].unsqueeze(1) >> shifts) & 1  # (N, 8, 32)
    low = _nibbles(blocks[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    q = (low | (high << 4)).float()  # (N, 8, 32)
    return (sub_scale * q - sub_min).reshape(n, QK_K)


def dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K, 210 bytes per 256 weights: ``ql`` (128 bytes, low 4 bits), ``qh`` (64 bytes, high 2
    bits), 16 int8 scales, ``d`` (f16). Each half of 128 weights reads 64 bytes of ``ql`` and 32
    of ``qh``: weight l (< 32) of its four runs of 32 takes the low nibble of ql[l], the low
    nibble of ql[l + 32], the high nibble of ql[l], the high nibble of ql[l + 32], with bits
    (0-1, 2-3, 4-5, 6-7) of qh[l] on top; ``w = (d * scale) * (q - 32)``, a scale per 16."""
    n = blocks.shape[0]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()  # (N, 16)
    d = _f16(blocks[:, 208:210])  # (N, 1)
    sub_scale = (d * scales).unsqueeze(-1)  # (N, 16, 1)
    low = _nibbles(blocks[:, :128].reshape(n, 2, 2, 32))  # (N, half, run of ql, nibble, 32)
    low = low.transpose(2, 3).reshape(n, 8, 32)  # runs in weight order: (half, nibble, run)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    high = ((blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.int8) - 32  # (N, 8, 32)
    return (sub_scale * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


# GGML type name -> (weights per block, bytes per block, dequantizer)
DEQUANTIZERS: dict[str, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "F32": (1, 4, dequant_f32),
    "F16": (1, 2, dequant_f16),
    "BF16": (1, 2, dequant_bf16),
    "Q8_0": (QK, 34, dequant_q8_0),
    "Q4_0": (QK, 18, dequant_q4_0),
    "Q4_1": (QK, 20, dequant_q4_1),
    "Q5_0": (QK, 22, dequant_q5_0),
    "Q5_1": (QK, 24, dequant_q5_1),
    "Q4_K": (QK_K, 144, dequant_q4_k),
    "Q5_K": (QK_K, 176, dequant_q5_k),
    "Q6_K": (QK_K, 210, dequant_q6_k),
}


def dequantize(raw: np.ndarray, type_name: str, numel: int) -> torch.Tensor:
    """The ``numel`` weights stored in ``raw`` (the tensor's bytes, any numpy dtype) as a flat
    float32 tensor; ``KeyError`` for a type without a dequantizer here."""
    block_size, type_size, fn = DEQUANTIZERS[type_name]
    data = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1).view(np.uint8).copy())
    n_blocks = numel // block_size
    if numel % block_size or data.numel() != n_blocks * type_size:
        raise ValueError(f"{data.numel()} bytes do not hold {numel} weights of type {type_name}")
    return fn(data.view(n_blocks, type_size)).reshape(numel)
