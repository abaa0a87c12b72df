"""CPU kernels for decoding and verification: few-row products, RMSNorm, a one-call forward.

``linear(x, weight, bias)`` is ``F.linear`` with one difference: on an x86 CPU with AVX2 and
FMA, for at most :data:`MAX_ROWS` rows, float32 or bfloat16 weights and no autograd, it runs
the product of ``kernels.h``, which reads every weight once for all rows and widens bfloat16
weights to float32 in registers. Why: on AVX2 CPUs MKL's sgemm runs a 1-row product well under
the memory bandwidth and a 4-16 row product at 3-7x the 1-row time (docs/benchmarks.md), which
is exactly the regime where speculative decoding lives.

The C++ source is compiled once per machine with ``torch.utils.cpp_extension`` (about 25 s,
cached in ``$TORCH_EXTENSIONS_DIR/specdec`` or ``~/.cache/torch_extensions/specdec`` under a name
that hashes sources, flags and versions, so later processes load it without setuptools); ``make``
builds it at install time (``python -m specdec.kernels``). Where the CPU has AVX-512VL the same 256-bit code
is built with it (32 vector registers instead of 16: more accumulators per block of weight rows,
the same bits; :func:`_builds`). Where it cannot be built or used (no compiler, no
AVX2, another device) everything falls back to ``F.linear``. The option ``cpu_kernels="off"``
(:mod:`specdec.options`; ``SPECDEC_CPU_KERNELS=0``) turns it off. ``rms_norm`` is the same idea for RMSNorm: one op where torch's CPU ``rms_norm``
runs about six. ``model_forward`` / ``decoder_layers`` (``forward.cpp``) run a whole pass of a
Llama-family model on raw float32 rows, with float32 or bfloat16 weights; :func:`exact_bfloat16`
gives the bfloat16 copy of a float32 weight that loses nothing (a checkpoint stored in bfloat16),
which the forward reads at half the bytes with bit-identical results.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from specdec.options import get_options

MAX_ROWS = 32  # above this (prefill, training) the BLAS library is the better tool
# Weights per decoder layer in the lists the one-call forward reads (DecoderLayer.kernel_weights,
# forward.cpp's LayerWeight): input norm, q/k/v weight (or q), q/k/v bias, o_proj, post-attention
# norm, gate/up weight (or gate), down_proj, then k, v and up where q/k/v or gate/up are parts.
LAYER_WEIGHTS = 10
_SOURCES = [Path(__file__).with_name(name) for name in ("ops.cpp", "forward.cpp", "quant.cpp")]
_HEADERS = [Path(__file__).with_name(name) for name in ("kernels.h", "forward.h", "quant.h", "quant_q8.h")]
_lock = threading.Lock()
_state: dict[str, object] = {}  # "op": the loaded op or None, "why": the reason it is off


def _cpu_flags() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def _cpu_supported() -> str | None:
    """None if this CPU can run the kernel, else the reason it cannot."""
    if get_options().cpu_kernels == "off":
        return "turned off by the option cpu_kernels (SPECDEC_CPU_KERNELS=0)"
    flags = _cpu_flags()
    if flags is None:
        return "cannot read /proc/cpuinfo (not Linux x86)"
    if " avx2" not in flags or " fma" not in flags:
        return "this CPU has no AVX2/FMA"
    return None


AVX512VL_BUILD = (
    "specdec_kernels_avx512vl",
    ["-mavx512f", "-mavx512vl", "-mprefer-vector-width=256", "-DSPECDEC_VREGS=32"],
)
AVX512BF16_BUILD = (
    "specdec_kernels_avx512bf16",
    [*AVX512VL_BUILD[1], "-mavx512bf16", "-mavx512vnni", "-DSPECDEC_BF16DOT"],
)
AVX2_BUILD: tuple[str, list[str]] = ("specdec_kernels", [])


def _builds() -> list[tuple[str, list[str]]]:
    """The builds to try, best first: extension name and ISA flags. Where AVX-512VL exists the
    same 256-bit code is built with it, which gives the compiler 32 vector registers instead of
    16, so the products keep more accumulators in registers (kernels.h, ``block_rows``): the
    same bits, faster passes of 3-8 rows; where AVX512-BF16 exists too, also with it, for the
    products of models run in bfloat16 (:func:`bf16_rows`). Each build falls back to the next (a
    compiler without AVX-512 support). The option ``cpu_kernels="avx2"`` or ``"avx512vl"``
    (:mod:`specdec.options`, ``SPECDEC_CPU_KERNELS``) asks for that build at most. Each build has its own name, so a cache shared by two kinds of machine
    never hands one the other's."""
    flags = _cpu_flags() or ""
    wanted = get_options().cpu_kernels
    if " avx512f" not in flags or " avx512vl" not in flags or wanted == "avx2":
        return [AVX2_BUILD]
    if " avx512_bf16" in flags and " avx512_vnni" in flags and wanted != "avx512vl":
        return [AVX512BF16_BUILD, AVX512VL_BUILD, AVX2_BUILD]
    return [AVX512VL_BUILD, AVX2_BUILD]


