"""The reduced draft vocabulary of the head drafters and the draft model: ranking file,
projection, the one-call greedy draft, losslessness."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from helpers import needs_kernels, random_head, save_char_tokenizer, save_tiny_llama
from specdec import SpeculativeGenerator, load_model
from specdec.drafters import EagleDrafter, MedusaDrafter
from specdec.drafters.draft_model import DraftModelDrafter
from specdec.drafters.early_exit import EarlyExitDrafter
from specdec.drafters.staged import StagedDrafter
from specdec.drafters.vocab import (
    DRAFT_VOCAB_FILE,
    DraftVocab,
    rank_tokens,
    read_draft_vocab,
    resolve_draft_vocab,
    write_draft_vocab,
)
from specdec.losslessness import exact_two_token_joint, goodness_of_fit, sample_two_tokens
from specdec.models import ModelLoadError
from specdec.sampling import SamplingParams


@pytest.fixture(scope="module")
def bf16_target(tmp_path_factory):
    """A target whose weights are all bfloat16 values (the kernels read exact bfloat16 copies)."""
    folder = save_tiny_llama(tmp_path_factory.mktemp("vocab") / "t", seed=7)
    target = load_model(folder, dtype="float32")
    with torch.no_grad():
        for p in target.module.parameters():
            p.copy_(p.bfloat16().float())
    target.module.fuse()
    return target


def test_ranking_file_round_trips_and_bad_files_are_user_errors(tmp_path):
    ranking = rank_tokens(Counter([3, 3, 1, 3, 1, 7]), vocab_size=8)
    assert ranking == [3, 1, 7, 0, 2, 4, 5, 6]  # by count, ties and unseen ids by id
    write_draft_vocab(tmp_path / "new", ranking, counted_tokens=6, source="test")  # creates the folder
    assert read_draft_vocab(tmp_path / "new", 8) == ranking
    with pytest.raises(ModelLoadError, match="specdec train draft-vocab"):
        read_draft_vocab(tmp_path / "missing", 8)
    path = tmp_path / DRAFT_VOCAB_FILE
    for bad, why in [("not json", "not a draft vocabulary"), ('{"ids": []}', "not a draft vocabulary"),
                     ('{"token_ids": [1, 9]}', "ids in 0..7"), ('{"token_ids": [1, 1]}', "repeats")]:  # fmt: skip
        path.write_text(bad)
        with pytest.raises(ModelLoadError, match=why):
            read_draft_vocab(tmp_path, 8)


@pytest.mark.parametrize("compact", [True, False], ids=["bfloat16-copy", "float32"])
def test_projection_gives_the_subsets_logits_bit_for_bit_and_minus_inf_elsewhere(bf16_target, compact):
    from specdec import kernels

    module = bf16_target.module
    ids = [0, 5, 17, 42, 90, 95]
    V, d = module.lm_head.weight.shape
    h = torch.randn(3, d, generator=torch.Generator().manual_seed(0))
    io = module._kernel_io
    if not compact:
        module._kernel_io = (io[0], module.lm_head.weight)  # the float32 head
    try:
        vocab = DraftVocab(bf16_target, ids)
        with torch.inference_mode():
            got, want = vocab.project(h), module.project(h)  # (3, V)
    finally:
        module._kernel_io = io
    if compact and kernels.load() is not None:
        assert vocab.compact.dtype == torch.bfloat16
    assert len(vocab) == len(ids) and got.shape == (3, V)
    assert torch.equal(got[:, ids], want[:, ids])
    others = [t for t in range(V) if t not in ids]
    assert torch.isinf(got[:, others]).all() and (got[:, others] < 0).all()


def test_default_size_is_a_quarter_where_the_ranking_exists(tmp_path):
    folder = save_tiny_llama(tmp_path / "t", seed=1)
    target = load_model(folder, dtype="float32")
    assert resolve_draft_vocab(target, None) is None  # no file: the full vocabulary
    with pytest.raises(ModelLoadError, match="draft-vocab"):
        resolve_draft_vocab(target, 10)  # asked for, no file
    write_draft_vocab(folder, list(range(target.config.vocab_size))[::-1], 1, "test")
    V = target.config.vocab_size
    assert len(resolve_draft_vocab(target, None)) == V // 4  # type: ignore[arg-type]
    vocab = resolve_draft_vocab(target, 10)
    assert vocab is not None and vocab.ids.tolist() == list(range(V - 10, V))  # the first 10 ranked
    assert resolve_draft_vocab(target, 0) is None and resolve_draft_vocab(target, V) is None
    with pytest.raises(ValueError, match=">= 0"):
        resolve_draft_vocab(target, -1)


@pytest.mark.parametrize("method", ["eagle", "medusa", "early-exit"])
def test_greedy_output_is_unchanged_and_drafts_stay_in_the_subset(target_path, method):
    target = load_model(target_path, dtype="float32")
    V = target.config.vocab_size
    vocab = DraftVocab(target, list(range(0, V, 3)))  # a third of the tokens
    head = random_head(method, target, 3, **({"exit_layer": 1} if method == "early-exit" else {}))
    cls = {"eagle": EagleDrafter, "medusa": MedusaDrafter, "early-exit": EarlyExitDrafter}[method]
    drafter = cls(target, head, num_draft_tokens=3, draft_vocab=vocab)  # type: ignore[operator]
    proposed: list[int] = []
    propose = drafter.propose
    drafter.propose = lambda ctx: (p := propose(ctx)) and proposed.extend(p.tokens.tolist()) or p  # type: ignore[method-assign]
    for prompt in ([5], [1, 2, 3, 4, 5, 6, 7], [9, 40, 2, 2, 17, 80, 33, 61]):
        want = SpeculativeGenerator(target).generate(prompt, max_new_tokens=24).token_ids
        assert SpeculativeGenerator(target, drafter).generate(prompt, max_new_tokens=24).token_ids == want
    # (a one-token prompt's first step re-proposes the pending token, which may lie outside)
    assert proposed and sum(t % 3 != 0 for t in proposed) <= 1


def _recording(drafter):  # type: ignore[no-untyped-def]
    """``drafter`` with every proposed token appended to the returned list."""
    proposed: list[int] = []
    propose = drafter.propose
    drafter.propose = lambda ctx: (p := propose(ctx)) and proposed.extend(p.tokens.tolist()) or p
    return drafter, proposed


DRAFT_MODEL_DRAFTERS = {
    "chain": lambda draft, vocab: DraftModelDrafter(draft, 4, draft_vocab=vocab),
    "tree": lambda draft, vocab: DraftModelDrafter(draft, 4, tree_width=2, draft_vocab=vocab),
    "staged": lambda draft, vocab: StagedDrafter(draft, 4, draft_vocab=vocab),
}


@pytest.mark.parametrize("kind", DRAFT_MODEL_DRAFTERS)
def test_draft_model_greedy_output_is_unchanged_and_its_drafts_stay_in_the_subset(models, kind):
    target, draft = models["target"], models["good"]
    V = target.config.vocab_size
    subset = [t for t in range(V) if t % 4 != 1]  # three quarters: the good draft is still accepted
    vocab = DraftVocab(draft, subset)
    drafter, proposed = _recording(DRAFT_MODEL_DRAFTERS[kind](draft, vocab))
    accepted = 0
    for prompt in ([5], [1, 2, 3, 4, 5, 6, 7], [9, 40, 2, 2, 17, 80, 33, 61]):
        want = SpeculativeGenerator(target).generate(prompt, max_new_tokens=24).token_ids
        out = SpeculativeGenerator(target, drafter).generate(prompt, max_new_tokens=24)
        assert out.token_ids == want
        accepted += out.stats.accepted_tokens
    assert accepted > 0 and proposed and all(t % 4 != 1 for t in proposed)


def test_one_call_greedy_draft_maps_the_subsets_argmax_back_to_token_ids(models, monkeypatch):
    """The C++ greedy ``draft_chain`` with a reduced vocabulary proposes what the Python loop over
    :meth:`DraftVocab.project` proposes, and none of the full vocabulary's drafts."""

    needs_kernels()
    draft = models["far"]
    prompts = (list(range(10, 40)), [3, 1, 4, 1, 5, 9, 2, 6])
    top = {t for p in prompts for t in DraftModelDrafter(draft, 6).propose(_context(p)).tokens.tolist()}
    vocab = DraftVocab(draft, [t for t in range(draft.config.vocab_size) if t not in top])
    got = [DraftModelDrafter(draft, 6, draft_vocab=vocab).propose(_context(p)).tokens.tolist() for p in prompts]
    with monkeypatch.context() as patch:
        patch.setattr(draft.module, "draft_chain", lambda *args, **kwargs: None)  # the Python loop runs
        want = [DraftModelDrafter(draft, 6, draft_vocab=vocab).propose(_context(p)).tokens.tolist() for p in prompts]
    assert got == want
    assert not top & {t for tokens in got for t in tokens}


