"""The README's Python examples run as written, and say what they claim."""

from __future__ import annotations

import re
from pathlib import Path

import specdec

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_python_examples_run_and_the_draft_vocabulary_changes_no_output(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "the README lost its Python examples"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    out, gen, drafter = namespace["out"], namespace["gen"], namespace["drafter"]
    assert out.token_ids and out.stats.mean_accepted_length >= 1 and capsys.readouterr().out
    assert drafter.draft_vocab is not None and len(drafter.draft_vocab) == 2048  # a quarter of 8192
    target = namespace["target"]
    plain = specdec.SpeculativeGenerator(target, None).generate("def fibonacci(n):\n", max_new_tokens=48)
    reduced = specdec.SpeculativeGenerator(target, drafter).generate("def fibonacci(n):\n", max_new_tokens=48)
    full = gen.generate("def fibonacci(n):\n", max_new_tokens=48)
    assert reduced.token_ids == plain.token_ids == full.token_ids