def _extensions_dir() -> Path:
    """Where built kernels live: ``$TORCH_EXTENSIONS_DIR/specdec`` or ``~/.cache/torch_extensions/specdec``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root) / "specdec"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "torch_extensions" / "specdec"


def _cflags(isa: list[str]) -> list[str]:
    return ["-O3", "-mavx2", "-mfma", *isa, "-fopenmp"]


def _build_id(name: str, isa: list[str]) -> str:
    """``name`` plus a hash of everything the library depends on (sources, headers, flags, torch and
    Python versions): a built library whose id matches is current and loads without a compiler."""
    digest = hashlib.sha256()
    for path in (*_SOURCES, *_HEADERS):
        digest.update(path.read_bytes())
    digest.update(" ".join([*_cflags(isa), torch.__version__, sys.version.split()[0]]).encode())
    return f"{name}_{digest.hexdigest()[:12]}"


def _load_build(name: str, isa: list[str], verbose: bool) -> None:
    """Load the library of one build, compiling it first if this machine has no current copy.
    Loading a built library needs neither setuptools nor a compiler (a process that imported
    distutils first, as ``import pip`` does, cannot import ``torch.utils.cpp_extension``)."""
    build_id = _build_id(name, isa)
    folder = _extensions_dir() / build_id
    library = folder / f"{build_id}.so"
    if not library.is_file():
        from torch.utils.cpp_extension import load as build

        if verbose:
            print(f"specdec: compiling the CPU kernels ({name}; once per machine, ~25 s)...", file=sys.stderr)
        folder.mkdir(parents=True, exist_ok=True)
        build(
            name=build_id,
            sources=[str(path) for path in _SOURCES],
            extra_cflags=_cflags(isa),
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            is_python_module=False,
            verbose=False,
        )
    else:
        torch.ops.load_library(str(library))


def load(verbose: bool = False) -> object | None:
    """The compiled op (building it on first use), or None where it is unavailable."""
    if "op" in _state:
        return _state["op"]
    with _lock:
        if "op" in _state:
            return _state["op"]
        why = _cpu_supported()
        op = None
        if why is None:
            for name, isa in _builds():
                try:
                    _load_build(name, isa, verbose)
                    op, why = torch.ops.specdec, None
                    _state["build"] = name
                    break
                except Exception as exc:  # no compiler, no headers: the next build, or torch's ops
                    why = f"could not build the CPU kernels ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                    print(f"specdec: {why} ({name})", file=sys.stderr)
            if op is None:
                print("specdec: using torch's linear", file=sys.stderr)
        _state["op"], _state["why"] = op, why
        return op


def _op() -> object | None:
    """The loaded op namespace without taking the lock once it is known (the hot path)."""
    return _state["op"] if "op" in _state else load()


def status() -> str:
    """One line for logs and benchmark reports: which linear path few-row passes take."""
    op = load()
    if op is None:
        return f"torch ops ({_state['why']})"
    registers = {
        AVX512BF16_BUILD[0]: "32 registers, AVX-512VL build with bfloat16 dot products",
        AVX512VL_BUILD[0]: "32 registers, AVX-512VL build",
    }.get(str(_state.get("build")), "16 registers")
    return f"specdec AVX2 kernels ({registers}; small_linear, rms_norm, one-call forward)"


def bf16_dot() -> bool:
    """Whether the loaded kernels multiply bfloat16 rows with AVX512-BF16 dot products."""
    return load() is not None and _state.get("build") == AVX512BF16_BUILD[0]


def bf16_fma_twin() -> bool:
    """Whether products of 1-2 bfloat16 rows compute the dot products' sums with FMAs, bit for bit
    (they stream weights faster that way; checked on the running CPU, kernels.h ``DotFmaStep``)."""
    return bf16_dot() and bool(_state["op"].bf16_fma_twin())  # type: ignore[attr-defined]


_thread = threading.local()  # .bf16_rows: this thread's setting in the kernels (False until set)
_unchanged = nullcontext()  # (reusable: the setting stays as it is)


def bf16_rows_wanted() -> bool:
    """Whether models run in bfloat16 round the rows of their products to bfloat16 and multiply
    them with AVX512-BF16 dot products (where :func:`bf16_dot`): yes unless the option
    ``bf16_rows`` is off (:mod:`specdec.options`; ``SPECDEC_BF16_ROWS=0``). On a Zen 4 it makes verify passes of 5 and 8 tokens of a 700M
    bfloat16 target 30-36 % faster and 1-3-token passes as fast (docs/benchmarks.md section 4);
    it changes the model's function slightly, every row count alike, so speculative decoding stays
    lossless."""
    return get_options().bf16_rows


def bf16_rows(on: bool) -> AbstractContextManager[None]:
    """Within the block, on this thread, products of bfloat16 weights round their rows to bfloat16
    and use AVX512-BF16 dot products (where :func:`bf16_dot`): for models run in bfloat16, whose
    activations are bfloat16 anyway, when :func:`bf16_rows_wanted`. Never for float32 models,
    whose bfloat16 weight copies are exact and must give float32 results. Restores the previous
    setting on exit; where the setting does not change (every float32 model's pass) it is a
    shared no-op, as it runs around every forward."""
    on = bool(on) and bf16_rows_wanted()
    op = _op()
    if op is None or on == getattr(_thread, "bf16_rows", False):
        return _unchanged
    return _Switched(op, on)


class _Switched:
    """bf16_rows's switch (a class rather than a generator: 2.7 against 3.6 us around every forward)."""

    __slots__ = ("op", "on", "previous")

    def __init__(self, op: Any, on: bool) -> None:
        self.op, self.on = op, on

    def __enter__(self) -> None:
        self.previous = getattr(_thread, "bf16_rows", False)
        self.op.set_bf16_rows(self.on)
        _thread.bf16_rows = self.on

    def __exit__(self, *exc: object) -> None:
        self.op.set_bf16_rows(self.previous)
        _thread.bf16_rows = self.previous


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; the kernel for few rows on a supported CPU."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (
        0 < rows <= MAX_ROWS
        and x.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and (x.dtype == weight.dtype or x.dtype == torch.float32)  # float32 rows, bfloat16 weights: exact
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        op = _op()
        if op is not None:
            return op.small_linear(x, weight, bias)  # type: ignore[attr-defined]
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.rms_norm(x, (d,), weight, eps)`` for float32 CPU tensors without autograd; one op."""
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        op = _op()
        if op is not None:
            return op.rms_norm(x, weight, eps)  # type: ignore[attr-defined]
    return F.rms_norm(x, x.shape[-1:], weight, eps=eps)


def fused_layers_apply(x: torch.Tensor) -> bool:
    """Whether :func:`decoder_layers` / :func:`model_forward` can run with ``x`` (hidden states
    or a weight of the model): float32 or bfloat16, CPU, no autograd, kernels built."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and not torch.is_grad_enabled()
        and _op() is not None
    )


