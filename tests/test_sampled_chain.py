"""The sampled draft chains in one C++ call (``Transformer.draft_chain``, ``EagleHead.draft_chain``).

Rejection sampling is lossless for any draft distribution q as long as each draft is drawn from
the q handed to verification (tests/test_distribution.py checks the whole pipeline). Here: the
C++ q is the distribution ``sampling.logits_to_probs`` makes of the same logits (temperature,
top-k, top-p), the draws follow q, and a reduced vocabulary puts no mass outside its tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from helpers import needs_kernels, random_head
from specdec import DraftModelDrafter, EagleDrafter, SpeculativeGenerator, load_model
from specdec.drafters.vocab import DraftVocab
from specdec.sampling import SamplingParams, logits_to_probs

SETTINGS = [
    SamplingParams(1.0),
    SamplingParams(0.7, top_k=5),
    SamplingParams(1.3, top_p=0.8),
    SamplingParams(0.9, top_k=20, top_p=0.6),
]


@pytest.fixture(scope="module")
def draft(good_draft_path):
    return load_model(good_draft_path, dtype="float32")


@torch.inference_mode()  # as the engine runs (the kernels never run under autograd)
def chain(draft, prompt, k, params, seed, vocab=None):  # type: ignore[no-untyped-def]
    cache = draft.new_cache(1, 64)
    feed = torch.tensor([prompt])
    generator = torch.Generator().manual_seed(seed)
    rows = vocab.kernel_rows if vocab is not None else None
    out = draft.module.draft_chain(feed, 0, k, cache, params, generator, rows)
    assert out is not None and cache.lengths[0] == len(prompt) + k - 1
    return out


@pytest.mark.parametrize("params", SETTINGS, ids=str)
@torch.inference_mode()
def test_one_call_distributions_are_the_processed_logits(draft, params):
    """Each returned row equals logits_to_probs of the module path's logits after the same tokens."""
    needs_kernels()
    prompt = [5, 17, 3, 40, 2]
    drafts, probs = chain(draft, prompt, 4, params, seed=0)
    assert drafts.shape == (4,) and probs.shape == (4, draft.config.vocab_size)
    tokens = prompt + drafts.tolist()
    cache = draft.new_cache(1, 64)
    logits = draft.module(torch.tensor([tokens[:-1]]), torch.arange(len(tokens) - 1), cache)[0]  # (T, V)
    want = logits_to_probs(logits[len(prompt) - 1 :], params)  # (4, V): after the prompt, after each draft
    torch.testing.assert_close(probs, want, atol=2e-6, rtol=1e-4)
    assert bool((probs[torch.arange(4), drafts] > 0).all())  # each draft is possible under its q
    if params.top_k is not None:
        assert bool(((probs > 0).sum(-1) <= params.top_k).all())


def test_one_call_draws_follow_their_distribution(draft):
    """Chi-square of 3000 first drafts against the q the chain returns for them."""
    needs_kernels()
    params = SamplingParams(1.5, top_k=8)
    counts = np.zeros(draft.config.vocab_size)
    q = None
    for seed in range(3000):
        drafts, probs = chain(draft, [9, 8, 7], 1, params, seed)
        counts[int(drafts[0])] += 1
        q = probs[0] if q is None else q
        assert torch.equal(probs[0], q)  # the same context gives the same q
    support = (q > 0).numpy()
    assert counts[~support].sum() == 0
    expected = q.double().numpy()[support] * counts.sum()
    assert chisquare(counts[support], expected / expected.sum() * counts.sum()).pvalue > 1e-3


def test_one_call_sampling_over_a_reduced_vocabulary(draft):
    needs_kernels()
    keep = list(range(0, draft.config.vocab_size, 3))
    vocab = DraftVocab(draft, keep)
    outside = torch.ones(draft.config.vocab_size, dtype=torch.bool)
    outside[keep] = False
    for seed in range(20):
        drafts, probs = chain(draft, [1, 2, 3], 3, SamplingParams(1.0), seed, vocab)
        assert set(drafts.tolist()) <= set(keep)
        assert float(probs[:, outside].abs().sum()) == 0.0
        torch.testing.assert_close(probs.sum(-1), torch.ones(3))


CHAINS = [("draft", "float32", False), ("draft", "float32", True), ("eagle", "float32", False),
          ("eagle", "float32", True), ("eagle", "bfloat16", False)]  # fmt: skip


@pytest.mark.parametrize("kind,dtype,subset", CHAINS, ids=[f"{k}-{d}-{'subset' if s else 'full'}" for k, d, s in CHAINS])
def test_sampled_chain_in_one_call_proposes_what_the_python_loop_proposes(
    target_path, good_draft_path, kind, dtype, subset, monkeypatch
):
    """Through whole seeded generations the one call draws the loop's drafts (its uniforms come
    from the same generator in the same order) with the loop's distributions, step by step."""
    from specdec.drafters.heads import EagleHead
    from specdec.models.llama import Transformer

    needs_kernels()
    target = load_model(target_path, dtype=dtype)
    scorer = load_model(good_draft_path, dtype=dtype) if kind == "draft" else target
    vocab = DraftVocab(scorer, list(range(0, 96, 3))) if subset else None
    prompts = [[5, 7], [9, 40, 2, 2, 17, 80, 33, 61, 5, 5, 12]]
    params = dict(temperature=0.8, top_k=40, top_p=0.95)
    if dtype == "bfloat16":
        # bfloat16 logits tie often; where ties straddle the top-p cut, torch's (unstable) sort and
        # the C++ stable sort may keep different tied tokens: both valid, but not comparable here.
        del params["top_p"]

    def proposals() -> list[tuple[list[int], torch.Tensor]]:
        if kind == "draft":
            drafter = DraftModelDrafter(scorer, 4, draft_vocab=vocab)
        else:
            drafter = EagleDrafter(target, random_head("eagle", target, seed=6), num_draft_tokens=4, draft_vocab=vocab or 0)
        seen = []
        propose = drafter.propose

        def record(ctx):  # type: ignore[no-untyped-def]
            proposal = propose(ctx)
            seen.append((proposal.tokens.tolist(), proposal.draft_probs))
            return proposal

        drafter.propose = record  # type: ignore[method-assign]
        for seed, prompt in enumerate(prompts):
            SpeculativeGenerator(target, drafter).generate(prompt, max_new_tokens=24, seed=seed, **params)
        return seen

    owner, method = (Transformer, "draft_chain") if kind == "draft" else (EagleHead, "draft_chain")
    calls = []
    one_call = getattr(owner, method)
    monkeypatch.setattr(owner, method, lambda *a, **kw: calls.append(1) or one_call(*a, **kw))
    got = proposals()
    monkeypatch.setattr(owner, method, lambda *args, **kwargs: None)  # the Python loop runs
    want = proposals()
    assert len(got) >= 10 and len(calls) == len(got)  # every proposal came from the one call
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in want]
    for (_, q_got), (_, q_want) in zip(got, want, strict=True):
        torch.testing.assert_close(q_got, q_want.float(), atol=1e-5, rtol=1e-4)
    if subset:
        assert all(t % 3 == 0 for tokens, _ in got for t in tokens)

