"""Quantized weights with 8-bit rows (the ``q8_rows`` option, kernels/quant_q8.h): each row of x is
quantized per group of 32 to int8 with a float32 scale, and the products sum integer dot products
before any float32 operation. The product then equals the product of the *quantized rows* with
the dequantized weights up to float32 rounding (not the product with x: a negative control shows
the difference), gives the same bits for a row whatever the batch (so speculative decoding stays
lossless on such a model), and formats without an 8-bit product keep float32 rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from specdec import SpeculativeGenerator, kernels, load_model, make_drafter, options
from specdec.drafters.ngram import NgramDrafter
from specdec.kernels.quant import QuantLinear, QuantWeight, dequantize, quant_linear
from specdec.sampling import SamplingParams
from specdec.serving.batch_engine import BatchEngine, EngineEvent, EngineRequest
from specdec.serving.metrics import ServerMetrics
from test_quant_kernels import gguf_weight, random_weight
from test_quant_model import PROMPT, assert_batch_invariant, logits_of, write_quant_gguf
from test_serving_engine import run_engine

needs_kernels = pytest.mark.skipif(kernels.load() is None, reason=f"no kernels here: {kernels.status()}")
WITH_Q8 = ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]
WITHOUT_Q8 = ["Q5_1", "Q5_K"]  # (Q5_0 loads as Q8_0)


def eight_bit_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows the kernels multiply, float64: per group of 32, d = max|x| / 127 and
    q = round(x * (127 / max|x|)) in float32 (ties to even), times d."""
    groups = x.numpy().astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(groups).max(axis=-1, keepdims=True)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    quants = np.rint(groups * inverse)
    assert np.abs(quants).max() <= 127
    return torch.from_numpy(
        (quants.astype(np.float64) * (amax / np.float32(127)).astype(np.float64)).reshape(x.shape)
    )


def q8(qweight: QuantWeight) -> QuantWeight:
    return qweight.with_q8_rows()


def width(name: str) -> int:
    """K for a test of `name`: for the 32-weight formats 27 blocks, 6 quads of the quad layout and 3
    blocks left in GGUF's layout (K-quants: 3 super-blocks)."""
    return 768 if name.endswith("_K") else 864


@needs_kernels
@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("K", [864, 96, 128])  # quads and a tail, a tail only, one quad
def test_the_quad_layout_holds_the_same_weights_and_goes_back_exactly(name, K):
    qweight = random_weight(name, 5, K, seed=K)
    quads = qweight.with_q8_rows()
    assert quads.q8_rows and quads.blocks.shape == qweight.blocks.shape
    assert torch.equal(quads.gguf_blocks(), qweight.blocks)
    assert torch.equal(dequantize(quads), gguf_weight(qweight))  # the file's weights, bit for bit
    block_bytes = qweight.blocks.shape[1] // (K // 32)
    whole = K // 128 * 4 * block_bytes  # bytes of the whole quads
    assert torch.equal(quads.blocks[:, whole:], qweight.blocks[:, whole:])  # the tail as GGUF has it
    if whole:
        assert not torch.equal(quads.blocks[:, :whole], qweight.blocks[:, :whole])  # rearranged
    # Only the bytes move: the headers come first, one after the other.
    header = {"Q8_0": 2, "Q4_0": 2, "Q4_1": 4}[name]
    if whole:
        for i in range(4):
            assert torch.equal(
                quads.blocks[:, header * i : header * (i + 1)],
                qweight.blocks[:, block_bytes * i : block_bytes * i + header],
            )


@needs_kernels
def test_formats_without_a_quad_layout_share_their_blocks():
    qweight = random_weight("Q4_K", 4, 256, seed=1)
    assert qweight.with_q8_rows().blocks is qweight.blocks


@needs_kernels
@pytest.mark.parametrize("name", WITH_Q8)
@pytest.mark.parametrize("rows", [1, 3, 8, 9])
def test_product_is_the_quantized_rows_product_within_float32_rounding(name, rows):
    K = width(name)
    qweight = random_weight(name, 75, K, seed=rows)
    weight = gguf_weight(qweight).double()  # (N, K)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    ours = quant_linear(x, q8(qweight)).double()
    reference = eight_bit_rows(x) @ weight.T
    bound = (K / 8 + 8) * 2.0**-24 * (eight_bit_rows(x).abs() @ weight.abs().T)
    assert ((ours - reference).abs() <= bound).all()
    # Negative control: against x itself the 8-bit rows are off by far more than float32 rounding.
    exact = x.double() @ weight.T
    assert ((ours - exact).abs() > bound).any()
    assert (ours - exact).abs().max() < 0.05 * exact.abs().max()  # a quantization of x, not noise


