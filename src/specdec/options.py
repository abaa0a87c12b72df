"""Options that change numerics or speed, in one typed place.

Every knob that decides *how* specdec computes (which CPU kernels, whether bfloat16 models round
their rows to bfloat16, CUDA graphs, where downloads and built kernels are cached) lives in
:class:`Options`. The process-wide value starts from the defaults below, overridden by
environment variables (for shells and CI), and code may change it with :func:`set_options` or
for a block with :func:`using`::

    import specdec
    specdec.set_options(bf16_rows=False)          # every later forward
    with specdec.options.using(cuda_graphs=False):  # just this block
        ...

=====================  ======================  =============================================
field                  environment override    meaning
=====================  ======================  =============================================
``cpu_kernels``        ``SPECDEC_CPU_KERNELS``  ``auto``: the best build this CPU runs;
                                                ``avx2`` / ``avx512vl``: that build at most;
                                                ``off`` (or ``0``): torch's ops only. Read
                                                once, when the kernels first load.
``bf16_rows``          ``SPECDEC_BF16_ROWS``    models run in bfloat16 round the rows of their
                                                products to bfloat16 and use AVX512-BF16 dot
                                                products where the CPU has them (``0``: off).
``q8_rows``            ``SPECDEC_Q8_ROWS``      quantized GGUF models loaded while it is on
                                                quantize the rows of their decoding and verify
                                                products to 8 bits (``1``: on; off by
                                                default): llama.cpp's numerics, about twice
                                                the speed (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K).
``cuda_graphs``        ``SPECDEC_CUDA_GRAPHS``  replay recorded CUDA graphs for chain passes.
``cache_dir``          ``SPECDEC_CACHE``        downloads (the default model's wheel) land here.
=====================  ======================  =============================================

What depends on the CPU: a model run in **float32** gives the same greedy tokens on every x86
CPU in its decoding passes (the kernels' AVX2 and AVX-512 builds are bit-identical), but its
prefill uses the BLAS library, whose kernels differ between CPUs, so on rare near-ties the output
can differ. A model run in **bfloat16** with ``bf16_rows`` (the default) rounds activations to
bfloat16 only where the CPU has AVX512-BF16: its output can differ between such CPUs and AVX2-only
ones more often. A quantized model loaded with ``q8_rows`` computes a slightly different function:
its decoding and verify passes round their rows to 8 bits per group of 32, as llama.cpp's CPU
products do (the same bits on every x86 CPU), and its prefill rounds them to bfloat16 where the
CPU has AVX512-BF16 (torch's bfloat16 GEMM). Either way speculative output equals plain output
on the same machine, token for token: losslessness is always with respect to the function the
machine runs.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CpuKernels = Literal["auto", "avx2", "avx512vl", "off"]
_CPU_KERNELS: tuple[str, ...] = ("auto", "avx2", "avx512vl", "off")


@dataclass(frozen=True)
class Options:
    """Process-wide numerics and speed options (see the module docstring for each field)."""

    cpu_kernels: CpuKernels = "auto"
    bf16_rows: bool = True
    q8_rows: bool = False
    cuda_graphs: bool = True
    cache_dir: Path = Path("~/.cache/specdec")

    def __post_init__(self) -> None:
        if self.cpu_kernels not in _CPU_KERNELS:
            raise ValueError(
                f"cpu_kernels must be one of {', '.join(_CPU_KERNELS)}, not {self.cpu_kernels!r}"
            )
        object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Options:
        """The defaults, overridden by ``SPECDEC_*`` environment variables where they are set."""
        env = os.environ if environ is None else environ
        kernels = env.get("SPECDEC_CPU_KERNELS", "auto").strip().lower()
        kernels = {"0": "off", "1": "auto", "": "auto"}.get(kernels, kernels)
        if kernels not in _CPU_KERNELS:
            raise ValueError(
                f"SPECDEC_CPU_KERNELS must be one of 0, 1, {', '.join(_CPU_KERNELS)}, not {kernels!r}"
            )
        return cls(
            cpu_kernels=kernels,  # type: ignore[arg-type]  # checked just above
            bf16_rows=env.get("SPECDEC_BF16_ROWS", "1") != "0",
            q8_rows=env.get("SPECDEC_Q8_ROWS", "0") not in ("0", ""),
            cuda_graphs=env.get("SPECDEC_CUDA_GRAPHS", "1") != "0",
            cache_dir=Path(env.get("SPECDEC_CACHE") or "~/.cache/specdec"),
        )


_lock = threading.Lock()
_current: Options | None = None


def get_options() -> Options:
    """The options in force (built from the environment on first use)."""
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                _current = Options.from_env()
    return _current


def set_options(**changes: object) -> Options:
    """Replace some fields of the options in force for the whole process; returns the new value."""
    global _current
    with _lock:
        base = _current if _current is not None else Options.from_env()
        _current = dataclasses.replace(base, **changes)  # type: ignore[arg-type]
        return _current


@contextmanager
def using(**changes: object) -> Iterator[Options]:
    """Options with ``changes`` within the block, the previous ones restored after it."""
    global _current
    previous = get_options()
    set_options(**changes)
    try:
        yield get_options()
    finally:
        with _lock:
            _current = previous
