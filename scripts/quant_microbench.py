"""Time the quantized few-row products per format: microseconds for 1, 2 and 5 rows of x.

Random blocks of each format (the tests' ``random_blocks``), an ``(N, K)`` weight, one torch
thread, best of 7 timings of 100 products. Compare two versions of the kernels side by side by
running this under each (``PYTHONPATH=<other checkout>/src``) in alternating rounds.

    .venv/bin/python scripts/quant_microbench.py --formats Q4_1,Q4_K,Q6_K
    .venv/bin/python scripts/quant_microbench.py --q8-rows   # 8-bit rows against float32 rows
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gguf_support import random_blocks  # noqa: E402
from specdec import kernels  # noqa: E402
from specdec.kernels.quant import FORMATS, QuantWeight, qtype_id, quant_linear  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q4_K,Q5_K,Q6_K")
    parser.add_argument("--shape", default="2048x2048", help="N x K of the weight")
    parser.add_argument("--rows", default="1,2,5", help="rows of x per product")
    parser.add_argument(
        "--q8-rows", action="store_true", help="also time 8-bit rows (q8_rows) on the same blocks"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if kernels.load() is None:
        raise SystemExit("the CPU kernels are not available here")
    N, K = map(int, args.shape.split("x"))
    rng = np.random.default_rng(0)
    for name in args.formats.split(","):
        type_id = qtype_id(name)
        _, block, _ = FORMATS[type_id]
        blocks = random_blocks(name, N * K // block, rng).reshape(N, -1)
        weight = QuantWeight(torch.from_numpy(np.ascontiguousarray(blocks)), type_id, (N, K))
        variants = [("", weight)]
        if args.q8_rows:
            variants.append(("q8 ", weight.with_q8_rows()))
        for label, w in variants:
            times = [(M, best_time(torch.randn(M, K), w)) for M in map(int, args.rows.split(","))]
            one = times[0][1]
            cells = "  ".join(f"{M} rows {t * 1e6:6.0f} us ({t / one:.2f}x)" for M, t in times)
            print(
                f"{label}{name:5s} {weight.nbytes / 1e6:5.2f} MB  {cells}  {one / (N * K) * 1e12:.1f} ps/weight"
            )


def best_time(x: torch.Tensor, weight: QuantWeight) -> float:
    """Seconds of one product: best of 7 timings of 100, after 10 to warm up."""
    for _ in range(10):
        quant_linear(x, weight)
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(100):
            quant_linear(x, weight)
        best = min(best, (time.perf_counter() - start) / 100)
    return best


if __name__ == "__main__":
    main()
