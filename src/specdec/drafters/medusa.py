"""Medusa: extra decoding heads on the target's last hidden state (Cai et al. 2024).

With ``n`` committed tokens the last one is pending (drawn from the target's ``lm_head`` at the
hidden state ``h`` of token ``n-2``). Head ``k`` (0-based) reads the same ``h`` and predicts
token ``n + k``, i.e. draft ``d_{k+1}`` (Medusa, Sec. 2.1.1: the original head predicts t+1,
head k predicts t+k+1). All K drafts come from one small computation on ``h`` and none of them
sees the drafts before it; the verify pass supplies the next ``h`` (the engine hands the
accepted rows' hidden states to :meth:`on_verified`, see ``needs_hidden``).

Chain mode (``tree_width == 1``) proposes each head's argmax (greedy) or one sample from each
head's distribution (sampling: ``draft_probs[k]`` is head k's distribution, which ignores the
earlier drafts; that is a valid conditional for rejection sampling, so the output stays the
target's).

Tree mode (``tree_width > 1``, Medusa Sec. 2.1.2): node ``(r_1, .., r_d)`` at depth ``d`` is the
rank-``r_d`` candidate of head ``d-1`` below node ``(r_1, .., r_{d-1})``, ranks ``< tree_width``;
the Cartesian product is pruned to ``max_tree_nodes`` nodes, best first by a score that never
grows from parent to child (so the kept set is a tree, listed parents first):

* greedy: rank r = head's r-th most likely token, score = product of the heads' probabilities
  along the path (an estimate of the path's acceptance);
* sampling: every node is a fresh independent draw from its head's distribution (siblings are
  i.i.d., as the recursive rejection of :mod:`specdec.verify.tree` requires), and the tree's
  shape is fixed before drawing (score = product of ``1 / (1 + r)``), so no draw is pruned
  because of its value.
"""

from __future__ import annotations

import heapq
from pathlib import Path

import torch

from specdec.drafters.base import (
    DraftContext,
    DrafterCapabilities,
    DraftProposal,
    DraftTree,
    TargetOutput,
    check_draft_shape,
)
from specdec.drafters.heads import MedusaHeads, pick_tokens, resolve_head
from specdec.drafters.vocab import DraftVocab, projector, resolve_draft_vocab
from specdec.models.loading import LoadedModel
from specdec.sampling import logits_to_probs, sample
from specdec.verify.chain import VerifyResult


