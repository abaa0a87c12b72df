"""Verification of a tree of draft tokens against one target pass: pure functions.

Layout of a verify pass with ``n`` committed tokens, ``P = n - 1`` (the pending token is the
tree's implicit root) and N tree nodes in topological order::

    row / cache slot    token      RoPE position     attends to
    0   / P             pending    P                 slots 0 .. P
    1+i / P+1+i         node i     P + depth(i)      slots 0 .. P, its ancestors' slots, itself

Worked example, ``parents = [-1, -1, 0, 0, 2]`` (two children of the root, node 0 has children
2 and 3, node 2 has child 4): depths ``[1, 1, 2, 2, 3]``, positions ``[P, P+1, P+1, P+2, P+2,
P+3]``; node 4 sees slots ``0..P`` and ``P+1`` (node 0), ``P+3`` (node 2), ``P+5`` (itself).

Greedy verification accepts the longest root-to-node path whose tokens equal the target's
argmax along it. Sampling uses multi-draft recursive rejection sampling (SpecInfer, Miao et al.
2024, Sec. 4.2; SpecTr, Sun et al. 2023): at a node with target distribution ``target_probs``,
its children ``x_1, x_2, ...`` are tried in order; child ``x_k``, drawn from the draft
distribution ``q``, is accepted with probability ``min(1, target_probs(x_k) / q(x_k))``; on
rejection ``target_probs <- norm(max(0, target_probs - q))`` and the next sibling is tried; when
all are rejected the **recovered** token is sampled from the last residual. Each round is one
lossless speculative-sampling step (Leviathan et al. 2023, Thm. 1) on the current residual, so
the output is distributed exactly as the target when the siblings are i.i.d. draws from ``q``
(with replacement: a duplicate of a rejected sibling has residual probability 0 and is always
rejected, which is still a valid round). A deterministic drafter (``draft_probs`` None) has
``q = one-hot(x_k)``: acceptance with probability ``target_probs(x_k)``, then ``x_k`` is removed
from the residual, i.e. sampling without replacement; its siblings should be distinct. A chain is
the one-branch tree and gives exactly :func:`~specdec.verify.chain.verify_rejection`'s result for
the same random stream (one uniform per node, drawn up front).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from specdec.sampling import sample
from specdec.verify.chain import VerifyResult, residual_probs

if TYPE_CHECKING:
    from specdec.drafters.base import DraftTree


def node_depths(parents: list[int]) -> list[int]:
    """Depth of each node (children of the root have depth 1); ``parents`` topologically sorted."""
    depths: list[int] = []
    for i, parent in enumerate(parents):
        if parent >= i:
            raise ValueError(f"tree node {i} has parent {parent}: nodes must follow their parents")
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return depths


def tree_depth(tree: DraftTree) -> int:
    """The number of draft positions of ``tree`` (0 for an empty tree)."""
    return max(node_depths(tree.parents.tolist()), default=0)


def children_of(parents: list[int]) -> list[list[int]]:
    """``children[r]``: node indices below row ``r`` (row 0 = root, row ``1+i`` = node ``i``),
    in index order (the order siblings are tried in)."""
    children: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, parent in enumerate(parents):
        children[parent + 1].append(i)
    return children


def tree_positions(parents: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """RoPE positions ``(N+1,)`` of ``[pending, nodes...]``; the pending token sits at
    ``prefix_len`` (= P, the number of committed slots before it)."""
    depths = node_depths(parents.tolist())
    return torch.tensor([prefix_len, *(prefix_len + d for d in depths)], dtype=torch.long)


def ancestor_matrix(parents: list[int]) -> torch.Tensor:
    """``(N, N)`` bool, ``[i, j]`` True when node ``j`` is node ``i`` or one of its ancestors."""
    N = len(parents)
    anc = torch.eye(N, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            anc[i] |= anc[parent]
    return anc


def tree_attention_mask(parents: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Attention mask ``(N+1, P+1+N)`` bool (True = may attend) of ``[pending, nodes...]``
    written to slots ``P .. P+N``; see the module docstring."""
    plist = parents.tolist()
    N, P = len(plist), prefix_len
    mask = torch.zeros(N + 1, P + 1 + N, dtype=torch.bool)
    mask[:, : P + 1] = True  # committed slots and the root
    mask[1:, P + 1 :] = ancestor_matrix(plist)
    return mask


