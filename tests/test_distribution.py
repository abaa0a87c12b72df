"""Rejection sampling reproduces the target's distribution exactly (statistical tests).

A tiny-vocabulary target gives the exact joint distribution of the first two generated tokens;
speculative samples must fit it (chi-square) and stay within a small total variation distance.
A negative control shows the test detects a sampler that is not lossless.
"""

from __future__ import annotations

import pytest

from helpers import accept_every_draft, needs_kernels, small_vocab_trio
from specdec import DraftModelDrafter, SpeculativeGenerator
from specdec.losslessness import exact_two_token_joint, goodness_of_fit, sample_two_tokens
from specdec.sampling import SamplingParams

PROMPT = [3, 1, 4]
N = 1500


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    return small_vocab_trio(tmp_path_factory.mktemp("vocab8"))


SETTINGS = [
    ("near", 3, dict(temperature=1.0)),
    ("near", 4, dict(temperature=0.7, top_k=5)),
    ("far", 3, dict(temperature=1.3, top_p=0.8)),
]


@pytest.mark.parametrize("one_call", [True, False], ids=["one-call", "loop"])
@pytest.mark.parametrize("draft,k,sampling", SETTINGS, ids=[f"{d}-k{k}-{s}" for d, k, s in SETTINGS])
def test_speculative_sampling_matches_exact_target_distribution(small_vocab, draft, k, sampling, one_call, monkeypatch):
    """Both ways a draft model samples its chain: in one C++ call (``draft_chain``, where the
    kernels run) and the Python loop (elsewhere, e.g. on a GPU)."""
    target = small_vocab["target"]
    first, joint = exact_two_token_joint(target, PROMPT, SamplingParams(**sampling))
    assert abs(joint.sum() - 1) < 1e-5  # the whole joint is enumerated
    module = small_vocab[draft].module
    calls = []
    if one_call:
        needs_kernels()
        original = module.draft_chain
        monkeypatch.setattr(module, "draft_chain", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    else:
        monkeypatch.setattr(module, "draft_chain", lambda *args, **kwargs: None)  # the Python loop runs
    gen = SpeculativeGenerator(target, DraftModelDrafter(small_vocab[draft], k))
    fit = goodness_of_fit(sample_two_tokens(gen, PROMPT, N, **sampling), first, joint)
    assert fit.pvalue > 1e-3, f"chi-square p = {fit.pvalue:.2e}"
    assert fit.total_variation < 3 * fit.null_total_variation, fit
    assert len(calls) >= N if one_call else not calls  # every sample drafted the way under test


@pytest.mark.parametrize("draft,low,high", [("near", 0.2, 0.9), ("far", 0.005, 0.5)])
def test_drafts_are_accepted_only_sometimes(small_vocab, draft, low, high):
    """The tests above are meaningful only if drafts get both accepted and rejected."""
    gen = SpeculativeGenerator(small_vocab["target"], DraftModelDrafter(small_vocab[draft], 3))
    outs = [gen.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=s).stats for s in range(10)]
    rate = sum(o.accepted_tokens for o in outs) / sum(o.draft_tokens for o in outs)
    assert low < rate < high


def test_negative_control_detects_a_lossy_sampler(small_vocab, monkeypatch):
    """A sampler that accepts every draft emits the draft's distribution: the test must fail it."""
    monkeypatch.setattr("specdec.engine.chain_step.verify_rejection", accept_every_draft)
    target = small_vocab["target"]
    first, joint = exact_two_token_joint(target, PROMPT, SamplingParams(1.0))
    gen = SpeculativeGenerator(target, DraftModelDrafter(small_vocab["far"], 2))
    fit = goodness_of_fit(sample_two_tokens(gen, PROMPT, N, temperature=1.0), first, joint)
    assert fit.pvalue < 1e-6 and fit.total_variation > 3 * fit.null_total_variation
    assert not fit.passed
