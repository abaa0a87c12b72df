"""DraftModelDrafter tree mode (EAGLE-2-style dynamic trees): greedy exactness, draft-cache
bookkeeping, tree shape, and lossless sampling against the target's exact distribution.

The distribution helpers here are shared with test_ngram.py and test_staged.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from helpers import save_tiny_llama
from specdec import DraftModelDrafter, SpeculativeGenerator, load_model
from specdec.drafters.base import DraftContext
from specdec.sampling import SamplingParams, logits_to_probs
from specdec.verify.chain import VerifyResult
from specdec.verify.tree import children_of, node_depths

PROMPTS = [[5], [1, 2, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
SMALL_PROMPT = [1, 2, 3, 1, 2, 4, 1, 2]  # repeats "1 2" for the n-gram drafters
SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
]
SETTING_IDS = ["t1", "t0.7-topk5", "t1.3-topp0.8"]
N_SAMPLES = 1000  # about 7 ms per sample on an idle core; 64 cells of an 8-token vocabulary


# ---------------------------------------------------------------------------- shared helpers
def make_vocab8(folder) -> dict:
    """An 8-token target (13-45 cells of its two-token joint expect >= 5 of 1200 samples) and a
    far, peaked 8-token draft (1 layer each: fast sampling)."""
    target = save_tiny_llama(folder / "t", vocab_size=8, hidden_size=32, num_layers=1, init_std=0.25, seed=4)
    far = save_tiny_llama(folder / "far", vocab_size=8, hidden_size=32, num_layers=1, init_std=0.6, seed=5)
    return {name: load_model(p, dtype="float32") for name, p in [("target", target), ("far", far)]}


@pytest.fixture(scope="module")
def vocab8(tmp_path_factory):
    return make_vocab8(tmp_path_factory.mktemp("tree-vocab8"))


def sample_first_two(gen: SpeculativeGenerator, prompt: list[int], n: int, **sampling) -> np.ndarray:
    """Counts ``(V, V)`` of the first two tokens of ``n`` generations (seed = 0 .. n-1).

    ``max_new_tokens=3`` lets the first step verify a depth-2 tree (the engine caps the draft
    depth at ``max_new_tokens - 1``), so both tokens can come from tree verification.
    """
    V = gen.target.config.vocab_size
    counts = np.zeros((V, V))
    for seed in range(n):
        out = gen.generate(prompt, max_new_tokens=3, seed=seed, ignore_eos=True, **sampling).token_ids
        counts[out[0], out[1]] += 1
    return counts


def tv_bound(probs: np.ndarray, n: int, delta: float = 1e-4) -> float:
    """A rigorous (1 - delta) upper bound on the TV distance of n exact samples.

    E|f_i - p_i| <= sqrt(p_i (1 - p_i) / n) (Jensen), so E[TV] <= 0.5 * sum_i sqrt(p_i (1-p_i) / n);
    one sample moves TV by at most 1/n, so McDiarmid gives P(TV > E[TV] + t) <= exp(-2 n t^2).
    """
    p = probs.ravel()
    return 0.5 * float(np.sum(np.sqrt(p * (1 - p) / n))) + math.sqrt(math.log(1 / delta) / (2 * n))


@torch.inference_mode()
def exact_joint(target, prompt: list[int], params: SamplingParams) -> np.ndarray:
    """``(V, V)``: p(t1) * p(t2 | t1) under the target's processed distribution."""
    V, T = target.config.vocab_size, len(prompt)
    ids = torch.tensor([prompt])
    first = logits_to_probs(target(ids, torch.arange(T), target.new_cache(1, T + 2))[0, -1], params)  # (V,)
    batch = torch.cat([ids.expand(V, -1), torch.arange(V)[:, None]], dim=1)  # (V, T+1)
    second = logits_to_probs(target(batch, torch.arange(T + 1), target.new_cache(V, T + 2))[:, -1], params)
    return (first[:, None] * second).double().numpy()  # (V, V)