@needs_kernels
@pytest.mark.parametrize("name", WITH_Q8)
def test_a_pass_of_k_rows_equals_k_passes_of_one_row_bitwise(name):
    qweight = q8(random_weight(name, 70, width(name), seed=4))
    x = torch.randn(9, width(name), generator=torch.Generator().manual_seed(4))
    together = quant_linear(x, qweight)
    assert all(torch.equal(quant_linear(x[i : i + 1], qweight), together[i : i + 1]) for i in range(9))


@needs_kernels
@pytest.mark.parametrize("name", WITHOUT_Q8)
def test_formats_without_an_8_bit_product_keep_float32_rows(name):
    qweight = random_weight(name, 40, 512, seed=5)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(5))
    assert torch.equal(quant_linear(x, q8(qweight)), quant_linear(x, qweight))


@needs_kernels
@pytest.mark.parametrize("name", WITH_Q8)
def test_zero_rows_give_zero_and_a_nan_or_inf_gives_nan_only_in_its_row(name):
    qweight = q8(random_weight(name, 16, 256, seed=6))
    assert torch.equal(quant_linear(torch.zeros(2, 256), qweight), torch.zeros(2, 16))
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(6))
    x[0, 5], x[2, 200] = float("nan"), float("inf")
    y = quant_linear(x, qweight)
    assert y[0].isnan().all() and y[2].isnan().all() and torch.isfinite(y[1]).all()


def test_the_option_reads_its_environment_variable():
    assert not options.Options.from_env({}).q8_rows
    assert options.Options.from_env({"SPECDEC_Q8_ROWS": "1"}).q8_rows
    assert not options.Options.from_env({"SPECDEC_Q8_ROWS": "0"}).q8_rows


@needs_kernels
@pytest.mark.parametrize("type_name", ["Q4_1", "Q4_K", "Q6_K"])
def test_a_model_loaded_with_q8_rows_is_batch_invariant_and_speculation_stays_lossless(
    tmp_path: Path, type_name: str
) -> None:
    path = write_quant_gguf(tmp_path / "t.gguf", type_name, seed=21)
    exact = load_model(path)
    with options.using(q8_rows=True):
        model = load_model(path)
    linears = [m for m in model.module.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.qweight.q8_rows for m in linears)
    assert all(not m.qweight.q8_rows for m in exact.module.modules() if isinstance(m, QuantLinear))
    ours, reference = logits_of(model, PROMPT), logits_of(exact, PROMPT)
    assert not torch.equal(ours, reference) and torch.isfinite(ours).all()  # another function: rounded rows
    # ... close to the exact one at most positions (each product is within ~1 % of it; a random
    # model amplifies that at some: Q6_K's random scales give one position a cosine of 0.6)
    assert torch.nn.functional.cosine_similarity(ours, reference, dim=-1).median() > 0.99
    # prefill (more than MAX_ROWS tokens: dequantized chunks and torch's GEMM, in bfloat16 where the
    # build has AVX512-BF16) stays as close
    prefill = [(7 * i) % 96 for i in range(45)]
    ours, reference = logits_of(model, prefill), logits_of(exact, prefill)
    assert torch.isfinite(ours).all()
    assert torch.nn.functional.cosine_similarity(ours, reference, dim=-1).median() > 0.99
    assert_batch_invariant(model)
    plain = SpeculativeGenerator(model).generate(PROMPT, max_new_tokens=30).token_ids
    for drafter in (
        make_drafter("ngram", model),
        make_drafter("draft", model, draft=str(path), num_draft_tokens=4),
    ):
        out = SpeculativeGenerator(model, drafter).generate(PROMPT, max_new_tokens=30)
        assert out.token_ids == plain, type(drafter).__name__


@needs_kernels
def test_a_model_with_q8_rows_in_the_batch_engine_equals_its_plain_greedy(tmp_path: Path) -> None:
    with options.using(q8_rows=True):
        model = load_model(write_quant_gguf(tmp_path / "t.gguf", "Q4_K", seed=23))
    prompts = [PROMPT, PROMPT[3:], [5, 6, 7, 5, 6, 7, 5, 6], [40, 41]]
    outputs: dict[int, list[int]] = {}
    requests = []
    for i, ids in enumerate(prompts):

        def emit(event: EngineEvent, i: int = i) -> None:
            outputs.setdefault(i, []).extend(event.token_ids)

        requests.append(EngineRequest(ids, 20 + i, SamplingParams(), emit))
    engine = BatchEngine(model, lambda: NgramDrafter(3), 4, ServerMetrics("t"), adaptive_draft_tokens=False)
    run_engine(engine, requests)
    plain = SpeculativeGenerator(model)
    for i, ids in enumerate(prompts):
        assert outputs[i] == plain.generate(ids, max_new_tokens=20 + i).token_ids, i
