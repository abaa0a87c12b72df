"""Tree verification: mask / position golden cases, greedy and rejection verification (a chain is a
one-branch tree), KV compaction, exactness of the tree step in the engine, and an exact
distribution test of multi-draft recursive rejection sampling on synthetic distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specdec import DraftModelDrafter, SpeculativeGenerator, load_model
from specdec.drafters.base import Drafter, DraftProposal, DraftTree
from specdec.verify.chain import verify_greedy, verify_rejection
from specdec.verify.tree import (
    children_of,
    node_depths,
    tree_attention_mask,
    tree_positions,
    truncate_tree,
    verify_tree_greedy,
    verify_tree_rejection,
)

PARENTS = [-1, -1, 0, 0, 2]  # the module docstring's worked example


def tree(tokens, parents, probs=None) -> DraftTree:
    return DraftTree(torch.tensor(tokens), torch.tensor(parents), probs)


def test_positions_and_mask_golden():
    P = 3
    assert tree_positions(torch.tensor(PARENTS), P).tolist() == [3, 4, 4, 5, 5, 6]
    mask = tree_attention_mask(torch.tensor(PARENTS), P).int().tolist()
    #           slots: 0  1  2  P=3 | n0 n1 n2 n3 n4
    assert mask == [
        [1, 1, 1, 1, 0, 0, 0, 0, 0],  # pending
        [1, 1, 1, 1, 1, 0, 0, 0, 0],  # node 0
        [1, 1, 1, 1, 0, 1, 0, 0, 0],  # node 1
        [1, 1, 1, 1, 1, 0, 1, 0, 0],  # node 2 (parent 0)
        [1, 1, 1, 1, 1, 0, 0, 1, 0],  # node 3 (parent 0)
        [1, 1, 1, 1, 1, 0, 1, 0, 1],  # node 4 (parent 2)
    ]
    assert children_of(PARENTS) == [[0, 1], [2, 3], [], [4], [], []]


def test_chain_mask_is_causal():
    K, P = 4, 5
    mask = tree_attention_mask(torch.arange(-1, K - 1), P)
    causal = torch.arange(P + 1 + K)[None, :] <= torch.arange(P, P + K + 1)[:, None]
    assert torch.equal(mask, causal)
    assert tree_positions(torch.arange(-1, K - 1), P).tolist() == list(range(P, P + K + 1))


def test_nodes_must_follow_their_parents():
    with pytest.raises(ValueError):
        node_depths([1, -1])
    t = truncate_tree(tree([1, 2, 3, 4, 5], PARENTS), 3)
    assert t.parents.tolist() == [-1, -1, 0] and t.tokens.tolist() == [1, 2, 3]


def one_hot_logits(rows: list[int], V: int = 10) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(rows), V).float() * 5  # (R, V)


def test_greedy_tree_takes_the_longest_matching_path():
    # nodes: 0:a=1 (root), 1:b=2 (root), 2:c=3 (under 0), 3:d=4 (under 0), 4:e=5 (under 2)
    t = tree([1, 2, 3, 4, 5], PARENTS)
    # target argmax per row: root->1, node0->3, node1->9, node2->5, node3->0, node4->7
    result = verify_tree_greedy(t, one_hot_logits([1, 3, 9, 5, 0, 7]))
    assert result.accepted_path == (0, 2, 4) and result.tokens == [1, 3, 5, 7] and result.bonus
    result = verify_tree_greedy(t, one_hot_logits([2, 3, 9, 5, 0, 7]))
    assert result.accepted_path == (1,) and result.tokens == [2, 9] and result.bonus
    result = verify_tree_greedy(t, one_hot_logits([1, 8, 9, 5, 0, 7]))
    assert result.accepted_path == (0,) and result.tokens == [1, 8] and not result.bonus
    # duplicate siblings: the one with the deeper matching subtree wins
    dup = tree([1, 1, 3], [-1, -1, 1])
    result = verify_tree_greedy(dup, one_hot_logits([1, 3, 3, 6]))
    assert result.accepted_path == (1, 2) and result.tokens == [1, 3, 6]


def test_chain_as_tree_equals_chain_verification():
    torch.manual_seed(0)
    V, K = 7, 4
    parents = list(range(-1, K - 1))
    for trial in range(200):
        target_probs = torch.softmax(torch.randn(K + 1, V) * 2, -1)
        draft_probs = torch.softmax(torch.randn(K, V) * 2, -1)
        drafts = torch.multinomial(draft_probs, 1).squeeze(1)
        for probs in (draft_probs, None):
            g1, g2 = torch.Generator().manual_seed(trial), torch.Generator().manual_seed(trial)
            chain = verify_rejection(drafts, probs, target_probs, g1)
            as_tree = verify_tree_rejection(tree(drafts.tolist(), parents, probs), target_probs, g2)
            assert as_tree == chain
        logits = torch.randn(K + 1, V)
        logits[: trial % (K + 1), :] = -10
        logits[torch.arange(trial % (K + 1)), drafts[: trial % (K + 1)]] = 10  # accept a prefix
        assert verify_tree_greedy(tree(drafts.tolist(), parents), logits) == verify_greedy(drafts, logits)


def synthetic_joint_test(V: int, siblings: int, deterministic: bool, seed: int, n: int = 20000):
    """Exact vs sampled joint of the first two tokens of one depth-2 tree verification.

    The target's distributions are tables ``p1 (V,)``, ``p2 (V, V)``; the draft's ``q1``, ``q2``.
    Each root child is drawn from ``q1`` and gets ``siblings`` children drawn from ``q2[token]``
    (i.i.d., duplicates allowed; or the distinct top tokens when ``deterministic``). If
    verification stops after one token, the second is drawn from ``p2`` (the next step).
    """
    g = torch.Generator().manual_seed(seed)
    p1 = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    p2 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)
    q1 = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    q2 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)
    counts = np.zeros((V, V))
    for _ in range(n):
        if deterministic:
            first = torch.randperm(V, generator=g)[:siblings]
        else:
            first = torch.multinomial(q1, siblings, replacement=True, generator=g)
        tokens, parents, rows = first.tolist(), [-1] * siblings, [q1] * siblings
        for i, x in enumerate(first.tolist()):
            if deterministic:
                kids = torch.randperm(V, generator=g)[:siblings]
            else:
                kids = torch.multinomial(q2[x], siblings, replacement=True, generator=g)
            tokens += kids.tolist()
            parents += [i] * siblings
            rows += [q2[x]] * siblings
        t = tree(tokens, parents, None if deterministic else torch.stack(rows))
        target_probs = torch.cat([p1[None], p2[torch.tensor(tokens)]])  # (N+1, V)
        out = verify_tree_rejection(t, target_probs, g).tokens
        if len(out) == 1:
            out.append(int(torch.multinomial(p2[out[0]], 1, generator=g)))
        counts[out[0], out[1]] += 1
    exact = (p1[:, None] * p2).double().numpy()
    return counts, exact


@pytest.mark.parametrize("deterministic", [False, True], ids=["iid-siblings", "distinct-siblings"])
def test_recursive_rejection_is_lossless_on_synthetic_trees(deterministic):
    V = 4
    counts, exact = synthetic_joint_test(V, siblings=3, deterministic=deterministic, seed=1, n=6000)
    f_exp = exact.ravel() * counts.sum()
    assert chisquare(counts.ravel(), f_exp * counts.sum() / f_exp.sum()).pvalue > 1e-3


def test_synthetic_test_detects_a_missing_residual_update(monkeypatch):
    """Negative control: siblings that all compete against the full target (no residual update
    after a rejection) over-produce rejected tokens; the chi-square must catch it."""
    monkeypatch.setattr("specdec.verify.tree.residual_probs", lambda target_probs, draft_probs: target_probs)
    counts, exact = synthetic_joint_test(4, siblings=3, deterministic=False, seed=1, n=3000)
    f_exp = exact.ravel() * counts.sum()
    assert chisquare(counts.ravel(), f_exp * counts.sum() / f_exp.sum()).pvalue < 1e-6


def test_recursive_rejection_reads_each_nodes_tests_back_at_once(monkeypatch):
    """The acceptance tests of a node's children come back to the host in one transfer (a GPU
    sync each), not one per child: here a root with four children, all rejected (the target puts
    no mass on them), then the recovered token from the residual."""
    V = 8
    target = torch.zeros(2, V)
    target[:, 5:] = 1 / 3  # (2, V): nothing on tokens 0-3
    transfers = []
    for name in ("tolist", "item", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda t, *a, _f=original, _n=name: transfers.append(_n) or _f(t, *a)
        )
    result = verify_tree_rejection(tree([0, 1, 2, 3], [-1] * 4), target, torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert result.num_accepted == 0 and result.tokens[0] in (5, 6, 7)
    assert transfers == ["tolist", "tolist", "tolist"]  # tokens, parents, the four tests together


# ---------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def target(target_path):
    return load_model(target_path, dtype="float32")


@torch.inference_mode()
def test_compact_then_decode_equals_fresh_decode(target):
    prompt = [5, 9, 13, 2, 7]
    P = len(prompt) - 1
    cache = target.new_cache(1, 64)
    target(torch.tensor([prompt[:-1]]), torch.arange(P), cache)
    t = tree([11, 12, 13, 14, 15], PARENTS)
    inp = torch.tensor([[prompt[-1], 11, 12, 13, 14, 15]])
    pos = tree_positions(t.parents, P)[None]
    target(
        inp,
        pos,
        cache,
        attn_mask=tree_attention_mask(t.parents, P)[None],
        cache_slots=torch.arange(P, P + 6)[None],
    )
    path = [0, 2, 4]  # tokens 11, 13, 15
    cache.compact(P + 1, path)
    assert cache.lengths[0] == P + 1 + len(path)
    seq = prompt + [11, 13, 15]
    nxt = target(torch.tensor([[42]]), torch.tensor([len(seq)]), cache)[0, -1]
    fresh = target(torch.tensor([seq + [42]]), torch.arange(len(seq) + 1), target.new_cache(1, 64))[0, -1]
    torch.testing.assert_close(nxt, fresh, rtol=1e-5, atol=1e-5)


class RandomTreeDrafter(Drafter):
    """Random trees in which the target's greedy continuation (known in advance) hides at a
    random sibling slot with probability ``hit``: exercises deep accepted paths and rejections."""

    def __init__(self, reference: list[int], prompt_len: int, vocab: int, k: int, width: int, hit: float):
        self.reference, self.prompt_len, self.vocab = reference, prompt_len, vocab
        self.num_draft_tokens, self.width, self.hit = k, width, hit
        self.rng = np.random.default_rng(0)
        self.proposed_nodes = 0

    def prefill(self, prompt_ids, target_out):
        pass

    def propose(self, ctx):
        done = len(ctx.token_ids) - self.prompt_len
        K = min(self.num_draft_tokens, ctx.max_draft_tokens)
        tokens, parents, parent = [], [], -1
        for d in range(K):
            correct = self.reference[done + d] if done + d < len(self.reference) else 0
            slot = self.rng.integers(self.width) if self.rng.random() < self.hit else -1
            level = []
            for s in range(self.width):
                level.append(len(tokens))
                tokens.append(correct if s == slot else int(self.rng.integers(self.vocab)))
                parents.append(parent)
            parent = level[slot] if slot >= 0 else level[0]
        self.proposed_nodes += len(tokens)
        t = tree(tokens, parents)
        return DraftProposal(t.tokens, tree=t)

    def on_verified(self, result):
        pass


@pytest.mark.parametrize("k,width,max_new", [(1, 3, 17), (3, 2, 30), (5, 3, 23)])
def test_tree_step_greedy_equals_plain_decoding(target, k, width, max_new):
    plain = SpeculativeGenerator(target)
    for prompt in ([5], [1, 2, 3], [40, 41, 42, 43, 44, 45, 46]):
        ref = plain.generate(prompt, max_new_tokens=max_new).token_ids
        drafter = RandomTreeDrafter(ref, len(prompt), target.config.vocab_size, k, width, hit=0.8)
        out = SpeculativeGenerator(target, drafter).generate(prompt, max_new_tokens=max_new)
        assert out.token_ids == ref
        assert drafter.proposed_nodes > 0
        if k > 1:
            assert out.stats.mean_accepted_length > 1.5
            assert out.stats.target_forwards < 1 + max_new


def test_tree_step_stops_at_eos(target):
    plain = SpeculativeGenerator(target)
    prompt = [1, 2, 3]
    ref = plain.generate(prompt, max_new_tokens=30).token_ids
    eos = ref[9]
    cut = ref.index(eos)
    drafter = RandomTreeDrafter(ref, len(prompt), target.config.vocab_size, 4, 2, hit=1.0)
    gen = SpeculativeGenerator(target, drafter)
    gen.eos_token_ids = frozenset({eos})
    out = gen.generate(prompt, max_new_tokens=30)
    assert out.token_ids == ref[:cut] and out.finish_reason == "eos"


def test_tree_step_truncates_trees_that_do_not_fit_the_cache(target):
    """Near the end of max_new_tokens the target cache is small; wide trees are cut to fit."""
    plain = SpeculativeGenerator(target)
    ref = plain.generate([7, 8], max_new_tokens=6).token_ids
    drafter = RandomTreeDrafter(ref, 2, target.config.vocab_size, 4, 6, hit=1.0)
    out = SpeculativeGenerator(target, drafter).generate([7, 8], max_new_tokens=6)
    assert out.token_ids == ref


class ChainAsTree(Drafter):
    """Wraps a chain drafter and proposes its chain as a one-branch DraftTree."""

    def __init__(self, inner) -> None:
        self.inner, self.num_draft_tokens, self.capabilities = inner, inner.num_draft_tokens, inner.capabilities

    def prefill(self, prompt_ids, target_out):
        self.inner.prefill(prompt_ids, target_out)

    def propose(self, ctx):
        p = self.inner.propose(ctx)
        K = p.num_tokens
        return DraftProposal(
            p.tokens, p.draft_probs, tree=DraftTree(p.tokens, torch.arange(-1, K - 1), p.draft_probs)
        )

    def on_verified(self, result):
        self.inner.on_verified(result)


def test_engine_chain_as_tree_equals_chain(target, good_draft_path):
    """Same drafts, same random stream: the tree step commits what the chain step commits."""
    draft = load_model(good_draft_path, dtype="float32")
    chain = SpeculativeGenerator(target, DraftModelDrafter(draft, 3))
    as_tree = SpeculativeGenerator(target, ChainAsTree(DraftModelDrafter(draft, 3)))
    for seed in range(6):
        for sampling in (dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=20)):
            a = chain.generate([1, 2, 3], max_new_tokens=20, seed=seed, **sampling)
            b = as_tree.generate([1, 2, 3], max_new_tokens=20, seed=seed, **sampling)
            assert a.token_ids == b.token_ids
            assert a.stats.accepted_tokens == b.stats.accepted_tokens
