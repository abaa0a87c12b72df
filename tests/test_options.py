"""specdec.options: one typed place for the numerics and speed options, the environment overriding it."""

from __future__ import annotations

from pathlib import Path

import pytest

from specdec import options
from specdec.options import Options


def test_defaults_without_environment():
    opts = Options.from_env({})
    assert opts == Options()
    assert (opts.cpu_kernels, opts.bf16_rows, opts.cuda_graphs) == ("auto", True, True)
    assert opts.cache_dir == Path("~/.cache/specdec").expanduser()


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ({"SPECDEC_CPU_KERNELS": "0"}, "cpu_kernels", "off"),
        ({"SPECDEC_CPU_KERNELS": "1"}, "cpu_kernels", "auto"),
        ({"SPECDEC_CPU_KERNELS": "AVX2"}, "cpu_kernels", "avx2"),
        ({"SPECDEC_CPU_KERNELS": "avx512vl"}, "cpu_kernels", "avx512vl"),
        ({"SPECDEC_BF16_ROWS": "0"}, "bf16_rows", False),
        ({"SPECDEC_BF16_ROWS": "1"}, "bf16_rows", True),
        ({"SPECDEC_CUDA_GRAPHS": "0"}, "cuda_graphs", False),
        ({"SPECDEC_CACHE": "/tmp/x"}, "cache_dir", Path("/tmp/x")),
    ],
)
def test_environment_overrides_one_field(env, field, value):
    opts = Options.from_env(env)
    assert getattr(opts, field) == value
    others = [f for f in Options.__dataclass_fields__ if f != field]
    assert all(getattr(opts, f) == getattr(Options(), f) for f in others)


def test_bad_values_are_refused_in_one_line():
    with pytest.raises(ValueError, match="SPECDEC_CPU_KERNELS must be one of"):
        Options.from_env({"SPECDEC_CPU_KERNELS": "sse2"})
    with pytest.raises(ValueError, match="cpu_kernels must be one of"):
        Options(cpu_kernels="fast")  # type: ignore[arg-type]


def test_set_and_using_change_what_the_kernels_read(set_options):
    from specdec import kernels

    set_options(bf16_rows=False)
    assert not kernels.bf16_rows_wanted() and not options.get_options().bf16_rows
    with options.using(bf16_rows=True) as inside:
        assert inside.bf16_rows and kernels.bf16_rows_wanted()
    assert not kernels.bf16_rows_wanted()  # restored after the block