def truncate_tree(tree: DraftTree, num_nodes: int) -> DraftTree:
    """The first ``num_nodes`` nodes: still a tree (parents come first), same node indices."""
    if num_nodes >= tree.num_nodes:
        return tree
    probs = tree.draft_probs[:num_nodes] if tree.draft_probs is not None else None
    return replace(tree, tokens=tree.tokens[:num_nodes], parents=tree.parents[:num_nodes], draft_probs=probs)


def _result(path: list[int], tokens: list[int], last: int, num_nodes: int, bonus: bool) -> VerifyResult:
    return VerifyResult(
        tokens=[tokens[i] for i in path] + [last],
        num_accepted=len(path),
        num_drafted=num_nodes,
        bonus=bonus,
        accepted_path=tuple(path),
    )


def verify_tree_greedy(tree: DraftTree, target_logits: torch.Tensor) -> VerifyResult:
    """Accept the longest path whose tokens equal the target's argmax along it.

    target_logits: ``(N+1, V)``, row 0 = after the pending token, row ``1+i`` = after node ``i``.
    ``bonus`` is True when the path ends at a leaf (no draft was rejected below it).
    """
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    target_tokens = target_logits.argmax(-1).tolist()  # (N+1,)
    children = children_of(parents)
    best_len = [0] * (len(parents) + 1)
    best_child = [-1] * (len(parents) + 1)
    for row in reversed(range(len(parents) + 1)):  # children have larger rows than parents
        for c in children[row]:
            if tokens[c] == target_tokens[row] and 1 + best_len[c + 1] > best_len[row]:
                best_len[row], best_child[row] = 1 + best_len[c + 1], c
    path, row = [], 0
    while best_child[row] >= 0:
        path.append(best_child[row])
        row = best_child[row] + 1
    return _result(path, tokens, target_tokens[row], len(parents), bonus=not children[row])


def _try_siblings(
    probs: torch.Tensor,  # (V,) the target's distribution at the node
    kids: list[int],
    tokens: list[int],
    draft_probs: torch.Tensor | None,  # (N, V) or None (one-hot drafts)
    u: torch.Tensor,  # (N,) one uniform per node
) -> tuple[int, torch.Tensor]:
    """One node's rounds of recursive rejection, computed on the device for all its children in
    order: the first accepted child (-1: none) and the residual ``(V,)`` after every child was
    rejected. The acceptance tests come back to the host together, one sync per node instead of
    one per child; a round after the accepted child is computed and thrown away."""
    flags = []
    for c in kids:
        x = tokens[c]
        if draft_probs is not None:
            draft_row = draft_probs[c]  # (V,)
            uq = u[c] * draft_row[x]
        else:
            draft_row = torch.zeros_like(probs)
            draft_row[x] = 1.0
            uq = u[c]
        flags.append(uq < probs[x])  # accept with probability min(1, p/q), float32 as the chain
        probs = residual_probs(probs, draft_row)
    accepted = torch.stack(flags).tolist()
    first = next((c for c, ok in zip(kids, accepted, strict=True) if ok), -1)
    return first, probs


def verify_tree_rejection(
    tree: DraftTree,
    target_probs: torch.Tensor,  # (N+1, V), already temperature / top-k / top-p processed
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Lossless multi-draft recursive rejection sampling over the tree (see module docstring)."""
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    N = len(parents)
    children = children_of(parents)
    u = torch.rand(N, generator=generator, device=target_probs.device)  # (N,) one per node
    path: list[int] = []
    row = 0
    while True:
        if not children[row]:
            return _result(path, tokens, int(sample(target_probs[row], generator)), N, bonus=True)
        accepted, residual = _try_siblings(target_probs[row], children[row], tokens, tree.draft_probs, u)
        if accepted < 0:
            return _result(path, tokens, int(sample(residual, generator)), N, bonus=False)
        path.append(accepted)
        row = accepted + 1