def exact_bfloat16(weight: torch.Tensor) -> torch.Tensor | None:
    """A bfloat16 copy of a float32 CPU ``weight`` if it holds exactly the same values (every
    weight has a zero lower half, as after loading a bfloat16 checkpoint in float32), else None.
    The kernels widen bfloat16 to float32 exactly, so the copy gives bit-identical products."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.numel() == 0:
        return None
    flat = weight.detach().reshape(-1)
    if not torch.equal(flat[:64], flat[:64].bfloat16().float()):  # fails at once for most float32 weights
        return None
    compact = flat.bfloat16()
    return compact.view(weight.shape) if torch.equal(compact.float(), flat) else None


def decoder_layers(
    h: torch.Tensor,  # (B, T, d)
    input_pos: torch.Tensor,  # (B, T)
    inv_freq: torch.Tensor,  # (D/2,)
    k_cache: torch.Tensor,  # (L, B, Hkv, S, D)
    v_cache: torch.Tensor,  # (L, B, Hkv, S, D)
    slots: torch.Tensor,  # (B, T)
    mask: torch.Tensor | None,  # (B, 1, T, kv_len) bool or None
    kv_len: int,
    begin: int,
    end: int,
    weights: list[torch.Tensor | None],  # LAYER_WEIGHTS per layer (see Transformer.fuse)
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> torch.Tensor:
    """Decoder layers ``begin..end-1`` in one call (``Transformer.run_layers``); float32
    activations inside, returned in ``h``'s dtype."""
    op = _state["op"]
    return op.decoder_layers(  # type: ignore[attr-defined]
        h,
        input_pos,
        inv_freq,
        k_cache,
        v_cache,
        slots,
        mask,
        kv_len,
        begin,
        end,
        weights,
        num_heads,
        num_kv_heads,
        head_dim,
        eps,
    )


