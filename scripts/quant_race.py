"""Plain greedy decoding speed of a GGUF file (SmolLM2 Q4_1 unless ``--model``): specdec on the file's blocks, float32 and bfloat16,
next to llama.cpp's ``llama-bench`` tg128 on the same file and (``--hf``) Hugging Face
``generate`` on the same file dequantized, alternated in rounds (a noisy machine); one JSON line
of every value at the end.

    python scripts/quant_race.py --threads 1 --rounds 3 --hf float32,bfloat16 \
        --llama-cpp ~/.cache/specdec/llama.cpp/build/bin
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch

import specdec
from specdec.models import sources

TOKENS = 128


def specdec_tok_s(model: specdec.models.LoadedModel) -> float:
    """Decoding tok/s of 128 greedy tokens after a one-token prompt (prefill excluded)."""
    out = specdec.SpeculativeGenerator(model).generate([1], max_new_tokens=TOKENS, ignore_eos=True)
    return len(out.token_ids) / (out.stats.total_s - out.stats.prefill_s)


def llama_tok_s(binaries: Path, path: Path, threads: int) -> float:
    """llama-bench's tg128 tok/s (no prompt) on ``path``."""
    cmd = [
        str(binaries / "llama-bench"),
        "-m",
        str(path),
        "-p",
        "0",
        "-n",
        str(TOKENS),
        "-t",
        str(threads),
        "-o",
        "json",
    ]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(json.loads(text[text.index("[") :])[0]["avg_ts"])


def hf_tok_s(model, threads: int) -> float:  # type: ignore[no-untyped-def]
    """Hugging Face ``generate``'s tok/s for 128 greedy tokens after a one-token prompt."""
    import time

    ids = torch.tensor([[1]])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, do_sample=False, pad_token_id=0
        )
    return (out.shape[1] - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--llama-cpp", type=Path, default=Path.home() / ".cache/specdec/llama.cpp/build/bin")
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: SmolLM2 Q4_1)")
    parser.add_argument(
        "--dtypes", default="quantized,float32,bfloat16", help="q8: quantized with 8-bit rows"
    )
    parser.add_argument("--hf", default="", help="Hugging Face dtypes to time too, e.g. float32,bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or sources.smollm2_path()
    models = {}
    for dtype in args.dtypes.split(","):  # "q8": quantized with 8-bit rows (--q8-rows)
        with specdec.options.using(q8_rows=dtype == "q8"):
            models[dtype] = specdec.load_model(path, dtype="quantized" if dtype == "q8" else dtype)
    for model in models.values():
        specdec_tok_s(model)  # warm up
    from specdec.bench.methods import load_hf

    hf = {
        f"hf-{d}": load_hf(str(path), getattr(torch, d), torch.device("cpu")) for d in args.hf.split(",") if d
    }
    results: dict[str, list[float]] = {
        "llama.cpp": [],
        **{name: [] for name in models},
        **{n: [] for n in hf},
    }
    for _ in range(args.rounds):
        results["llama.cpp"].append(llama_tok_s(args.llama_cpp, path, args.threads))
        for name, model in models.items():
            results[name].append(specdec_tok_s(model))
        for name, hf_model in hf.items():
            results[name].append(hf_tok_s(hf_model, args.threads))
    for name, values in results.items():
        print(f"threads={args.threads} {name:10s} tok/s " + " ".join(f"{v:6.1f}" for v in values))
    for name in [*models, *hf]:
        ratios = [a / b for a, b in zip(results[name], results["llama.cpp"], strict=True)]
        print(f"threads={args.threads} {name:10s} / llama.cpp: {min(ratios):.2f}-{max(ratios):.2f}x")
    print(json.dumps({"threads": args.threads, "tok_s": results}))


if __name__ == "__main__":
    main()
