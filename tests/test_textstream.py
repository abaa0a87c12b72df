"""Streamed text equals the decoding of all tokens, whatever the tokenizer, with or without stops."""

from __future__ import annotations

import random

import pytest

from specdec.engine.textstream import ANCHOR_EVERY, TextAssembler
from specdec.models.loading import load_model


class DropsLeadingSpace:
    """A tokenizer whose decoding of a suffix is not the suffix of the decoding (SentencePiece
    drops the first token's leading space): the assembler must not decode from an anchor."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" w{i}" for i in ids).lstrip(" ")


def stream(tokenizer, ids: list[int], stop: list[str], seed: int) -> tuple[TextAssembler, str, list[int]]:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    assembler = TextAssembler(tokenizer, stop)
    text, released, i = "", [], 0
    while i < len(ids) and not assembler.stopped:
        step = ids[i : i + rng.randint(1, 6)]  # 1-6 tokens per step, like verify passes
        i += len(step)
        for chunk in assembler.add(step, ["target"] * len(step)):
            text += chunk.text
            released += chunk.token_ids
    for chunk in assembler.flush():
        text += chunk.text
        released += chunk.token_ids
    return assembler, text, released


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return load_model("demo-target").tokenizer


def test_long_streams_equal_the_full_decoding(tokenizer) -> None:  # type: ignore[no-untyped-def]
    source = "def f(x):\n    return 'héllo → wörld ✓ ' * x  # 日本語\n" * 40
    ids = tokenizer.encode(source)
    assert len(ids) > 8 * ANCHOR_EVERY
    for seed in range(3):
        assembler, text, released = stream(tokenizer, ids, [], seed)
        assert text == assembler.text == tokenizer.decode(ids)
        assert released == ids
        assert assembler._anchor > 0  # the anchor moved: only a window was decoded per step


def test_stop_strings_cut_at_the_same_place(tokenizer) -> None:  # type: ignore[no-untyped-def]
    source = "x = 1\n" * 150 + "STOP here\n" + "y = 2\n" * 10
    ids = tokenizer.encode(source)
    assembler, text, released = stream(tokenizer, ids, ["STOP"], 1)
    assert assembler.stopped
    assert text == assembler.text == "x = 1\n" * 150
    assert tokenizer.decode(released).startswith(text)


def test_a_tokenizer_that_does_not_split_keeps_exact_text() -> None:
    ids = list(range(5 * ANCHOR_EVERY))
    fake = DropsLeadingSpace()
    assembler, text, released = stream(fake, ids, [], 0)
    assert text == fake.decode(ids)
    assert assembler._anchor == 0
    assembler, text, _ = stream(fake, ids, ["w150"], 0)
    assert text == fake.decode(ids)[: fake.decode(ids).index("w150")]