class MedusaDrafter:
    """Propose ``num_draft_tokens`` (<= the number of heads) tokens from Medusa heads.

    ``heads``: a MedusaHeads, a head folder, or None for ``<target folder>/medusa/``.
    ``draft_vocab``: tokens the head scores (see :mod:`specdec.drafters.vocab`): a size, a
    :class:`DraftVocab`, 0 for the full vocabulary, None for the default.
    """

    def __init__(
        self,
        target: LoadedModel,
        heads: MedusaHeads | str | Path | None = None,
        num_draft_tokens: int | None = None,
        tree_width: int = 1,
        max_tree_nodes: int | None = None,
        draft_vocab: int | DraftVocab | None = None,
    ) -> None:
        self.target = target
        resolved = resolve_head(heads, target.path, target.config, "medusa", target.dtype, target.device)
        assert isinstance(resolved, MedusaHeads)
        self.heads: MedusaHeads = resolved
        self.draft_vocab = resolve_draft_vocab(target, draft_vocab)
        self._project = projector(target, self.draft_vocab)
        K = num_draft_tokens if num_draft_tokens is not None else self.heads.num_heads
        if not isinstance(K, int) or not 1 <= K <= self.heads.num_heads:
            raise ValueError(
                f"num_draft_tokens must be in [1, {self.heads.num_heads}] (one per head), got {K}"
            )
        self.num_draft_tokens = K
        self.max_tree_nodes = check_draft_shape(K, tree_width, max_tree_nodes)
        self.tree_width = tree_width
        self.capabilities = DrafterCapabilities(
            needs_hidden=True, max_tree_nodes=self.max_tree_nodes, draft_vocab=self.draft_vocab
        )
        self._hidden: torch.Tensor | None = None  # (d,) target hidden state at position _hidden_pos
        self._hidden_pos = -1
        self._n = 0  # committed length at the last propose

    def prefill(self, prompt_ids: list[int], target_out: TargetOutput) -> None:
        self._hidden = target_out.hidden[-1] if target_out.hidden is not None else None
        self._hidden_pos = len(prompt_ids) - 2

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftProposal:
        K = min(self.num_draft_tokens, ctx.max_draft_tokens)
        self._n = n = len(ctx.token_ids)
        if self._hidden is None or self._hidden_pos != n - 2:
            # No hidden state of token n-2: a one-token prompt, or a step without on_verified
            # (a wrapper chose K = 0). Propose the pending token once (a deterministic draft)
            # only to have the verify pass compute the hidden states.
            return DraftProposal(torch.tensor([ctx.token_ids[-1]], device=self.target.device))
        features = self.heads(self._hidden)[:K]  # (K, d)
        logits = self._project(features)  # (K, V)
        if self.tree_width == 1:
            tokens, draft_probs = pick_tokens(logits, ctx.sampling, ctx.generator)
            return DraftProposal(tokens, draft_probs)
        return self._tree(logits, ctx)

    def _tree(self, logits: torch.Tensor, ctx: DraftContext) -> DraftProposal:
        """A pruned Cartesian-product tree from the heads' logits ``(K, V)``."""
        K, width = logits.shape[0], self.tree_width
        if ctx.sampling.greedy:
            top = logits.float().softmax(-1).topk(width, dim=-1)  # values / indices (K, width)
            ranks, parents = best_first_tree(top.values.tolist(), self.max_tree_nodes)
            tokens = torch.stack([top.indices[len(r) - 1, r[-1]] for r in ranks])  # (N,)
            tree = DraftTree(tokens, torch.tensor(parents, device=tokens.device))
            return DraftProposal(tokens, None, tree)
        prior = [[1.0 / (1 + r) for r in range(width)]] * K
        ranks, parents = best_first_tree(prior, self.max_tree_nodes)
        head_probs = logits_to_probs(logits, ctx.sampling)  # (K, V)
        depth = torch.tensor([len(r) - 1 for r in ranks], device=logits.device)  # (N,)
        draft_probs = head_probs[depth]  # (N, V): node i is drawn from its head's distribution
        tokens = sample(draft_probs, ctx.generator)  # (N,) independent draws
        tree = DraftTree(tokens, torch.tensor(parents, device=tokens.device), draft_probs)
        return DraftProposal(tokens, draft_probs, tree)

    def on_verified(self, result: VerifyResult) -> None:
        if result.target_hidden is None:
            raise RuntimeError("MedusaDrafter needs an engine that sets VerifyResult.target_hidden")
        self._hidden = result.target_hidden[-1]  # the last accepted row predicted the new pending
        self._hidden_pos = self._n - 1 + result.num_accepted


def best_first_tree(scores: list[list[float]], budget: int) -> tuple[list[tuple[int, ...]], list[int]]:
    """The ``budget`` best nodes of the rank lattice, parents first.

    ``scores[d][r]``: the factor of rank ``r`` at depth ``d + 1`` (non-increasing in ``r``, at
    most 1); a node's score is the product along its path, so a child never beats its parent.
    Returns each node's rank tuple and its parent's index (-1 below the pending token).
    """
    depth, width = len(scores), len(scores[0])
    # heap entries: (-score, rank tuple, parent's score)
    heap: list[tuple[float, tuple[int, ...], float]] = [(-scores[0][0], (0,), 1.0)]
    ranks: list[tuple[int, ...]] = []
    index: dict[tuple[int, ...], int] = {}
    while heap and len(ranks) < budget:
        neg, node, parent_score = heapq.heappop(heap)
        index[node] = len(ranks)
        ranks.append(node)
        d, r = len(node), node[-1]
        if r + 1 < width:  # the next sibling
            heapq.heappush(heap, (-parent_score * scores[d - 1][r + 1], (*node[:-1], r + 1), parent_score))
        if d < depth:  # the first child
            heapq.heappush(heap, (neg * scores[d][0], (*node, 0), -neg))
    parents = [index[r[:-1]] if len(r) > 1 else -1 for r in ranks]
    return ranks, parents
