"""How often SmolLM2 Q4_1 run on its blocks gives the same greedy reply as the float32 model
dequantized from the same file: with float32 rows (the default) and with 8-bit rows
(``--q8-rows``), on the first 4 prompts of each chat task of the bench, 128 tokens each.

    python scripts/quant_agreement.py
"""

from __future__ import annotations

import torch

import specdec
from specdec.bench.real_tasks import REAL_TASKS, load_records

TOKENS = 128


def first_difference(ours: list[int], reference: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ours, reference, strict=False)) if a != b), None)


def main() -> None:
    torch.set_num_threads(2)
    reference = specdec.load_model("smollm2", dtype="float32")
    models = {"float32 rows": specdec.load_model("smollm2")}
    with specdec.options.using(q8_rows=True):
        models["8-bit rows"] = specdec.load_model("smollm2")
    differences: dict[str, list[int | None]] = {name: [] for name in models}
    for task in REAL_TASKS:
        for record in load_records(task)[:4]:
            messages = [dict(m) for m in record.messages]
            ref = specdec.SpeculativeGenerator(reference).chat(
                messages, max_new_tokens=TOKENS, ignore_eos=True
            )
            for name, model in models.items():
                ours = specdec.SpeculativeGenerator(model).chat(
                    messages, max_new_tokens=TOKENS, ignore_eos=True
                )
                differences[name].append(first_difference(ours.token_ids, ref.token_ids))
    for name, found in differences.items():
        half = sum(i is None or i >= TOKENS // 2 for i in found)
        whole = sum(i is None for i in found)
        print(
            f"{name}: the same first {TOKENS // 2} tokens on {half}/{len(found)} prompts, all {TOKENS} on "
            f"{whole}/{len(found)}; first differences at {sorted(i for i in found if i is not None)}"
        )


if __name__ == "__main__":
    main()
