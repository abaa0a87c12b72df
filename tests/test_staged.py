"""StagedDrafter: greedy exactness, stage-2 savings in draft forwards, the inner speculative
decoder reproduces the draft model's own sampling distribution, and the staged tree is lossless
against the target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import accept_every_draft, needs_kernels
from specdec import DraftModelDrafter, SpeculativeGenerator, load_model
from specdec.drafters import StagedDrafter
from specdec.drafters.base import DraftContext
from specdec.sampling import SamplingParams
from specdec.verify.chain import VerifyResult
from specdec.verify.tree import children_of
from test_draft_tree import (
    N_SAMPLES,
    SETTING_IDS,
    SETTINGS,
    accept_first_children,
    assert_draft_cache_consistent,
    assert_fails_target,
    assert_matches_target,
    exact_joint,
    fit,
    make_vocab8,
)


@pytest.fixture(scope="module")
def vocab8(tmp_path_factory):
    return make_vocab8(tmp_path_factory.mktemp("vocab8"))


PROMPTS = [[5], [1, 2, 3], [40, 41, 42, 40, 41, 43, 40, 41, 44, 40, 41]]
NGRAM_PROMPT = [1, 2, 3, 1, 2, 4, 6, 1, 2, 5, 1, 2]
INNER_PROMPT = [6, 6, 6]


@pytest.mark.parametrize(
    "draft,k,width,depth,max_new",
    [("good", 1, 1, 1, 11), ("good", 4, 1, 1, 29), ("good", 4, 3, 2, 31), ("far", 5, 2, 3, 26)],
)
def test_greedy_equals_plain(models, draft, k, width, depth, max_new):
    target = models["target"]
    plain = SpeculativeGenerator(target)
    drafter = StagedDrafter(models[draft], k, tree_width=width, branch_depth=depth)
    gen = SpeculativeGenerator(target, drafter)
    for prompt in PROMPTS:
        ref = plain.generate(prompt, max_new_tokens=max_new).token_ids
        out = gen.generate(prompt, max_new_tokens=max_new)
        assert out.token_ids == ref
        if len(prompt) + len(out.token_ids) > 2:
            assert_draft_cache_consistent(drafter, prompt + out.token_ids)


def test_greedy_stops_at_eos(models):
    target = models["target"]
    ref = SpeculativeGenerator(target).generate([1, 2, 3], max_new_tokens=30).token_ids
    eos = ref[8]
    gen = SpeculativeGenerator(target, StagedDrafter(models["good"], 4, tree_width=2))
    gen.eos_token_ids = frozenset({eos})
    out = gen.generate([1, 2, 3], max_new_tokens=30)
    assert out.token_ids == ref[: ref.index(eos)] and out.finish_reason == "eos"


def test_same_chains_as_the_plain_draft_model(models):
    """Greedy stage 2 changes the cost of drafting, never the drafts: same acceptance as the
    draft model alone, and never more than one draft forward per drafted token."""
    target, draft = models["target"], models["good"]
    prompt, K, max_new = PROMPTS[2], 4, 60
    staged = StagedDrafter(draft, K, tree_width=1)
    out = SpeculativeGenerator(target, staged).generate(prompt, max_new_tokens=max_new)
    chain = SpeculativeGenerator(target, DraftModelDrafter(draft, K)).generate(prompt, max_new_tokens=max_new)
    assert out.token_ids == chain.token_ids
    assert out.stats.accepted_tokens == chain.stats.accepted_tokens
    assert out.stats.draft_tokens == chain.stats.draft_tokens
    assert staged.draft_forwards - 1 <= out.stats.draft_tokens  # minus the prefill pass


@torch.inference_mode()
def test_right_ngram_guesses_cost_one_draft_forward(far_draft_path):
    """A draft that always predicts token 0 on text ending in zeros: the n-gram stage guesses
    ``0 0 0``, one draft forward verifies all of them and adds the bonus token."""
    draft = load_model(far_draft_path, dtype="float32")
    draft.module.lm_head.weight.zero_()  # all logits 0: the argmax is token 0
    drafter = StagedDrafter(draft, 4, tree_width=1)
    ids = [3] + [0] * 8
    drafter.prefill(ids, None)
    before = drafter.draft_forwards
    proposal = drafter.propose(DraftContext(ids, SamplingParams(0.0), 10))
    assert proposal.tokens.tolist() == [0, 0, 0, 0]
    assert drafter.draft_forwards - before == 1
    assert drafter.cache.lengths[0] == len(ids) + 3  # the chain's last token is not fed


def test_tree_adds_distinct_alternatives_at_the_first_positions(models):
    drafter = StagedDrafter(models["far"], 4, tree_width=3, branch_depth=2)
    drafter.prefill(PROMPTS[1], None)
    with torch.inference_mode():
        proposal = drafter.propose(DraftContext(PROMPTS[1], SamplingParams(0.0), 10))
    tree = proposal.tree
    kids = children_of(tree.parents.tolist())
    assert tree.num_nodes == 4 + 2 * 2 and tree.draft_probs is None
    assert [len(k) for k in kids[:4]] == [3, 3, 1, 1]  # root, chain node 0: 3 children each
    for k in kids[:2]:
        assert len(set(tree.tokens[k].tolist())) == 3


def sample_staged_chains(drafter: StagedDrafter, n: int, sampling: SamplingParams) -> np.ndarray:
    """Counts ``(V, V)`` of the first two chain tokens of ``n`` proposals after INNER_PROMPT."""
    drafter.prefill(INNER_PROMPT, None)
    counts = np.zeros((8, 8))
    with torch.inference_mode():
        for seed in range(n):
            ctx = DraftContext(INNER_PROMPT, sampling, 2, torch.Generator().manual_seed(seed))
            a, b = drafter.propose(ctx).tokens.tolist()
            drafter.on_verified(VerifyResult([a], 0, 2, False, ()))  # roll back the draft cache
            counts[a, b] += 1
    return counts


def test_inner_speculation_reproduces_the_draft_distribution(vocab8):
    """Stage 2 is itself lossless: the staged chain is distributed as the draft model's own
    token-by-token sampling, here its first two tokens against the draft's exact joint. After
    ``6 6 6`` the n-gram guess is ``6``, which the draft samples with probability ~0.17: both the
    accept and the residual branch of the inner rejection sampler are exercised."""
    draft, sampling, n = vocab8["far"], SamplingParams(1.0), 1000
    drafter = StagedDrafter(draft, 2, tree_width=1)
    counts = sample_staged_chains(drafter, n, sampling)
    assert drafter.draft_forwards - 1 < 1.95 * n  # accepted n-gram guesses saved forwards
    pvalue, _ = fit(counts, exact_joint(draft, INNER_PROMPT, sampling))
    assert pvalue > 1e-3, f"chi-square p = {pvalue:.2e}"


def test_negative_control_inner_sampler_that_accepts_every_guess(vocab8, monkeypatch):
    monkeypatch.setattr("specdec.drafters.staged.verify_rejection", accept_every_draft)
    draft, sampling = vocab8["far"], SamplingParams(1.0)
    counts = sample_staged_chains(StagedDrafter(draft, 2, tree_width=1), 300, sampling)
    pvalue, _ = fit(counts, exact_joint(draft, INNER_PROMPT, sampling))
    assert pvalue < 1e-6


@pytest.mark.parametrize("sampling", SETTINGS[1:], ids=SETTING_IDS[1:])
def test_tree_sampling_matches_exact_target_distribution(vocab8, sampling):
    gen = SpeculativeGenerator(
        vocab8["target"], StagedDrafter(vocab8["far"], 2, tree_width=3, branch_depth=2)
    )
    assert_matches_target(gen, NGRAM_PROMPT, N_SAMPLES, sampling)


@pytest.mark.parametrize("sampling", SETTINGS[1:], ids=SETTING_IDS[1:])
def test_chain_sampling_matches_exact_target_distribution(vocab8, sampling):
    """A staged chain: n-gram guesses verified by the draft, and where none is left the rest of
    the chain from the draft model's one-call chain (where the kernels run)."""
    gen = SpeculativeGenerator(vocab8["target"], StagedDrafter(vocab8["far"], 3, tree_width=1))
    assert_matches_target(gen, NGRAM_PROMPT, N_SAMPLES, sampling)


