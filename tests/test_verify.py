"""Table-driven cases for the pure chain verification functions."""

from __future__ import annotations

import pytest
import torch

from specdec.sampling import SamplingParams, logits_to_probs
from specdec.verify import residual_probs, verify_greedy, verify_rejection

V = 6


def logits_for(argmaxes: list[int]) -> torch.Tensor:
    """(len, V) logits whose row i has its maximum at argmaxes[i]."""
    logits = torch.zeros(len(argmaxes), V)
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 5.0
    return logits


GREEDY_CASES = [
    # name, drafts, target argmax per position (K+1), committed tokens, accepted, bonus
    ("accept all", [1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4], 3, True),
    ("reject first", [1, 2, 3], [5, 2, 3, 4], [5], 0, False),
    ("reject middle", [1, 2, 3], [1, 0, 3, 4], [1, 0], 1, False),
    ("reject last", [1, 2, 3], [1, 2, 0, 4], [1, 2, 0], 2, False),
    ("empty draft", [], [4], [4], 0, True),
]


@pytest.mark.parametrize("name,drafts,argmaxes,tokens,accepted,bonus", GREEDY_CASES, ids=[c[0] for c in GREEDY_CASES])
def test_verify_greedy(name, drafts, argmaxes, tokens, accepted, bonus):
    result = verify_greedy(torch.tensor(drafts, dtype=torch.long), logits_for(argmaxes))
    assert result.tokens == tokens
    assert result.num_accepted == accepted
    assert result.bonus is bonus
    assert result.kinds == ["accepted"] * accepted + ["bonus" if bonus else "recovered"]


@pytest.mark.parametrize("name,drafts,argmaxes,tokens,accepted,bonus", GREEDY_CASES, ids=[c[0] for c in GREEDY_CASES])
def test_rejection_sampler_with_one_hot_distributions_is_greedy(name, drafts, argmaxes, tokens, accepted, bonus):
    """With one-hot target and draft distributions, rejection sampling must act exactly like greedy."""
    greedy = SamplingParams(0.0)
    target_probs = logits_to_probs(logits_for(argmaxes), greedy)
    d = torch.tensor(drafts, dtype=torch.long)
    draft_probs = torch.nn.functional.one_hot(d, V).float() if drafts else None
    for seed in range(5):
        result = verify_rejection(d, draft_probs, target_probs, torch.Generator().manual_seed(seed))
        assert (result.tokens, result.num_accepted, result.bonus) == (tokens, accepted, bonus)


def test_residual_is_normalised_positive_part():
    target = torch.tensor([0.5, 0.3, 0.2, 0.0])
    draft = torch.tensor([0.2, 0.6, 0.1, 0.1])
    torch.testing.assert_close(residual_probs(target, draft), torch.tensor([0.75, 0.0, 0.25, 0.0]))
    torch.testing.assert_close(residual_probs(target, target), target)


def test_deterministic_draft_rejection_excludes_the_rejected_token():
    """An n-gram style draft (no probabilities): after a rejection its token cannot be recovered."""
    target_probs = torch.tensor([[0.0, 0.5, 0.5, 0, 0, 0], [1.0, 0, 0, 0, 0, 0]])
    seen = set()
    for seed in range(40):
        result = verify_rejection(torch.tensor([1]), None, target_probs, torch.Generator().manual_seed(seed))
        seen.add(tuple(result.tokens))
    assert seen == {(1, 0), (2,)}  # accepted then bonus 0, or rejected and recovered 2


def test_sampling_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    assert logits_to_probs(logits, SamplingParams(1.0, top_k=2))[2:].sum() == 0
    probs = logits_to_probs(logits, SamplingParams(1.0, top_p=0.7))
    full = logits.softmax(-1)
    assert full[0] < 0.7 <= full[:2].sum()
    assert probs[:2].sum() == pytest.approx(1.0) and probs[2:].sum() == 0
    assert logits_to_probs(logits, SamplingParams(0.0)).tolist() == [1, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(-0.5)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(1.0, top_p=0.0)


def test_sample_draws_each_token_with_its_probability_and_never_a_zero_one():
    from scipy.stats import chisquare

    from specdec.sampling import sample

    probs = torch.tensor([[0.0, 0.5, 0.2, 0.0, 0.3, 0.0], [0.1, 0.1, 0.1, 0.1, 0.1, 0.5]])  # (2, V)
    gen = torch.Generator().manual_seed(0)
    one = sample(probs, gen)
    assert one.shape == (2,) and one.dtype == torch.long
    draws = sample(probs, gen, num_samples=20000)  # (2, 20000)
    assert draws.shape == (2, 20000)
    for row in range(2):
        counts = torch.bincount(draws[row], minlength=V).double()
        assert counts[probs[row] == 0].sum() == 0  # a token of probability 0 is never drawn
        keep = probs[row] > 0
        result = chisquare(counts[keep].numpy(), (probs[row][keep] * 20000).numpy())
        assert result.pvalue > 1e-3, result
    edge = torch.tensor([0.0, 0.0, 1.0, 0.0])  # all the mass on one token, zeros after it
    assert set(sample(edge, gen, num_samples=500).tolist()) == {2}
    assert sample(probs[0], gen).shape == ()  # one distribution (V,) -> one token
