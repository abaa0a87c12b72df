"""EAGLE: feature-level autoregressive drafting (Li et al. 2024, Sec. 4).

The target's feature ``f_t`` is its final normed hidden state at token ``t`` (``lm_head(f_t)``
are the logits of token ``t+1``); a head with ``feature_layers`` (EAGLE-3's fusion, Li et al.
2025) reads instead a learned fusion of that state and the outputs of some earlier decoder
layers, which the engine asks the target for (``DrafterCapabilities.feature_layers``). One :class:`~specdec.drafters.heads.EagleHead` entry reads
``(embed(x_{t+1}), f_t)`` at position ``t`` and predicts ``f_{t+1}``; its logits come from the
target's frozen ``lm_head``. Knowing the sampled token ``x_{t+1}`` resolves the uncertainty of
the feature sequence (Sec. 3), which is why EAGLE drafts better than Medusa.

Bookkeeping with ``n`` committed tokens (the last one pending)::

    target features known:  f_0 .. f_{n-2}        (prompt prefill, then each verify pass)
    head cache:             entries t = 0 .. n-2  built from target features only
    propose:                entry n-2 gives f^_{n-1} -> d1; entry n-2+i = (d_i, f^_{n-2+i})
                            gives f^_{n-1+i} -> d_{i+1}  (the head's own features)
    on_verified (j acc.):   the verify pass's features of the pending token and the j
                            accepted drafts become f_{n-1} .. f_{n-1+j}; the head cache is
                            rolled back to its n-1 target-feature entries.

Entries built on the head's own predicted features are discarded after verification (they
differ from the ones built on the target's features), as in the paper.

Tree mode (``tree_width > 1``) grows a dynamic tree depth by depth (EAGLE-2, Li et al. 2024,
Sec. 4): each expanded node gets ``tree_width`` children; at each depth the ``tree_width`` new
nodes with the highest cumulative draft probability are expanded, all in one head pass under
tree attention (expanded node ``j`` writes the head cache slot ``n - 1 + j``, attends to the
target-feature entries and its expanded ancestors).

* Greedy: children are the top-k tokens (distinct); at the end the ``max_tree_nodes`` nodes with
  the highest cumulative probability are kept (a parent never scores below its child, so the
  kept set is a tree).
* Sampling: children are i.i.d. draws from the head's distribution ``q`` after their parent
  (duplicates allowed), as the recursive rejection of :mod:`specdec.verify.tree` requires;
  nothing is pruned after drawing, the budget only caps how many children are drawn, decided
  before drawing them. A duplicate of an earlier sibling is never expanded (if verification
  reaches it, it is rejected).
"""

from __future__ import annotations

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
from specdec.drafters.heads import EagleHead, pick_tokens, resolve_head
from specdec.drafters.vocab import DraftVocab, head_rows, projector, resolve_draft_vocab
from specdec.models import cuda_graphs
from specdec.models.llama import causal_mask
from specdec.models.loading import LoadedModel
from specdec.sampling import logits_to_probs, sample
from specdec.verify.chain import VerifyResult


