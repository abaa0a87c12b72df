"""HybridDrafter: lookup where it finds a continuation, the draft model elsewhere; greedy output
equals plain decoding, sampled output follows the target's exact distribution."""

from __future__ import annotations

import pytest
import torch

from specdec import DraftModelDrafter, HybridDrafter, SpeculativeGenerator
from specdec.drafters.base import DraftContext, Drafter, DraftProposal
from specdec.drafters.hybrid import GREEDY_RULE, LookupRule
from specdec.drafters.registry import DrafterSpec, make_drafter
from specdec.sampling import SamplingParams
from specdec.verify.chain import VerifyResult
from test_draft_tree import (
    N_SAMPLES,
    SETTING_IDS,
    SETTINGS,
    assert_draft_cache_consistent,
    assert_fails_target,
    assert_matches_target,
    make_vocab8,
)

PROMPTS = [[5], [1, 2, 3], [40, 41, 42, 40, 41, 43, 40, 41, 44, 40, 41], [7, 8, 9, 7, 8, 9, 7, 8]]
NGRAM_PROMPT = [1, 2, 3, 1, 2, 4, 6, 1, 2, 5, 1, 2]


@pytest.fixture(scope="module")
def vocab8(tmp_path_factory):  # type: ignore[no-untyped-def]
    return make_vocab8(tmp_path_factory.mktemp("hybrid-vocab8"))


class Scripted(Drafter):
    """A chain drafter that proposes ``K`` copies of token 0 and counts its calls."""

    def __init__(self) -> None:
        self.num_draft_tokens, self.proposed, self.verified = 4, 0, 0

    def prefill(self, prompt_ids, target_out) -> None:  # type: ignore[no-untyped-def]
        pass

    def propose(self, ctx: DraftContext) -> DraftProposal:
        self.proposed += 1
        return DraftProposal(torch.zeros(self.num_draft_tokens, dtype=torch.long))

    def on_verified(self, result: VerifyResult) -> None:
        self.verified += 1


def test_lookup_is_proposed_where_the_rule_allows_and_the_draft_elsewhere() -> None:
    draft = Scripted()
    hybrid = HybridDrafter(draft)
    greedy, sampled = SamplingParams(), SamplingParams(temperature=0.8)

    def propose(ids: list[int], sampling: SamplingParams) -> list[int]:
        hybrid.prefill(ids, None)  # type: ignore[arg-type]
        tokens = hybrid.propose(DraftContext(ids, sampling, 8)).tokens.tolist()
        hybrid.on_verified(VerifyResult(tokens[:1], 0, len(tokens), False))
        return tokens

    three = [1, 2, 3, 9, 1, 2, 3]  # "1 2 3" was followed by "9 1 2 3": a 3-token match
    assert propose(three, greedy) == [9, 1, 2, 3]
    assert (draft.proposed, draft.verified) == (0, 0)  # a lookup step leaves the draft alone
    assert propose(three, sampled) == [0, 0, 0, 0]  # sampling: the draft model, by default
    two = [1, 2, 3, 9, 1, 2]  # "1 2" was followed by "3 9 1 2": a 2-token match only
    assert propose(two, greedy) == [0, 0, 0, 0]
    assert propose([4, 5, 6], greedy) == [0, 0, 0, 0]  # nothing to look up
    assert (draft.proposed, draft.verified) == (3, 3)
    assert (hybrid.looked_up, hybrid.drafted) == (1, 3)
    hybrid = HybridDrafter(draft, sampled_rule=LookupRule(min_tokens=None, min_match=2))
    assert propose(two, sampled) == [3, 9, 1, 2]  # the full K (4) after a 2-token match
    assert propose([1, 2, 9, 1, 2], sampled) == [0, 0, 0, 0]  # "9 1 2": 3 tokens of 4, the draft


def test_greedy_output_equals_plain_decoding(models) -> None:  # type: ignore[no-untyped-def]
    target, draft = models["target"], models["good"]
    hybrid = HybridDrafter(DraftModelDrafter(draft, 4))
    plain, gen = SpeculativeGenerator(target), SpeculativeGenerator(target, hybrid)
    for prompt in PROMPTS:
        out = gen.generate(prompt, max_new_tokens=40)
        assert out.token_ids == plain.generate(prompt, max_new_tokens=40).token_ids
        if hybrid.draft.cache.lengths[0] > 0:
            assert_draft_cache_consistent(hybrid.draft, prompt + out.token_ids)
    assert hybrid.looked_up > 0 and hybrid.drafted > 0  # both kinds of step were taken


@pytest.mark.parametrize("sampling", SETTINGS, ids=SETTING_IDS)
def test_sampling_with_lookups_matches_exact_target_distribution(vocab8, sampling) -> None:  # type: ignore[no-untyped-def]
    """Lookups under sampling (off by default, on here: full-length continuations after 2-token
    matches) and draft steps mixed: the output follows the target's exact distribution."""
    rule = LookupRule(min_tokens=None, min_match=2)
    hybrid = HybridDrafter(DraftModelDrafter(vocab8["far"], 2), sampled_rule=rule)
    assert_matches_target(SpeculativeGenerator(vocab8["target"], hybrid), NGRAM_PROMPT, N_SAMPLES, sampling)
    assert hybrid.looked_up > 0 and hybrid.drafted > 0


def test_sampling_with_lookups_of_any_length_matches_exact_target_distribution(vocab8) -> None:  # type: ignore[no-untyped-def]
    hybrid = HybridDrafter(DraftModelDrafter(vocab8["far"], 2), sampled_rule=GREEDY_RULE)
    assert_matches_target(SpeculativeGenerator(vocab8["target"], hybrid), NGRAM_PROMPT, N_SAMPLES, SETTINGS[1])
    assert hybrid.looked_up > 0 and hybrid.drafted > 0


def test_negative_control_lookups_taken_as_sampled_from_the_draft_fail(vocab8, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A lookup passed off as a draw from a uniform draft distribution: rejection sampling then
    uses the wrong q and the output leaves the target's distribution."""
    hybrid = HybridDrafter(DraftModelDrafter(vocab8["far"], 2), sampled_rule=LookupRule(1, 1))
    lookup = HybridDrafter.propose

    def mislabelled(self, ctx):  # type: ignore[no-untyped-def]
        proposal = lookup(self, ctx)
        if proposal.draft_probs is None:
            uniform = torch.full((proposal.num_tokens, 8), 1 / 8)
            return DraftProposal(proposal.tokens, uniform)
        return proposal

    monkeypatch.setattr(HybridDrafter, "propose", mislabelled)
    assert_fails_target(SpeculativeGenerator(vocab8["target"], hybrid), NGRAM_PROMPT, 600, SETTINGS[1])


def test_registry_builds_the_hybrid_drafter(target_path, good_draft_path) -> None:  # type: ignore[no-untyped-def]
    from specdec import load_model

    target = load_model(target_path, dtype="float32")
    drafter = make_drafter("hybrid", DrafterSpec(target, draft=str(good_draft_path), num_draft_tokens=3, dtype="float32"))
    assert isinstance(drafter, HybridDrafter) and drafter.num_draft_tokens == 3