def fit(counts: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """(chi-square p-value, total variation). Cells with an expected count under 5 form one bin;
    a sample in a cell of probability 0 gives p = 0."""
    n, c, p = counts.sum(), counts.ravel(), exact.ravel()
    if c[p == 0].sum() > 0:
        return 0.0, 1.0
    big = p * n >= 5
    f_obs = np.append(c[big], c[~big].sum())
    f_exp = np.append(p[big], p[~big].sum()) * n
    keep = f_exp > 0
    f_exp = f_exp[keep] * (f_obs[keep].sum() / f_exp[keep].sum())  # absorb float rounding
    return float(chisquare(f_obs[keep], f_exp).pvalue), 0.5 * float(np.abs(c / n - p).sum())


def assert_matches_target(gen: SpeculativeGenerator, prompt: list[int], n: int, sampling: dict) -> None:
    exact = exact_joint(gen.target, prompt, SamplingParams(**sampling))
    assert (exact * n >= 5).sum() >= 8, "too few populated cells for a meaningful test"
    pvalue, tv = fit(sample_first_two(gen, prompt, n, **sampling), exact)
    assert pvalue > 1e-3, f"chi-square p = {pvalue:.2e}"
    assert tv < tv_bound(exact, n), f"TV {tv:.4f} >= bound {tv_bound(exact, n):.4f}"


def assert_fails_target(gen: SpeculativeGenerator, prompt: list[int], n: int, sampling: dict) -> None:
    exact = exact_joint(gen.target, prompt, SamplingParams(**sampling))
    pvalue, _ = fit(sample_first_two(gen, prompt, n, **sampling), exact)
    assert pvalue < 1e-6, f"a broken sampler passed the chi-square (p = {pvalue:.2e})"


def accept_first_children(tree, target_probs, generator=None) -> VerifyResult:
    """A broken verifier: accepts the first child at every level without looking at the target."""
    children, path, row = children_of(tree.parents.tolist()), [], 0
    while children[row]:
        path.append(children[row][0])
        row = path[-1] + 1
    last = int(torch.multinomial(target_probs[row], 1, generator=generator))
    tokens = [int(tree.tokens[i]) for i in path] + [last]
    return VerifyResult(tokens, len(path), tree.num_nodes, True, tuple(path))


def assert_draft_cache_consistent(drafter, tokens: list[int]) -> None:
    """The draft cache's committed slots equal a fresh draft pass over the same tokens."""
    length = drafter.cache.lengths[0]
    assert 0 < length <= len(tokens) - 1
    fresh = drafter.model.new_cache(1, length)
    with torch.inference_mode():
        drafter.model(torch.tensor([tokens[:length]]), torch.arange(length), fresh)
    torch.testing.assert_close(drafter.cache.k[:, :, :, :length], fresh.k, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(drafter.cache.v[:, :, :, :length], fresh.v, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- greedy
@pytest.mark.parametrize(
    "draft,k,width,nodes,max_new",
    [("good", 1, 3, None, 13), ("good", 4, 2, None, 29), ("good", 5, 3, 7, 31), ("far", 3, 4, 10, 22)],
)
def test_tree_mode_greedy_equals_plain(models, draft, k, width, nodes, max_new):
    target = models["target"]
    plain = SpeculativeGenerator(target)
    drafter = DraftModelDrafter(models[draft], k, tree_width=width, max_tree_nodes=nodes)
    gen = SpeculativeGenerator(target, drafter)
    for prompt in PROMPTS:
        ref = plain.generate(prompt, max_new_tokens=max_new).token_ids
        out = gen.generate(prompt, max_new_tokens=max_new)
        assert out.token_ids == ref
        assert_draft_cache_consistent(drafter, prompt + out.token_ids)
        if draft == "good" and k > 1:
            assert out.stats.mean_accepted_length > 1.5


def test_tree_beats_chain_on_acceptance(models):
    target, draft = models["target"], models["good"]
    prompt, max_new = [1, 2, 3], 60
    chain = SpeculativeGenerator(target, DraftModelDrafter(draft, 4)).generate(prompt, max_new_tokens=max_new)
    tree = SpeculativeGenerator(target, DraftModelDrafter(draft, 4, tree_width=3, max_tree_nodes=12))
    out = tree.generate(prompt, max_new_tokens=max_new)
    assert out.token_ids == chain.token_ids
    assert out.stats.mean_accepted_length >= chain.stats.mean_accepted_length


def test_tree_mode_stops_at_eos(models):
    target = models["target"]
    ref = SpeculativeGenerator(target).generate([1, 2, 3], max_new_tokens=30).token_ids
    eos = ref[7]
    gen = SpeculativeGenerator(target, DraftModelDrafter(models["good"], 4, tree_width=2))
    gen.eos_token_ids = frozenset({eos})
    out = gen.generate([1, 2, 3], max_new_tokens=30)
    assert out.token_ids == ref[: ref.index(eos)] and out.finish_reason == "eos"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tree_shape(models, temperature):
    drafter = DraftModelDrafter(models["far"], 4, tree_width=3, max_tree_nodes=9)
    prompt = [1, 2, 3, 4]
    drafter.prefill(prompt, None)
    ctx = DraftContext(prompt, SamplingParams(temperature), 10, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        proposal = drafter.propose(ctx)
    tree = proposal.tree
    parents = tree.parents.tolist()
    assert tree.num_nodes <= 9 and max(node_depths(parents)) <= 4
    assert max(node_depths(parents)) >= 2
    kids = children_of(parents)
    assert max(len(k) for k in kids) <= 3
    if temperature == 0.0:
        assert tree.draft_probs is None
        assert all(len(set(tree.tokens[k].tolist())) == len(k) for k in kids)  # distinct siblings
    else:
        assert tree.draft_probs.shape == (tree.num_nodes, models["far"].config.vocab_size)
        for k in kids:  # siblings share the distribution they were drawn from
            assert all(torch.equal(tree.draft_probs[k[0]], tree.draft_probs[j]) for j in k)


# ---------------------------------------------------------------------------- sampling
class CountingDrafter(DraftModelDrafter):
    """Counts proposed trees with duplicate siblings (the test must cover that case)."""

    duplicate_trees = 0

    def propose(self, ctx):
        proposal = super().propose(ctx)
        if proposal.tree is not None:
            kids = children_of(proposal.tree.parents.tolist())
            tokens = proposal.tree.tokens
            if any(len(set(tokens[k].tolist())) < len(k) for k in kids):
                CountingDrafter.duplicate_trees += 1
        return proposal


@pytest.mark.parametrize("sampling", SETTINGS, ids=SETTING_IDS)
def test_tree_sampling_matches_exact_target_distribution(vocab8, sampling):
    CountingDrafter.duplicate_trees = 0
    drafter = CountingDrafter(vocab8["far"], 2, tree_width=3, max_tree_nodes=8)
    gen = SpeculativeGenerator(vocab8["target"], drafter)
    assert_matches_target(gen, [1], N_SAMPLES, sampling)
    assert CountingDrafter.duplicate_trees > N_SAMPLES // 10  # i.i.d. siblings over 8 tokens repeat often


def test_far_draft_is_often_rejected(vocab8):
    """The distribution tests are meaningful only if tree drafts are both accepted and rejected."""
    gen = SpeculativeGenerator(vocab8["target"], DraftModelDrafter(vocab8["far"], 2, tree_width=3))
    stats = [gen.generate([1], max_new_tokens=12, temperature=1.0, seed=s).stats for s in range(20)]
    rate = sum(s.accepted_tokens for s in stats) / sum(s.draft_positions for s in stats)
    assert 0.1 < rate < 0.9
    # A tree proposes more tokens than it has depths; the acceptance rate is per depth.
    assert sum(s.draft_tokens for s in stats) > sum(s.draft_positions for s in stats)
    assert all(s.acceptance_rate == s.accepted_tokens / s.draft_positions for s in stats if s.draft_positions)


def test_negative_control_broken_tree_verifier_fails(vocab8, monkeypatch):
    monkeypatch.setattr("specdec.engine.tree_step.verify_tree_rejection", accept_first_children)
    gen = SpeculativeGenerator(vocab8["target"], DraftModelDrafter(vocab8["far"], 2, tree_width=3))
    assert_fails_target(gen, [1], 400, SETTINGS[0])
