"""Few-row products over GGUF block formats: gguf's weights exactly, float32-close, batch invariant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from specdec import kernels
from specdec.kernels import quant
from specdec.kernels.quant import FORMATS, QuantLinear, QuantWeight, dequantize, quant_linear

op = kernels.load()
needs_kernel = pytest.mark.skipif(
    op is None and not os.environ.get("CI"), reason=f"no kernel here: {kernels.status()}"
)
NAMES = [name for name, _, _ in FORMATS.values()]
# Byte offsets of the fp16 scale fields in each format's block (the rest may be any bytes).
HALF_FIELDS = {
    "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}  # fmt: skip


def random_weight(name: str, N: int, K: int, seed: int) -> QuantWeight:
    """Blocks of random bytes (every quant, scale and min bit pattern) with finite fp16 scales."""
    type_id = quant.qtype_id(name)
    _, block, block_bytes = FORMATS[type_id]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(N, K // block, block_bytes), dtype=np.uint8)
    for offset in HALF_FIELDS[name]:
        scales = (rng.standard_normal((N, K // block)) * 0.02).astype(np.float16)
        blocks[..., offset : offset + 2] = scales.view(np.uint8).reshape(N, K // block, 2)
    return QuantWeight(torch.from_numpy(blocks.reshape(N, -1)), type_id, (N, K))


def gguf_weight(qweight: QuantWeight) -> torch.Tensor:
    """The reference: the ``gguf`` library's dequantization, (N, K) float32."""
    array = gguf_dequantize(qweight.blocks.numpy(), GGMLQuantizationType(qweight.qtype))
    return torch.from_numpy(np.ascontiguousarray(array)).reshape(qweight.shape)