class EagleDrafter:
    """Propose a chain of ``num_draft_tokens`` with an EAGLE head.

    ``head``: an EagleHead, a head folder, or None for ``<target folder>/eagle/``.
    ``draft_vocab``: tokens the head scores (see :mod:`specdec.drafters.vocab`): a size, a
    :class:`DraftVocab`, 0 for the full vocabulary, None for the default.
    """

    def __init__(
        self,
        target: LoadedModel,
        head: EagleHead | str | Path | None = None,
        num_draft_tokens: int = 4,
        tree_width: int = 1,
        max_tree_nodes: int | None = None,
        draft_vocab: int | DraftVocab | None = None,
    ) -> None:
        self.max_tree_nodes = check_draft_shape(num_draft_tokens, tree_width, max_tree_nodes)
        self.tree_width = tree_width
        self.target = target
        resolved = resolve_head(head, target.path, target.config, "eagle", target.dtype, target.device)
        assert isinstance(resolved, EagleHead)
        self.head: EagleHead = resolved
        self.draft_vocab = resolve_draft_vocab(target, draft_vocab)
        self._project = projector(target, self.draft_vocab)
        module = target.module
        embed = module._kernel_io[0] if module._kernel_io is not None else module.model.embed_tokens.weight
        self._chain_io = (embed, head_rows(target, self.draft_vocab))  # what EagleHead.draft_chain reads
        self.num_draft_tokens = num_draft_tokens
        self.capabilities = DrafterCapabilities(
            needs_hidden=True,
            feature_layers=self.head.feature_layers,
            max_tree_nodes=self.max_tree_nodes,
            draft_vocab=self.draft_vocab,
        )
        capacity = target.max_seq_len + self.max_tree_nodes
        self.cache = self.head.new_cache(1, capacity)
        self.features = torch.zeros(
            capacity, target.config.hidden_size, dtype=target.dtype, device=target.device
        )  # (S, d) target features by position
        self._num_features = 0
        self.graphs = cuda_graphs.GraphTable() if cuda_graphs.enabled(target.device) else None

    def prefill(self, prompt_ids: list[int], target_out: TargetOutput) -> None:
        self.cache.truncate(0)
        self._num_features = 0
        if target_out.hidden is not None:
            self._store(target_out.hidden)

    @torch.no_grad()
    def _store(self, hidden: torch.Tensor) -> None:
        """Keep the head's input features of the target's rows ``hidden`` ``(T, (n + 1) d)``."""
        m = self._num_features
        self.features[m : m + hidden.shape[0]] = self.head.target_features(hidden)  # (T, d)
        self._num_features = m + hidden.shape[0]

    def _step(self, tokens: torch.Tensor, features: torch.Tensor, start: int) -> torch.Tensor:
        """Feed entries ``t = start ..`` (``tokens`` are x_{t+1} ``(T,)``, ``features`` f_t
        ``(T, d)``); the predicted feature of the last entry ``(d,)``. On a GPU a chain pass
        replays a graph recorded for its shape (:mod:`specdec.models.cuda_graphs`)."""
        T = tokens.shape[0]
        pos = torch.arange(start, start + T, device=tokens.device)[None]  # (1, T)
        inputs = (tokens[None], features[None], pos)
        (predicted,) = cuda_graphs.chain_pass(self.graphs, self.cache, start + T, inputs, self._head_pass)
        self.cache.truncate(start + T)
        return predicted[0, -1]

    def _head_pass(
        self, tokens: torch.Tensor, features: torch.Tensor, pos: torch.Tensor, slots: int | None
    ) -> tuple[torch.Tensor]:
        """The head over ``tokens`` ``(1, T)`` (x_{t+1}), ``features`` ``(1, T, d)`` at ``pos``
        ``(1, T)``: ``((1, T, d) predicted features,)``. With ``slots`` it attends over that many
        cache slots under the causal mask of ``pos`` (a fixed shape, for a graph)."""
        embed = self.target.module.model.embed_tokens(tokens)  # (1, T, d)
        mask = None if slots is None else causal_mask(pos, slots)[:, 0]  # (1, T, slots)
        return (self.head(embed, features, pos, self.cache, attn_mask=mask),)

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftProposal:
        n = len(ctx.token_ids)
        device = self.target.device
        if self._num_features < n - 1:
            # A step without on_verified (a wrapper chose K = 0) left tokens without target
            # features: zeros stand in for them (worse drafts for a while, same output).
            self.features[self._num_features : n - 1] = 0
            self._num_features = n - 1
        if self._num_features != n - 1:
            raise RuntimeError(f"EagleDrafter has features for {self._num_features} tokens, expected {n - 1}")
        if n == 1:
            # One-token prompt: propose the pending token once (a deterministic draft) only to
            # have the verify pass compute its feature.
            return DraftProposal(torch.tensor([ctx.token_ids[-1]], device=device))
        K = min(self.num_draft_tokens, ctx.max_draft_tokens)
        start = self.cache.lengths[0]
        next_tokens = torch.tensor(ctx.token_ids[start + 1 : n], device=device)  # (T,) x_{t+1}
        if self.tree_width == 1:  # the first step and the loop below in one call, where the kernels run
            chain = self.head.draft_chain(
                next_tokens, self.features[start : n - 1], start, K, self.cache, *self._chain_io, ctx.sampling,
                ctx.generator, self.target.config.vocab_size,
            )  # fmt: skip
            if chain is not None:
                self.cache.truncate(n - 1)
                return DraftProposal(*chain)  # (K,), (K, V) or None
        feature = self._step(next_tokens, self.features[start : n - 1], start)  # (d,)
        if self.tree_width > 1:
            proposal = self._tree(feature, ctx, K)
            self.cache.truncate(n - 1)
            return proposal
        tokens, probs = [], []
        for i in range(K):
            logits = self._project(feature)[None]  # (1, V)
            token, draft_probs = pick_tokens(logits, ctx.sampling, ctx.generator)
            tokens.append(token[0])
            if draft_probs is not None:
                probs.append(draft_probs[0])
            if i < K - 1:
                feature = self._step(token, feature[None], n - 1 + i)
        self.cache.truncate(n - 1)  # keep only the entries built on target features
        return DraftProposal(
            torch.stack(tokens),  # (K,)
            torch.stack(probs) if probs else None,  # (K, V)
        )

    def _tree(self, root_feature: torch.Tensor, ctx: DraftContext, K: int) -> DraftProposal:
        """Grow a tree of depth <= K below the pending token (see the module docstring)."""
        n, width, budget = len(ctx.token_ids), self.tree_width, self.max_tree_nodes
        greedy = ctx.sampling.greedy
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []  # cumulative draft probability of each node's path
        rows: list[torch.Tensor] = []  # sampling: the distribution each node was drawn from
        fed: list[int] = []  # expanded nodes, in head-cache slot order (slot n - 1 + j)
        ancestors: dict[int, list[int]] = {-1: []}  # expanded node -> its expanded path, itself included
        frontier = [(-1, root_feature)]  # (expanded node, the head's feature after it)
        for depth in range(1, K + 1):
            logits = self._project(torch.stack([f for _, f in frontier]))  # (E, V)
            probs = logits.float().softmax(-1) if greedy else logits_to_probs(logits, ctx.sampling)  # (E, V)
            expandable: list[tuple[int, int]] = []  # (node, frontier entry of its parent)
            for e, (parent, _) in enumerate(frontier):
                base = scores[parent] if parent >= 0 else 1.0
                if greedy:
                    kids = probs[e].topk(width).indices.tolist()
                else:
                    m = min(width, budget - len(tokens))
                    if m <= 0:
                        break
                    kids = sample(probs[e], ctx.generator, num_samples=m).tolist()
                seen: set[int] = set()
                for token in kids:
                    if token not in seen:
                        expandable.append((len(tokens), e))
                    seen.add(token)
                    tokens.append(token)
                    parents.append(parent)
                    scores.append(base * float(probs[e, token]))
                    if not greedy:
                        rows.append(probs[e])
            if depth == K or not expandable:
                break
            expand = sorted(expandable, key=lambda ne: -scores[ne[0]])[:width]
            frontier = self._expand(expand, frontier, tokens, parents, fed, ancestors, n + depth - 2)
        if greedy and len(tokens) > budget:  # keep the best nodes; parents outrank their children
            keep = sorted(sorted(range(len(tokens)), key=lambda i: (-scores[i], i))[:budget])
            index = {old: new for new, old in enumerate(keep)}
            tokens = [tokens[i] for i in keep]
            parents = [index[parents[i]] if parents[i] >= 0 else -1 for i in keep]
        device = self.target.device
        draft_probs = torch.stack(rows) if rows else None  # (N, V)
        token_t = torch.tensor(tokens, device=device)  # (N,)
        tree = DraftTree(token_t, torch.tensor(parents, device=device), draft_probs)
        return DraftProposal(token_t, draft_probs, tree)

    def _expand(
        self,
        expand: list[tuple[int, int]],
        frontier: list[tuple[int, torch.Tensor]],
        tokens: list[int],
        parents: list[int],
        fed: list[int],
        ancestors: dict[int, list[int]],
        position: int,
    ) -> list[tuple[int, torch.Tensor]]:
        """Feed the nodes ``expand`` (``(node, parent's frontier entry)``) to the head in one pass
        at RoPE ``position``; the new frontier ``[(node, feature after it)]``."""
        n_fed, E, device = len(fed), len(expand), self.target.device
        start = self.cache.lengths[0]  # the n - 1 target-feature entries
        for node, _ in expand:  # expanded nodes only have expanded ancestors
            ancestors[node] = ancestors[parents[node]] + [len(fed)]
            fed.append(node)
        mask = torch.zeros(1, E, start + len(fed), dtype=torch.bool, device=device)  # (1, E, S)
        mask[0, :, :start] = True
        for j, (node, _) in enumerate(expand):
            mask[0, j, [start + a for a in ancestors[node]]] = True
        node_tokens = torch.tensor([tokens[node] for node, _ in expand], device=device)  # (E,)
        embed = self.target.module.model.embed_tokens(node_tokens[None])  # (1, E, d)
        features = torch.stack([frontier[e][1] for _, e in expand])[None]  # (1, E, d)
        pos = torch.full((1, E), position, device=device)  # (1, E)
        slots = torch.arange(start + n_fed, start + n_fed + E, device=device)[None]  # (1, E)
        out = self.head(embed, features, pos, self.cache, attn_mask=mask, cache_slots=slots)  # (1, E, d)
        return [(node, out[0, j]) for j, (node, _) in enumerate(expand)]

    def on_verified(self, result: VerifyResult) -> None:
        if result.target_hidden is None:
            raise RuntimeError("EagleDrafter needs an engine that sets VerifyResult.target_hidden")
        self._store(result.target_hidden)  # (num_accepted + 1, d)