def _context(token_ids):  # type: ignore[no-untyped-def]
    from specdec.drafters.base import DraftContext

    return DraftContext(token_ids, SamplingParams(), max_draft_tokens=16)


@pytest.mark.parametrize("kind", DRAFT_MODEL_DRAFTERS)
def test_draft_model_sampling_with_a_reduced_vocabulary_matches_the_exact_target_distribution(tmp_path, kind):
    folder = save_tiny_llama(tmp_path / "t", vocab_size=8, hidden_size=32, init_std=0.6, seed=3)
    target = load_model(folder, dtype="float32")
    draft = load_model(save_tiny_llama(tmp_path / "d", vocab_size=8, hidden_size=32, init_std=0.6, seed=4))
    prompt, sampling = [1, 2, 3], dict(temperature=1.0)
    first, joint = exact_two_token_joint(target, prompt, SamplingParams(**sampling))
    drafter = DRAFT_MODEL_DRAFTERS[kind](draft, DraftVocab(draft, [0, 2, 5, 7]))
    fit = goodness_of_fit(
        sample_two_tokens(SpeculativeGenerator(target, drafter), prompt, 4000, **sampling), first, joint
    )
    assert fit.pvalue > 1e-3, f"chi-square p = {fit.pvalue:.2e}"
    assert fit.total_variation < 3 * fit.null_total_variation, fit