def float32_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst-case error of float32 sums of K products in 8 lanes: (K / 8 + 4) eps * sum |x w|."""
    K = x.shape[-1]
    return (K / 8 + 4) * 2.0**-24 * (x.abs().double() @ w.abs().double().T)


@needs_kernel
@pytest.mark.parametrize("name", NAMES)
def test_dequantization_equals_gguf_exactly(name):
    qweight = random_weight(name, 37, 512, seed=1)
    assert torch.equal(dequantize(qweight), gguf_weight(qweight))
    assert dequantize(qweight, torch.bfloat16).dtype == torch.bfloat16


@needs_kernel
@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_weights_quantized_by_gguf_dequantize_exactly(name):
    weight = torch.randn(64, 320, generator=torch.Generator().manual_seed(2))
    qweight = QuantWeight.quantize(weight, name)
    assert qweight.name == name and qweight.nbytes == 64 * 320 // 32 * FORMATS[qweight.qtype][2]
    ours = dequantize(qweight)
    assert torch.equal(ours, gguf_weight(qweight))
    assert (ours - weight).abs().max() < 0.5  # a quantization of `weight`, not noise


@needs_kernel
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17, 32])
def test_product_is_within_float32_rounding_of_the_dequantized_product(name, rows):
    qweight = random_weight(name, 75, 768, seed=rows)
    weight = gguf_weight(qweight)  # (N, K)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 768, generator=gen)
    bias = torch.randn(75, generator=gen)
    y = quant_linear(x, qweight, bias)
    assert y.dtype == torch.float32 and y.shape == (rows, 75)
    exact = x.double() @ weight.double().T + bias.double()
    bound = float32_bound(x, weight) + 2.0**-24 * exact.abs()
    assert ((y.double() - exact).abs() <= bound).all()
    assert ((y - F.linear(x, weight, bias)).abs().double() <= 2 * bound).all()


@needs_kernel
@pytest.mark.parametrize("name", NAMES)
def test_a_pass_of_k_rows_equals_k_passes_of_one_row_bitwise(name):
    # 70 weight rows: whole blocks of 2, 3, 4, 6 and 8 weight rows plus single rows at the end.
    qweight = random_weight(name, 70, 512, seed=3)
    x = torch.randn(32, 512, generator=torch.Generator().manual_seed(3))
    one_row = torch.cat([quant_linear(x[i : i + 1], qweight) for i in range(32)])
    for rows in range(1, 33):
        assert torch.equal(quant_linear(x[:rows], qweight), one_row[:rows]), rows


@needs_kernel
@pytest.mark.parametrize("name", ["Q4_1", "Q6_K"])
def test_one_and_two_threads_give_the_same_bits(name):
    qweight = random_weight(name, 1000, 256, seed=4)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = quant_linear(x, qweight)
        torch.set_num_threads(2)
        double = quant_linear(x, qweight)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(single, double)
    weight = gguf_weight(qweight)
    assert ((single.double() - x.double() @ weight.double().T).abs() <= float32_bound(x, weight)).all()


@needs_kernel
def test_more_rows_than_the_kernel_takes_dequantize_in_chunks(monkeypatch):
    qweight = random_weight("Q4_K", 300, 512, seed=5)
    weight = gguf_weight(qweight)
    x = torch.randn(2, 20, 512, generator=torch.Generator().manual_seed(5))  # 40 rows > MAX_ROWS
    bias = torch.randn(300)
    monkeypatch.setattr(quant, "_DEQUANTIZE_CHUNK", 512 * 128)  # 128 weight rows a chunk: 3 chunks
    layer = QuantLinear(qweight, bias)
    y = layer(x)
    assert y.shape == (2, 20, 300)
    exact = x.double() @ weight.double().T + bias.double()  # (2, 20, 300)
    bound = float32_bound(x, weight) + 2.0**-24 * exact.abs()
    assert ((y.double() - exact).abs() <= bound).all()
    few = layer(x[0, :4])  # the kernel's path: the same function up to float32 rounding
    assert ((few.double() - exact[0, :4]).abs() <= bound[0, :4]).all()
    assert "Q4_K" in repr(layer) and layer.blocks.numel() == qweight.nbytes


@needs_kernel
def test_bfloat16_rows_come_back_in_bfloat16():
    qweight = random_weight("Q8_0", 40, 128, seed=6)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(6)).bfloat16()
    y = quant_linear(x, qweight)
    assert y.dtype == torch.bfloat16
    ref = (x.double() @ gguf_weight(qweight).double().T).bfloat16()
    assert (y.float() - ref.float()).abs().max() <= 2 * ref.float().abs().max() * 2**-8


def test_malformed_weights_are_refused_with_one_clear_error():
    with pytest.raises(ValueError, match="no kernel for GGML type 9"):  # Q8_1
        QuantWeight(torch.zeros(4, 36, dtype=torch.uint8), 9, (4, 32))
    with pytest.raises(ValueError, match="whole blocks of 256"):
        QuantWeight(torch.zeros(4, 144, dtype=torch.uint8), 12, (4, 128))
    with pytest.raises(ValueError, match=r"contiguous uint8 \(4, 20\)"):
        QuantWeight(torch.zeros(4, 40, dtype=torch.uint8), quant.qtype_id("q4_1"), (4, 32))


_PROBE = """
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from specdec import kernels
from test_quant_kernels import NAMES, dequantize, gguf_weight, quant_linear, random_weight
torch.set_num_threads(1)
out = {"status": kernels.status()}
for name in NAMES:
    qweight = random_weight(name, 70, 512, seed=7)
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(7))
    together = quant_linear(x, qweight)
    q8 = quant_linear(x, qweight.with_q8_rows())  # 8-bit rows
    out[name] = {
        "dequantized": bool(torch.equal(dequantize(qweight), gguf_weight(qweight))),
        "invariant": all(torch.equal(quant_linear(x[i : i + 1], qweight), together[i : i + 1]) for i in range(9)),
        "bits": together.view(torch.int32).flatten().tolist(),
        "q8_bits": q8.view(torch.int32).flatten().tolist(),
    }
json.dump(out, open(sys.argv[1], "w"))
"""


@needs_kernel
def test_the_avx2_build_gives_gguf_weights_and_the_same_bits_as_the_best_build(tmp_path):
    # The build is chosen once per process: the AVX2 one (what a Zen 3 runs) in a subprocess,
    # on every machine, next to the best build this CPU has.
    results = {}
    for build in ("default", "avx2"):
        env = dict(os.environ)
        env.pop("SPECDEC_CPU_KERNELS", None)
        if build == "avx2":
            env["SPECDEC_CPU_KERNELS"] = "avx2"
        path = tmp_path / f"{build}.json"
        probe = [sys.executable, "-c", _PROBE, str(path), str(Path(__file__).parent)]
        subprocess.run(probe, env=env, check=True, timeout=900)
        results[build] = json.loads(path.read_text())
    assert "16 registers" in results["avx2"]["status"]
    for name in NAMES:
        for build in ("default", "avx2"):
            assert results[build][name]["dequantized"] and results[build][name]["invariant"], (build, name)
        assert results["default"][name]["bits"] == results["avx2"][name]["bits"], name
        assert results["default"][name]["q8_bits"] == results["avx2"][name]["q8_bits"], name
