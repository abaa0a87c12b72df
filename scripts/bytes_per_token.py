"""Bytes of weights one decoding step reads, per format, against the memory-bandwidth floor.

For each GGUF file and dtype: the bytes of every matrix the one-call forward reads for one token
(the layers' products and the lm_head; a tied lm_head is the embedding table), the floor =
those bytes / the machine's read bandwidth (best of 5 sums over a 512 MiB tensor, same thread
count), and plain decoding's time per token (128 greedy tokens after a one-token prompt, prefill
excluded, best of 3). The KV cache read grows with the context and is left out (at 128 cached
tokens it is under 6 MB for SmolLM2).

    python scripts/bytes_per_token.py smollm2 ~/.cache/specdec/SmolLM2-135M-Instruct.Q4_K_M.gguf \
        --dtypes quantized,bfloat16,float32 --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import specdec
from specdec.models.loading import LoadedModel

TOKENS = 128


def weight_bytes(model: LoadedModel) -> int:
    """Bytes of the weights one decoding pass reads (the one-call forward's matrices)."""
    module = model.module
    weights, (_, lm_head) = module._kernel_weights(1)
    if weights is None:
        raise SystemExit(f"{model.path}: the one-call forward does not run this model")
    matrices = [w for w in weights if w is not None and w.dim() >= 2]  # (norms and biases are 1-D)
    return sum(w.numel() * w.element_size() for w in [*matrices, lm_head])


def read_bandwidth() -> float:
    """Bytes per second one sum over a 512 MiB float32 tensor reads, best of 5."""
    data = torch.ones(128 * 2**20)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


def ms_per_token(model: LoadedModel) -> float:
    """Plain greedy decoding's milliseconds per token, best of 3 (prefill excluded)."""
    generator = specdec.SpeculativeGenerator(model)
    generator.generate([1], max_new_tokens=8, ignore_eos=True)  # warm up
    best = float("inf")
    for _ in range(3):
        stats = generator.generate([1], max_new_tokens=TOKENS, ignore_eos=True).stats
        best = min(best, (stats.total_s - stats.prefill_s) / TOKENS * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="GGUF files or names (smollm2)")
    parser.add_argument(
        "--dtypes", default="quantized,bfloat16,float32", help="q8: quantized with 8-bit rows"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {args.threads} thread(s)")
    print(
        f"{'model':44s} {'dtype':10s} {'MB/token':>9s} {'floor ms':>9s} {'plain ms':>9s} {'plain/floor':>12s}"
    )
    for name in args.models:
        for dtype in args.dtypes.split(","):
            with specdec.options.using(q8_rows=dtype == "q8"):  # q8: quantized with 8-bit rows
                model = specdec.load_model(name, dtype="quantized" if dtype == "q8" else dtype)
            if dtype in ("quantized", "q8") and not model.quantized:
                continue
            nbytes = weight_bytes(model)
            floor, plain = nbytes / bandwidth * 1e3, ms_per_token(model)
            label = Path(str(model.path)).name
            print(
                f"{label:44s} {dtype:10s} {nbytes / 1e6:9.1f} {floor:9.2f} {plain:9.2f} {plain / floor:12.2f}"
            )


if __name__ == "__main__":
    main()