def test_sampling_with_a_reduced_vocabulary_matches_the_exact_target_distribution(tmp_path):
    folder = save_tiny_llama(tmp_path / "t", vocab_size=8, hidden_size=32, init_std=0.6, seed=3)
    target = load_model(folder, dtype="float32")
    prompt, sampling = [1, 2, 3], dict(temperature=1.0)
    first, joint = exact_two_token_joint(target, prompt, SamplingParams(**sampling))
    head = random_head("eagle", target, 5)
    drafter = EagleDrafter(
        target, head, num_draft_tokens=3, tree_width=2, draft_vocab=DraftVocab(target, [0, 2, 5, 7])
    )
    fit = goodness_of_fit(
        sample_two_tokens(SpeculativeGenerator(target, drafter), prompt, 4000, **sampling), first, joint
    )
    assert fit.pvalue > 1e-3, f"chi-square p = {fit.pvalue:.2e}"
    assert fit.total_variation < 3 * fit.null_total_variation, fit


def test_cli_ranks_tokens_and_the_drafters_use_them(tmp_path, capsys):
    from specdec.cli import main

    folder = save_char_tokenizer(save_tiny_llama(tmp_path / "t", init_std=0.15, eos_token_id=0))
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    assert main(["train", "draft-vocab", "--target", str(folder), "--files", str(text)]) == 0
    ranking = json.loads((folder / DRAFT_VOCAB_FILE).read_text())["token_ids"]
    assert ranking[0] == folder_token(folder, " ")  # the most frequent character of the text
    assert main(["train", "draft-vocab", "--target", str(folder), "--files", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["generate", "--target", str(folder), "--drafter", "eagle", "--draft-vocab", "-1", "x"]) == 2
    assert "--draft-vocab must be >= 0" in capsys.readouterr().err


def folder_token(folder, text):  # type: ignore[no-untyped-def]
    from specdec.models.tokenizer import Tokenizer

    ids = Tokenizer.from_folder(folder).encode(text, add_special_tokens=False)  # type: ignore[union-attr]
    assert len(ids) == 1
    return ids[0]