def model_forward(
    tokens: torch.Tensor,  # (B, T)
    input_pos: torch.Tensor,  # (B, T)
    inv_freq: torch.Tensor,  # (D/2,)
    embed: torch.Tensor,  # (V, d)
    k_cache: torch.Tensor,  # (L, B, Hkv, S, D)
    v_cache: torch.Tensor,  # (L, B, Hkv, S, D)
    slots: torch.Tensor,  # (B, T)
    mask: torch.Tensor | None,  # (B, 1, T, kv_len) bool or None
    kv_len: int,
    weights: list[torch.Tensor | None],  # LAYER_WEIGHTS per layer (see Transformer.fuse)
    norm: torch.Tensor,  # (d,)
    lm_head: torch.Tensor,  # (V, d)
    num_logits: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Transformer.forward`` in one call: float32 ``(logits (B, num_logits, V), final normed
    hidden states (B, T, d))``."""
    op = _state["op"]
    return op.model_forward(  # type: ignore[attr-defined,no-any-return]
        tokens, input_pos, inv_freq, embed, k_cache, v_cache, slots, mask, kv_len, weights, norm, lm_head,
        num_logits, num_heads, num_kv_heads, head_dim, eps,
    )  # fmt: skip


def draft_greedy(
    tokens: torch.Tensor,  # (1, T)
    start: int,
    num_tokens: int,
    inv_freq: torch.Tensor,  # (D/2,)
    embed: torch.Tensor,  # (V, d)
    k_cache: torch.Tensor,  # (L, 1, Hkv, S, D)
    v_cache: torch.Tensor,  # (L, 1, Hkv, S, D)
    weights: list[torch.Tensor | None],
    norm: torch.Tensor,  # (d,)
    lm_head: torch.Tensor,  # (V, d), or (N, d): the rows of ids
    ids: torch.Tensor | None,  # (N,) token id of each lm_head row (a reduced draft vocabulary) or None
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> torch.Tensor:
    """Greedy chain drafting in one call (``Transformer.draft_chain``, greedy): ``(K,)`` int64 tokens."""
    op = _state["op"]
    return op.draft_greedy(  # type: ignore[attr-defined,no-any-return]
        tokens, start, num_tokens, inv_freq, embed, k_cache, v_cache, weights, norm, lm_head, ids, num_heads,
        num_kv_heads, head_dim, eps,
    )  # fmt: skip


def draft_sample(
    tokens: torch.Tensor,  # (1, T)
    start: int,
    num_tokens: int,
    inv_freq: torch.Tensor,  # (D/2,)
    embed: torch.Tensor,  # (V, d)
    k_cache: torch.Tensor,  # (L, 1, Hkv, S, D)
    v_cache: torch.Tensor,  # (L, 1, Hkv, S, D)
    weights: list[torch.Tensor | None],
    norm: torch.Tensor,  # (d,)
    lm_head: torch.Tensor,  # (V, d), or (N, d): the rows of ids
    ids: torch.Tensor | None,  # (N,) token id of each lm_head row or None
    uniforms: torch.Tensor,  # (K,) float64 in [0, 1): one per draft
    temperature: float,
    top_k: int,  # 0: no cut
    top_p: float,  # 1.0: no cut
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled chain drafting in one call (``Transformer.draft_chain``, sampling): ``(K,)`` int64 tokens and
    the ``(K, N)`` float32 distributions over ``lm_head``'s rows they were drawn from."""
    op = _state["op"]
    return op.draft_sample(  # type: ignore[attr-defined,no-any-return]
        tokens, start, num_tokens, inv_freq, embed, k_cache, v_cache, weights, norm, lm_head, ids, uniforms,
        temperature, top_k, top_p, num_heads, num_kv_heads, head_dim, eps,
    )  # fmt: skip


def eagle_greedy(
    tokens: torch.Tensor,  # (T,) x_{t+1} of head entries start..
    features: torch.Tensor,  # (T, d) target features f_t of those entries
    start: int,
    num_tokens: int,
    inv_freq: torch.Tensor,  # (D/2,)
    embed: torch.Tensor,  # (V, d) the target's embedding
    fc: torch.Tensor,  # (d, 2d)
    k_cache: torch.Tensor,  # (1, 1, Hkv, S, D) the head's cache
    v_cache: torch.Tensor,  # (1, 1, Hkv, S, D)
    weights: list[torch.Tensor | None],  # the head's decoder layer, LAYER_WEIGHTS (see Transformer.fuse)
    lm_head: torch.Tensor,  # (V, d), or (N, d): the rows of ids
    ids: torch.Tensor | None,  # (N,) token id of each lm_head row (a reduced draft vocabulary) or None
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> torch.Tensor:
    """EAGLE's greedy chain in one call (``EagleHead.draft_chain``): ``(K,)`` int64 tokens."""
    op = _state["op"]
    return op.eagle_greedy(  # type: ignore[attr-defined,no-any-return]
        tokens, features, start, num_tokens, inv_freq, embed, fc, k_cache, v_cache, weights, lm_head, ids,
        num_heads, num_kv_heads, head_dim, eps,
    )  # fmt: skip


def eagle_sample(
    tokens: torch.Tensor,  # (T,) x_{t+1} of head entries start..
    features: torch.Tensor,  # (T, d) target features f_t of those entries
    start: int,
    num_tokens: int,
    inv_freq: torch.Tensor,  # (D/2,)
    embed: torch.Tensor,  # (V, d) the target's embedding
    fc: torch.Tensor,  # (d, 2d)
    k_cache: torch.Tensor,  # (1, 1, Hkv, S, D) the head's cache
    v_cache: torch.Tensor,  # (1, 1, Hkv, S, D)
    weights: list[torch.Tensor | None],  # the head layer's 7 weights
    lm_head: torch.Tensor,  # (V, d), or (N, d): the rows of ids
    ids: torch.Tensor | None,  # (N,) token id of each lm_head row or None
    uniforms: torch.Tensor,  # (K,) float64 in [0, 1): one per draft
    temperature: float,
    top_k: int,  # 0: no cut
    top_p: float,  # 1.0: no cut
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EAGLE's sampled chain in one call (``EagleHead.draft_chain``): ``(K,)`` int64 tokens and the
    ``(K, N)`` float32 distributions over ``lm_head``'s rows they were drawn from."""
    op = _state["op"]
    return op.eagle_sample(  # type: ignore[attr-defined,no-any-return]
        tokens, features, start, num_tokens, inv_freq, embed, fc, k_cache, v_cache, weights, lm_head, ids,
        uniforms, temperature, top_k, top_p, num_heads, num_kv_heads, head_dim, eps,
    )  # fmt: skip


def exit_greedy(
    tokens: torch.Tensor,  # (T,)
    start: int,
    num_tokens: int,
    inv_freq: torch.Tensor,  # (D/2,)
    embed: torch.Tensor,  # (V, d)
    k_cache: torch.Tensor,  # (L', 1, Hkv, S, D), L' >= num_layers
    v_cache: torch.Tensor,  # (L', 1, Hkv, S, D)
    weights: list[torch.Tensor | None],  # the target's, LAYER_WEIGHTS per layer (see Transformer.fuse)
    num_layers: int,
    exit_norm: torch.Tensor,  # (d,)
    exit_proj: torch.Tensor,  # (d, d)
    lm_head: torch.Tensor,  # (V, d), or (N, d): the rows of ids
    ids: torch.Tensor | None,  # (N,) token id of each lm_head row (a reduced draft vocabulary) or None
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The early-exit greedy chain in one call (``EarlyExitDrafter.propose``): ``(K,)`` int64
    drafts and ``(K, d)`` float32 layer-L states of the tokens fed at each step."""
    op = _state["op"]
    return op.exit_greedy(  # type: ignore[attr-defined,no-any-return]
        tokens, start, num_tokens, inv_freq, embed, k_cache, v_cache, weights, num_layers, exit_norm, exit_proj,
        lm_head, ids, num_heads, num_kv_heads, head_dim, eps,
    )  # fmt: skip


def exit_sample(
    tokens: torch.Tensor,  # (T,)
    start: int,
    num_tokens: int,
    inv_freq: torch.Tensor,  # (D/2,)
    embed: torch.Tensor,  # (V, d)
    k_cache: torch.Tensor,  # (L', 1, Hkv, S, D)
    v_cache: torch.Tensor,  # (L', 1, Hkv, S, D)
    weights: list[torch.Tensor | None],  # the target's, LAYER_WEIGHTS per layer
    num_layers: int,
    exit_norm: torch.Tensor,  # (d,)
    exit_proj: torch.Tensor,  # (d, d)
    lm_head: torch.Tensor,  # (V, d), or (N, d): the rows of ids
    ids: torch.Tensor | None,  # (N,) token id of each lm_head row or None
    uniforms: torch.Tensor,  # (K,) float64 in [0, 1): one per draft
    temperature: float,
    top_k: int,  # 0: no cut
    top_p: float,  # 1.0: no cut
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Early exit's sampled chain in one call: ``(K,)`` int64 drafts, the ``(K, d)`` layer-L
    states of the tokens fed (as :func:`exit_greedy`) and the ``(K, N)`` float32 distributions
    over ``lm_head``'s rows the drafts were drawn from."""
    op = _state["op"]
    return op.exit_sample(  # type: ignore[attr-defined,no-any-return]
        tokens, start, num_tokens, inv_freq, embed, k_cache, v_cache, weights, num_layers, exit_norm, exit_proj,
        lm_head, ids, uniforms, temperature, top_k, top_p, num_heads, num_kv_heads, head_dim, eps,
    )  # fmt: skip
