"""GPU smoke check: every method on the demo pair on CUDA, greedy output against plain decoding.

Run on a machine with a GPU (scripts/gpu_check.sh does): prints one line per method and dtype,
``ok`` with the accepted length or the error, and exits non-zero if any method failed. Greedy
outputs are compared token for token in float32; in bfloat16 the share of identical tokens is
printed (a verify pass over K + 1 tokens rounds differently from a one-token pass).
"""

from __future__ import annotations

import sys
import time
import traceback

import torch

from specdec import SpeculativeGenerator, load_model
from specdec.bench.methods import build_method

METHODS = ["draft", "draft@4x2", "adaptive", "ngram", "hybrid", "staged", "early-exit", "medusa", "medusa@4x3",
           "eagle", "eagle@4x3", "hf", "hf-assisted"]  # fmt: skip
DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"
PROMPT = "def fibonacci(n):\n    "


def main() -> int:
    failed = 0
    for dtype in ("float32", "bfloat16"):
        target = load_model("demo-target", dtype=dtype, device=DEVICE)
        ids = target.tokenizer.encode(PROMPT)
        plain = SpeculativeGenerator(target)
        ref = plain.generate(ids, max_new_tokens=48, ignore_eos=True).token_ids
        print(f"{dtype} plain: {len(ref)} tokens, graphs recorded: {target.graphs.captures if target.graphs else 0}")
        hf_cache: dict = {}  # type: ignore[type-arg]
        for name in METHODS:
            try:
                method = build_method(name, target, "demo-draft", 4, hf_cache)
                start = time.perf_counter()
                run = method.generate(ids, 48)
                seconds = time.perf_counter() - start
                same = sum(a == b for a, b in zip(run.token_ids, ref, strict=False)) / len(ref)
                tau = f"tau {run.stats.mean_accepted_length:.2f}" if run.stats is not None else ""
                if hasattr(method, "generator"):  # sampling runs too (losslessness is tested on the CPU)
                    method.generator.generate(ids, max_new_tokens=24, temperature=0.7, seed=1)
                exact = run.token_ids == ref
                bad = dtype == "float32" and not exact
                failed += bad
                print(f"{dtype} {name}: {'FAIL' if bad else 'ok'} identical={exact} same={same:.2f} {tau} {seconds * 1e3:.0f} ms")
            except Exception:
                failed += 1
                print(f"{dtype} {name}: ERROR")
                traceback.print_exc(file=sys.stdout)
        del target
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(f"smoke: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
