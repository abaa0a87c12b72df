"""The README's Python examples run as written, and say what they claim."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import specdec

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _client_blocks() -> list[str]:
    """Examples that talk to a running server (`specdec serve`)."""
    return [b for b in _python_blocks() if "base_url=" in b]


@pytest.mark.real_model
def test_the_library_example_runs_and_is_lossless(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = [b for b in _python_blocks() if b not in _client_blocks()]
    assert blocks, "the README lost its library example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    out, gen, target = namespace["out"], namespace["gen"], namespace["target"]
    assert out.token_ids and out.stats.mean_accepted_length >= 1 and capsys.readouterr().out
    plain = specdec.SpeculativeGenerator(target).generate("def fib(n):", max_new_tokens=32)
    assert gen.generate("def fib(n):", max_new_tokens=32).token_ids == plain.token_ids


def test_the_server_example_is_python_for_the_openai_client() -> None:
    """It needs a running server, so it is compiled here; tests/test_serving.py runs such calls."""
    blocks = _client_blocks()
    assert blocks, "the README lost its server example"
    for block in blocks:
        compile(block, str(README), "exec")
        assert "openai.OpenAI(" in block and "/v1" in block
