"""The few-row CPU linear kernel: exact enough, batch invariant, and used only where it may be."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from specdec import kernels
from specdec.sampling import SamplingParams

op = kernels.load()
needs_kernel = pytest.mark.skipif(
    op is None and not os.environ.get("CI"), reason=f"no kernel here: {kernels.status()}"
)


def test_kernel_is_built_on_avx2_machines_in_ci():
    # CI machines are x86 with AVX2 and a compiler: the fast path must not silently fall back there.
    if kernels._cpu_supported() is None:
        assert op is not None, kernels.status()
        assert kernels.status().startswith("specdec AVX2 kernels")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 32])
@pytest.mark.parametrize("shape", [(37, 13), (96, 64), (130, 1000)])
def test_float32_matches_float64_reference(rows, shape):
    N, K = shape
    gen = torch.Generator().manual_seed(rows * 1000 + N)
    x = torch.randn(rows, K, generator=gen)
    w = torch.randn(N, K, generator=gen)
    b = torch.randn(N, generator=gen)
    ref = x.double() @ w.double().T + b.double()
    y = kernels.linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (rows, N)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4 * K**0.5)
    # Same answer as torch's linear to float32 rounding.
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-4 * K**0.5)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 4, 6, 11])
def test_bfloat16_weights_are_widened_exactly(rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 72, generator=gen).bfloat16()  # leading dims are flattened
    w = torch.randn(50, 72, generator=gen).bfloat16()
    y = kernels.linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (2, rows, 50)
    ref = (x.double() @ w.double().T).bfloat16()  # float32 accumulation, one final rounding
    assert (y.float() - ref.float()).abs().max() <= 2 * ref.float().abs().max() * 2**-8


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("columns", [523, 256])
def test_each_row_is_independent_of_the_others_bitwise(dtype, columns):
    # A K-token verify pass must give the logits K one-token passes give: no batch effects.
    # 523 = 65 * 8 + 3 columns: 8-wide chunks and a scalar tail; 256: no tail, so blocks of 4 or 8
    # weight rows sum their accumulators together (hsum4 / hsum8); every row count from 1 to 9
    # (the blocks of weight rows and the chunks of x differ between them).
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, columns, generator=gen).to(dtype)
    x = torch.randn(23, columns, generator=gen)
    together = kernels.linear(x, w)
    for rows in range(1, 10):
        for start in range(0, 23, rows):
            part = kernels.linear(x[start : start + rows], w)
            assert torch.equal(part, together[start : start + rows])


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 9])
def test_float32_rows_with_bfloat16_weights_match_float64(rows):
    # The product the engine runs for bfloat16-exact checkpoints: float32 rows, bfloat16 weights
    # (widened in registers; 8-wide chunks and a scalar tail): float32 accumulation error only.
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(70, 523, generator=gen).bfloat16()
    x = torch.randn(rows, 523, generator=gen)
    y = kernels.linear(x, w)
    assert y.dtype == torch.float32
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T  # (rows, 70): the error bound's scale
    assert ((y.double() - ref).abs() <= 1e-5 * scale).all()


def test_falls_back_to_torch_where_the_kernel_does_not_apply():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 16, generator=gen, requires_grad=True)
    x = torch.randn(3, 16, generator=gen)
    y = kernels.linear(x, w)  # autograd needs torch's op
    y.sum().backward()
    assert w.grad is not None and torch.allclose(w.grad, x.sum(0).expand(8, -1))
    big = torch.randn(kernels.MAX_ROWS + 1, 16, generator=gen)
    torch.testing.assert_close(kernels.linear(big, w.detach()), F.linear(big, w.detach()))
    half = torch.randn(2, 16, generator=gen).half()
    assert kernels.linear(half, w.detach().half()).dtype == torch.float16


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 5, 13), (7, 256)])
def test_rms_norm_matches_torch_and_is_row_independent(shape):
    gen = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=gen) * 3
    w = torch.randn(shape[-1], generator=gen)
    y = kernels.rms_norm(x, w, 1e-5)
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert y.shape == x.shape
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    rows = x.reshape(-1, shape[-1])
    one_by_one = torch.cat([kernels.rms_norm(r[None], w, 1e-5) for r in rows])
    assert torch.equal(one_by_one, y.reshape(-1, shape[-1]))


@needs_kernel
def test_greedy_chain_drafting_in_one_call_equals_the_python_loop():
    # DraftModelDrafter's greedy chain runs in one C++ call: the same drafts as a loop of forwards
    # and argmaxes, and the same cache afterwards (the last draft is not fed).
    from specdec.models.loading import load_model

    draft = load_model("demo-draft", dtype="float32").module
    tokens = torch.randint(0, 8000, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fast_cache, loop_cache = draft.new_cache(1, 128), draft.new_cache(1, 128)
        for cache in (fast_cache, loop_cache):
            draft(tokens[:, :30], torch.arange(30), cache)
        fast, probs = draft.draft_chain(tokens[:, 30:33], 30, 5, fast_cache, SamplingParams())
        feed, pos, loop = tokens[:, 30:33], 30, []
        for _ in range(5):
            end = pos + feed.shape[1]
            logits = draft(feed, torch.arange(pos, end), loop_cache, num_logits=1, kv_len=end)  # (1, 1, V)
            loop.append(int(logits[0, -1].argmax()))
            pos, feed = end, logits[0, -1].argmax().view(1, 1)
    assert fast.tolist() == loop and probs is None
    assert fast_cache.lengths == [37]
    assert torch.equal(fast_cache.k[:, :, :, :37], loop_cache.k[:, :, :, :37])
    assert torch.equal(fast_cache.v[:, :, :, :37], loop_cache.v[:, :, :, :37])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_rows_are_row_independent_bitwise(dtype):
    # Rows of 9000 weights: blocks prefetch further along their own rows (kernels.h,
    # prefetch_lead) instead of the rows kPrefetchBlocks blocks ahead; bits stay the same.
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(40, 9000, generator=gen).to(dtype)
    x = torch.randn(9, 9000, generator=gen)
    together = kernels.linear(x, w)
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    assert ((together.double() - ref).abs() <= 1e-5 * scale).all()
    for rows in range(1, 9):
        assert torch.equal(kernels.linear(x[:rows], w), together[:rows])


_PROBE = """
import sys, torch, specdec
from specdec import kernels
assert kernels.load() is not None, kernels.status()
gen = torch.Generator().manual_seed(3)
out = {"status": kernels.status()}
for dtype in (torch.float32, torch.bfloat16):
    w = torch.randn(300, 523, generator=gen).to(dtype)
    x = torch.randn(9, 523, generator=gen)
    for rows in range(1, 10):
        out[f"{dtype}-{rows}"] = kernels.linear(x[:rows], w)
