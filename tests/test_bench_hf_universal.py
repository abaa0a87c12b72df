"""``hf-assisted`` with a draft of another vocabulary (HF's universal assisted generation,
bench/hf_universal.py) and ``draft+parallel`` refusing such a draft, on tiny models with
deliberately different vocabularies: character-level targets and BPE drafts."""

from __future__ import annotations

from pathlib import Path

import pytest

from specdec import load_model
from specdec.bench.methods import HFMethod, build_method
from test_cross_vocab import save_pairs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``target`` / ``draft``: random models; ``rigged-target`` / ``rigged-draft``: both write the
    same cycle of letters, each in its own vocabulary."""
    return save_pairs(tmp_path_factory.mktemp("hf-universal"))


@pytest.mark.parametrize("prompt", ["def fib(n):\n", "The quick brown fox ~ jumps", "abcdefgh"])
def test_hf_assisted_with_another_vocabulary_equals_plain(pairs: dict[str, Path], prompt: str) -> None:
    """Built (not refused) for a draft of another vocabulary; 40 greedy tokens equal plain
    decoding's and HF's own, over enough rounds that the draft's cache is cropped many times."""
    target = load_model(pairs["target"], dtype="float32")
    hf_cache: dict = {}  # type: ignore[type-arg]
    assisted = build_method("hf-assisted", target, str(pairs["draft"]), 4, hf_cache)
    assert isinstance(assisted, HFMethod) and assisted.tokenizers is not None
    assert hf_cache["draft"].config.vocab_size != hf_cache["target"].config.vocab_size
    ids = target.tokenizer.encode(prompt)  # type: ignore[union-attr]
    plain = build_method("plain", target, str(pairs["draft"]), 4, hf_cache).generate(ids, 40)
    hf = build_method("hf", target, str(pairs["draft"]), 4, hf_cache).generate(ids, 40)
    run = assisted.generate(ids, 40)
    assert run.num_tokens == 40
    assert run.token_ids == plain.token_ids == hf.token_ids


def test_hf_assisted_accepts_the_drafts_of_a_draft_that_writes_the_target_s_text(
    pairs: dict[str, Path],
) -> None:
    """The rigged pair writes one text in two vocabularies: the target verifies several drafted
    tokens per forward, so it runs far fewer forwards than tokens (the draft's cache, cropped
    to what it shares with the retokenised text, keeps drafting from the right context)."""
    target = load_model(pairs["rigged-target"], dtype="float32")
    hf_cache: dict = {}  # type: ignore[type-arg]
    assisted = build_method("hf-assisted", target, str(pairs["rigged-draft"]), 4, hf_cache)
    forwards = []
    hook = hf_cache["target"].register_forward_hook(lambda *args: forwards.append(1))
    try:
        ids = target.tokenizer.encode("hello w")  # type: ignore[union-attr]
        run = assisted.generate(ids, 60)
    finally:
        hook.remove()
    plain = build_method("plain", target, str(pairs["rigged-draft"]), 4, hf_cache).generate(ids, 60)
    assert target.tokenizer.decode(plain.token_ids).startswith("xyz abcdefghijklmnopqrstuvwxyz abc")  # type: ignore[union-attr, arg-type]
    assert run.token_ids == plain.token_ids
    assert len(forwards) < 60 / 3


@pytest.mark.parametrize("prompt", ["hello w", "abcdefgh"])
def test_hf_assisted_with_a_draft_of_shorter_tokens_equals_plain(pairs: dict[str, Path], prompt: str) -> None:
    """The rigged pair the other way round: a BPE target and a character-level draft, whose text
    takes more draft tokens than target tokens (demo-draft for SmolLM2 is such a draft). Without
    the draft cache cropped by draft tokens, transformers' own generator feeds the draft an empty
    input after a few rounds (RuntimeError: cannot reshape tensor of 0 elements)."""
    target = load_model(pairs["rigged-draft"], dtype="float32")
    hf_cache: dict = {}  # type: ignore[type-arg]
    assisted = build_method("hf-assisted", target, str(pairs["rigged-target"]), 4, hf_cache)
    ids = target.tokenizer.encode(prompt)  # type: ignore[union-attr]
    plain = build_method("plain", target, str(pairs["rigged-target"]), 4, hf_cache).generate(ids, 40)
    assert assisted.generate(ids, 40).token_ids == plain.token_ids


def test_parallel_drafting_refuses_a_draft_of_another_vocabulary(pairs: dict[str, Path]) -> None:
    target = load_model(pairs["target"], dtype="float32")
    with pytest.raises(ValueError, match="parallel drafting needs a draft with the target's vocabulary"):
        build_method("draft+parallel", target, str(pairs["draft"]), 4, {})
