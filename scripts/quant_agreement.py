"""How often SmolLM2 Q4_1 run on its blocks gives the same greedy reply as the float32 model
dequantized from the same file (3 chat prompts x 64 tokens).

    python scripts/quant_agreement.py
"""

from __future__ import annotations

import specdec

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Give three tips for sleeping better.",
]


def main() -> None:
    quantized, reference = specdec.load_model("smollm2"), specdec.load_model("smollm2", dtype="float32")
    assert quantized.quantized and not reference.quantized
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ours = specdec.SpeculativeGenerator(quantized).chat(messages, max_new_tokens=64).token_ids
        ref = specdec.SpeculativeGenerator(reference).chat(messages, max_new_tokens=64).token_ids
        same = next((i for i, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b), min(len(ours), len(ref)))
        verdict = "identical" if ours == ref else f"first difference at token {same}"
        print(f"{prompt[:40]!r}: {len(ours)} / {len(ref)} tokens, {verdict}")


if __name__ == "__main__":
    main()