def test_a_chain_without_ngram_guesses_is_drafted_in_one_call(models, monkeypatch):
    """No n-gram guess (a prompt without repeats): the whole chain comes from one call of the
    draft model's chain, the same drafts as the draft model's own drafter."""
    needs_kernels()
    draft, prompt = models["good"], [1, 2, 3, 4]
    calls = []
    one_call = type(draft.module).draft_chain
    monkeypatch.setattr(type(draft.module), "draft_chain", lambda *a, **kw: calls.append(a[3]) or one_call(*a, **kw))
    staged = StagedDrafter(draft, 4, tree_width=1)
    staged.prefill(prompt, None)
    with torch.inference_mode():
        got = staged.propose(DraftContext(prompt, SamplingParams(0.0), 10)).tokens.tolist()
    assert calls == [4]  # one call for all four drafts
    plain = DraftModelDrafter(draft, 4)
    plain.prefill(prompt, None)
    want = plain.propose(DraftContext(prompt, SamplingParams(0.0), 10)).tokens.tolist()
    assert got == want
    assert staged.cache.lengths[0] == len(prompt) + 3  # the chain's last token is not fed


def test_negative_control_broken_tree_verifier_fails(vocab8, monkeypatch):
    monkeypatch.setattr("specdec.engine.tree_step.verify_tree_rejection", accept_first_children)
    gen = SpeculativeGenerator(
        vocab8["target"], StagedDrafter(vocab8["far"], 2, tree_width=3, branch_depth=2)
    )
    assert_fails_target(gen, NGRAM_PROMPT, 400, SETTINGS[0])