target = specdec.load_model("demo-target", dtype="float32")
cache = target.new_cache(1, 64)
with torch.inference_mode():
    target.step(torch.arange(1, 21)[None], torch.arange(20), cache, kv_len=20)
    out["verify"] = target.step(torch.arange(30, 35)[None], torch.arange(20, 25), cache, kv_len=25)
torch.save(out, sys.argv[1])
"""


@needs_kernel
def test_the_avx2_and_avx512vl_builds_give_the_same_bits(tmp_path):
    # Where AVX-512VL exists the kernels are built with it (32 vector registers, other blocks of
    # weight rows); the arithmetic of every output with float32 rows must stay the AVX2 build's,
    # bit for bit. Runs only on such machines (it compiles the AVX2 build once, ~25 s, into the
    # usual cache).
    if op is None or kernels._state.get("build") == kernels.AVX2_BUILD[0]:
        pytest.skip("this machine builds only the AVX2 kernels")
    import subprocess
    import sys

    results = {}
    for build in ("default", "avx2"):
        env = {k: v for k, v in os.environ.items() if k != "SPECDEC_CPU_KERNELS"}
        if build == "avx2":
            env["SPECDEC_CPU_KERNELS"] = "avx2"
        path = tmp_path / f"{build}.pt"
        subprocess.run([sys.executable, "-c", _PROBE, str(path)], env=env, check=True, timeout=600)
        results[build] = torch.load(path)
    assert "32 registers" in results["default"].pop("status")
    assert "16 registers" in results["avx2"].pop("status")
    for key, value in results["default"].items():
        assert torch.equal(value, results["avx2"][key]), key


_FALLBACK = """
import sys
from specdec import kernels
kernels._builds = lambda: [("specdec_kernels_broken", ["-mno-such-isa-flag"]), kernels.AVX2_BUILD]
assert kernels.load() is not None, kernels.status()
print(kernels.status())
"""


@needs_kernel
def test_a_build_that_fails_falls_back_to_the_avx2_build():
    # A compiler that cannot build the AVX-512VL variant must still give the AVX2 kernels.
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _FALLBACK], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "16 registers" in run.stdout
    assert "could not build the CPU kernels" in run.stderr and "specdec_kernels_broken" in run.stderr


@needs_kernel
@pytest.mark.parametrize("columns", [256, 523])
def test_bfloat16_rows_use_dot_products_only_where_asked(columns, set_options):
    # Models run in bfloat16 (kernels.bf16_rows): rows rounded to bfloat16, dot products of
    # bfloat16 pairs with float32 accumulation (where the build has AVX512-BF16), every row count
    # bit for bit independent of the batch; outside the block the float32-row products, unchanged.
    set_options(bf16_rows=True)
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(300, columns, generator=gen).bfloat16()
    x = torch.randn(23, columns, generator=gen)
    plain = kernels.linear(x, w)
    with kernels.bf16_rows(True):
        together = kernels.linear(x, w)
        for rows in range(1, 10):
            for start in range(0, 23, rows):
                assert torch.equal(kernels.linear(x[start : start + rows], w), together[start : start + rows])
        with kernels.bf16_rows(False):  # nested: a float32 model inside keeps float32 rows
            assert torch.equal(kernels.linear(x, w), plain)
    assert torch.equal(kernels.linear(x, w), plain)  # restored
    # Where the build has bfloat16 dot products the rows really were rounded (not the float32-row
    # product); elsewhere (the AVX2 build) bfloat16 rows change nothing.
    rows = x.bfloat16().double() if kernels.bf16_dot() else x.double()
    exact = rows @ w.double().T
    scale = rows.abs() @ w.double().abs().T
    assert ((together.double() - exact).abs() <= 1e-5 * scale).all()
    assert torch.equal(together, plain) != kernels.bf16_dot()


@needs_kernel
def test_bfloat16_rows_flush_denormals_whatever_the_row_count(set_options):
    # vdpbf16ps treats denormal inputs and results as zero; 1-2-row products compute the same sums
    # with FMAs (kernels.h, DotFmaStep) and must flush them too, or a row's bits would depend on
    # how many rows share its pass.
    set_options(bf16_rows=True)
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(40, 64, generator=gen).bfloat16()
    x = torch.randn(6, 64, generator=gen)
    x[0] *= 1e-39  # denormal rows: zero products
    x[1, :32] *= 1e-39  # half denormal
    x[2, ::2] *= 1e30  # large and small terms in one sum: the order of the roundings shows
    tiny_w = (w.float() * 1e-19).bfloat16()  # normal weights whose products with x[4:] ...
    x[4:] *= 1e-20  # ... (normal rows) are below the smallest normal float32
    with kernels.bf16_rows(True):
        for weight in (w, tiny_w):
            together = kernels.linear(x, weight)  # 6 rows: vdpbf16ps where the build has it
            alone = torch.cat([kernels.linear(x[i : i + 1], weight) for i in range(6)])
            pairs = torch.cat([kernels.linear(x[i : i + 2], weight) for i in range(0, 6, 2)])
            assert torch.equal(alone, together) and torch.equal(pairs, together)
            if kernels.bf16_dot():
                # on a Zen 4 each pair's odd product is added first, then the even one (checked at load)
                assert kernels.bf16_fma_twin(), "this CPU's vdpbf16ps sums differ: 1-2-row passes use it"
                assert torch.equal(together[0], torch.zeros(40))
                assert (together[1] != 0).all()
                assert torch.equal(together[4:] == 0, torch.full((2, 40), weight is tiny_w))


@needs_kernel
def test_bfloat16_rows_are_on_unless_turned_off(set_options):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(64, 256, generator=gen).bfloat16()
    x = torch.randn(3, 256, generator=gen)
    plain = kernels.linear(x, w)
    set_options(bf16_rows=False)
    with kernels.bf16_rows(True):
        assert torch.equal(kernels.linear(x, w), plain)
    set_options(bf16_rows=True)
    with kernels.bf16_rows(True):
        assert torch.equal(kernels.linear(x, w), plain) != kernels.bf16_dot()


_AFTER_DISTUTILS = """
import warnings
warnings.simplefilter("ignore")
import pip  # noqa: F401
import distutils.core  # noqa: F401  (setuptools refuses to load after this)
from specdec import kernels
assert kernels.load() is not None, kernels.status()
print(kernels.status())
"""


@needs_kernel
def test_built_kernels_load_in_a_process_that_imported_distutils_first():
    # torch.utils.cpp_extension needs setuptools, which cannot load once distutils is imported (any
    # `import pip`); a library built before loads without it.
    import subprocess
    import sys

    kernels.load()  # built (or already current) in this process
    run = subprocess.run([sys.executable, "-c", _AFTER_DISTUTILS], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("specdec AVX2 kernels")
