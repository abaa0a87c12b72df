"""NgramDrafter (prompt lookup decoding): the index, the trie, greedy exactness and lossless
sampling with deterministic tree drafts."""

from __future__ import annotations

import pytest
import torch

from specdec import SpeculativeGenerator, load_model
from specdec.drafters import NgramDrafter
from specdec.drafters.base import DraftContext
from specdec.drafters.ngram import NgramIndex, trie_tree
from specdec.sampling import SamplingParams
from specdec.verify.tree import children_of
from test_draft_tree import (
    N_SAMPLES,
    SETTING_IDS,
    SETTINGS,
    accept_first_children,
    assert_fails_target,
    assert_matches_target,
    make_vocab8,
)


@pytest.fixture(scope="module")
def vocab8(tmp_path_factory):
    return make_vocab8(tmp_path_factory.mktemp("vocab8"))


GREEDY = SamplingParams(0.0)


def test_index_finds_the_longest_and_most_recent_match():
    index = NgramIndex(1, 3)
    text = [1, 2, 3, 9, 1, 2, 4, 7, 2, 3, 5, 1, 2]
    index.reset(text)
    # suffix (1, 2): after "1 2" came 3 (pos 2) and 4 (pos 6); most recent first
    assert index.continuations(text, 3, 2) == [[4, 7, 2], [3, 9, 1]]
    # 3-gram (7, 1, 2) is absent, 2-gram matches come before the 1-gram (2,) matches
    assert index.continuations(text, 2, 4) == [[4, 7], [3, 9], [3, 5]]
    assert index.continuations(text + [8], 2, 4) == []  # 8 was never seen
    # continuations are cut at the end of the indexed text
    assert index.continuations([5, 1], 4, 1) == [[2]]


def test_incremental_index_equals_a_fresh_one():
    torch.manual_seed(0)
    text = torch.randint(0, 5, (60,)).tolist()
    grown = NgramIndex(1, 3)
    grown.reset(text[:7])
    for end in [*range(8, 60, 5), 60]:
        grown.extend(text[:end])
    fresh = NgramIndex(1, 3)
    fresh.reset(text)
    assert grown._follow == fresh._follow
    # the suffix itself is never indexed as its own match: only n-grams with a next token
    assert all(max(pos) < len(text) for pos in fresh._follow.values())


def test_trie_merges_shared_prefixes_and_respects_the_budget():
    t = trie_tree([[4, 7, 2], [4, 7, 5], [3, 9]], max_nodes=10)
    assert t.tokens.tolist() == [4, 7, 2, 5, 3, 9]
    assert t.parents.tolist() == [-1, 0, 1, 1, -1, 4]
    assert t.draft_probs is None
    small = trie_tree([[4, 7, 2], [4, 7, 5], [3, 9]], max_nodes=4)
    assert small.tokens.tolist() == [4, 7, 2, 5] and small.parents.tolist() == [-1, 0, 1, 1]


def test_drafter_proposes_chain_tree_or_nothing():
    prompt = [1, 2, 3, 9, 1, 2, 4, 7, 1, 2]
    chain = NgramDrafter(3, scale_with_match=False)
    chain.prefill(prompt, None)
    proposal = chain.propose(DraftContext(prompt, GREEDY, 10))
    assert proposal.tree is None and proposal.tokens.tolist() == [4, 7, 1]
    assert chain.propose(DraftContext(prompt, GREEDY, 2)).tokens.tolist() == [4, 7]  # engine limit
    scaled = NgramDrafter(3)  # a 2-token match ([1, 2]) proposes 1 token
    scaled.prefill(prompt, None)
    assert scaled.propose(DraftContext(prompt, GREEDY, 10)).tokens.tolist() == [4]
    longer = [5, 6, 7, 8, 9, 1, 5, 6, 7, 8]  # a 4-token match: 3 tokens, capped by K and the engine
    for k, limit, want in [(4, 10, [9, 1, 5]), (2, 10, [9, 1]), (4, 1, [9])]:
        drafter = NgramDrafter(k)
        drafter.prefill(longer, None)
        assert drafter.propose(DraftContext(longer, GREEDY, limit)).tokens.tolist() == want
    tree = NgramDrafter(3, num_branches=3, scale_with_match=False)
    tree.prefill(prompt, None)
    proposal = tree.propose(DraftContext(prompt, GREEDY, 10))
    assert proposal.tree is not None
    kids = children_of(proposal.tree.parents.tolist())
    assert sorted(proposal.tree.tokens[kids[0]].tolist()) == [3, 4]  # distinct root children
    fresh = NgramDrafter(3)
    fresh.prefill([5, 6], None)
    assert fresh.propose(DraftContext([5, 6], GREEDY, 10)).num_tokens == 0
    # a new request with a different history resets the index
    assert fresh.propose(DraftContext([8, 8, 8], GREEDY, 10)).tokens.tolist() == [8]


@pytest.fixture(scope="module")
def target(target_path):
    return load_model(target_path, dtype="float32")


@pytest.mark.parametrize("k,branches,max_new", [(2, 1, 17), (4, 1, 40), (3, 3, 33), (5, 4, 40)])
def test_greedy_equals_plain(target, k, branches, max_new):
    plain = SpeculativeGenerator(target)
    gen = SpeculativeGenerator(target, NgramDrafter(k, num_branches=branches))
    accepted = 0
    for prompt in ([5], [1, 2, 3], [40, 41, 42, 40, 41, 43, 40, 41, 44, 40, 41]):
        ref = plain.generate(prompt, max_new_tokens=max_new).token_ids
        out = gen.generate(prompt, max_new_tokens=max_new)
        assert out.token_ids == ref
        accepted += out.stats.accepted_tokens
    assert accepted > 0  # the tiny model's greedy text repeats itself: lookups do hit


def test_greedy_stops_at_eos(target):
    prompt = [40, 41, 42, 40, 41, 43, 40, 41]
    ref = SpeculativeGenerator(target).generate(prompt, max_new_tokens=30).token_ids
    eos = ref[6]
    gen = SpeculativeGenerator(target, NgramDrafter(4, num_branches=2))
    gen.eos_token_ids = frozenset({eos})
    out = gen.generate(prompt, max_new_tokens=30)
    assert out.token_ids == ref[: ref.index(eos)] and out.finish_reason == "eos"


# Repeated "1 2" with different continuations: the first step proposes a tree of distinct
# deterministic siblings (3, 4, 5 below the pending 2).
NGRAM_PROMPT = [1, 2, 3, 1, 2, 4, 6, 1, 2, 5, 1, 2]


@pytest.mark.parametrize("sampling", SETTINGS[:2], ids=SETTING_IDS[:2])
def test_tree_sampling_matches_exact_target_distribution(vocab8, sampling):
    drafter = NgramDrafter(2, num_branches=3)
    drafter.prefill(NGRAM_PROMPT, None)
    first = drafter.propose(DraftContext(NGRAM_PROMPT, GREEDY, 2)).tree
    assert first is not None and len(children_of(first.parents.tolist())[0]) == 3
    gen = SpeculativeGenerator(vocab8["target"], NgramDrafter(2, num_branches=3))
    assert_matches_target(gen, NGRAM_PROMPT, N_SAMPLES, sampling)


def test_negative_control_broken_tree_verifier_fails(vocab8, monkeypatch):
    monkeypatch.setattr("specdec.engine.tree_step.verify_tree_rejection", accept_first_children)
    gen = SpeculativeGenerator(vocab8["target"], NgramDrafter(2, num_branches=3))
    assert_fails_target(gen, NGRAM_PROMPT, 400, SETTINGS[0])
