"""A separate small draft model proposes a chain (Leviathan et al. 2023; Chen et al. 2023) or a
dynamic tree (EAGLE-2, Li et al. 2024, Sec. 4).

The drafter keeps its own KV cache. Chain bookkeeping, with ``n`` committed tokens (the last one
pending) when ``propose`` is called and K drafts proposed::

    fed to the draft:   token_ids[cache_len:n], d1, ..., d_{K-1}   -> cache holds n + K - 1
    after j accepted:   cache keeps n + min(j, K-1) slots; the rest is rolled back

so the next ``propose`` feeds only the one or two tokens it has not seen.

Tree mode (``tree_width > 1``) grows the tree depth by depth, one draft forward per depth for
all expanded nodes, under tree attention over the draft's own cache (expanded node ``j`` is
written to slot ``n + j``). Each expanded node gets ``tree_width`` children; at each depth the
``tree_width`` nodes with the highest cumulative draft probability are expanded.

* Greedy: children are the draft's top-k tokens (distinct); at the end the ``max_tree_nodes``
  nodes with the highest cumulative probability are kept (EAGLE-2's reranking; a parent always
  scores at least as high as its child, so the kept set is a tree).
* Sampling: children are i.i.d. draws from the draft distribution ``q`` (duplicates allowed),
  as the lossless recursive rejection of :mod:`specdec.verify.tree` requires. Nothing is
  pruned after sampling (dropping a sibling because of its value would bias the siblings);
  instead the budget is split before drawing: ``max_tree_nodes // K`` draws per depth, given
  ``tree_width`` at a time to the expanded nodes. Verification tries siblings in order, so the
  first draw is the likeliest to be accepted: nodes are expanded by sibling rank first (then by
  cumulative probability), and the first draws form the same chain a chain drafter samples,
  with the other draws as extra chances. A duplicate of an earlier sibling is never expanded:
  if verification reaches it, it is rejected. Expansion only looks at tokens already drawn,
  never at the children it then draws, so the siblings stay i.i.d.

After verification the accepted path's expanded nodes are compacted into the draft cache, which
then holds ``n + m`` slots (``m`` = accepted nodes that were fed).

``draft_vocab`` (:mod:`specdec.drafters.vocab`): the draft scores only the most frequent tokens
with its ``lm_head`` (73 % of the demo draft's weights); the output is unchanged, since the
target verifies over the whole vocabulary and a sampled draft carries its exact distribution.
"""

from __future__ import annotations

import math

import torch

from specdec.drafters.base import (
    DraftContext,
    DrafterCapabilities,
    DraftProposal,
    DraftTree,
    TargetOutput,
    check_draft_shape,
    empty_proposal,
)
from specdec.drafters.vocab import DraftVocab, draft_pass
from specdec.models.loading import LoadedModel
from specdec.sampling import logits_to_probs, sample
from specdec.verify.chain import VerifyResult


class DraftModelDrafter:
    def __init__(
        self,
        model: LoadedModel,
        num_draft_tokens: int = 4,
        tree_width: int = 1,
        max_tree_nodes: int | None = None,
        draft_vocab: DraftVocab | None = None,
    ) -> None:
        self.max_tree_nodes = check_draft_shape(num_draft_tokens, tree_width, max_tree_nodes)
        self.model = model
        self.draft_vocab = draft_vocab
        self.num_draft_tokens = num_draft_tokens
        self.tree_width = tree_width
        self.capabilities = DrafterCapabilities(
            max_tree_nodes=self.max_tree_nodes,
            draft_model=model,
            draft_vocab=draft_vocab,
            batchable=tree_width == 1,
        )
        self.cache = model.new_cache(1)
        self._n = 0  # committed length at the last propose
        self._proposed = 0
        self._fed_slot: list[int] = []  # per proposed tree node: its draft-cache offset from n, or -1

    def prefill(self, prompt_ids: list[int], target_out: TargetOutput) -> None:
        self.cache.truncate(0)
        if len(prompt_ids) > 1:
            self._forward(prompt_ids[:-1], 0, logits=False)

    def _forward(self, token_ids: list[int] | torch.Tensor, start: int, logits: bool = True):  # type: ignore[no-untyped-def]
        """Feed ``token_ids`` at positions ``start..``; the last token's logits ``(V,)`` (None
        without ``logits``)."""
        tokens = torch.as_tensor(token_ids, device=self.model.device).reshape(1, -1)  # (1, T)
        end = start + tokens.shape[1]
        pos = torch.arange(start, end, device=tokens.device)
        out = draft_pass(self.model, self.draft_vocab, tokens, pos, self.cache, int(logits), kv_len=end)  # (0/1, V)
        self.cache.truncate(end)  # (no device sync above)
        return out[-1] if logits else None  # (V,)

    def propose(self, ctx: DraftContext) -> DraftProposal:
        n = len(ctx.token_ids)
        room = self.cache.max_seq_len - n + 1
        K = min(self.num_draft_tokens, ctx.max_draft_tokens, room)
        self._n, self._proposed = n, max(K, 0)
        if K <= 0:
            return empty_proposal(self.model.device)
        start = self.cache.lengths[0]
        if self.tree_width == 1:  # the loop below in one call, where the kernels run
            feed = torch.as_tensor(ctx.token_ids[start:], device=self.model.device).reshape(1, -1)  # (1, T)
            vocab = self.draft_vocab.kernel_rows if self.draft_vocab is not None else None
            chain = self.model.module.draft_chain(feed, start, K, self.cache, ctx.sampling, ctx.generator, vocab)
            if chain is not None:
                return DraftProposal(*chain)  # (K,), (K, V) or None
        logits = self._forward(ctx.token_ids[start:], start)
        if self.tree_width > 1:
            return self._propose_tree(ctx, K, logits)
        tokens, probs = [], []
        for i in range(K):
            if ctx.sampling.greedy:
                token = logits.argmax(-1)
            else:
                draft_probs = logits_to_probs(logits, ctx.sampling)  # (V,)
                token = sample(draft_probs, ctx.generator)
                probs.append(draft_probs)
            tokens.append(token)
            if i < K - 1:
                logits = self._forward(token, n + i)
        return DraftProposal(
            torch.stack(tokens),  # (K,)
            torch.stack(probs) if probs else None,  # (K, V)
        )

    def _children(self, logits: torch.Tensor, ctx: DraftContext, count: int):  # type: ignore[no-untyped-def]
        """``count`` child tokens below a node with draft ``logits`` ``(V,)``, their log
        probabilities and the distribution they were drawn from (None when greedy)."""
        log_probs = logits.float().log_softmax(-1)  # (V,) ranking scores
        if ctx.sampling.greedy:
            tokens = log_probs.topk(min(count, log_probs.shape[-1])).indices  # (count,) distinct
            return tokens.tolist(), log_probs[tokens].tolist(), None
        draft_probs = logits_to_probs(logits, ctx.sampling)  # (V,)
        tokens = sample(draft_probs, ctx.generator, num_samples=count)
        return tokens.tolist(), draft_probs[tokens].log().tolist(), draft_probs

    def _propose_tree(self, ctx: DraftContext, K: int, root_logits: torch.Tensor) -> DraftProposal:
        n, width, greedy = self._n, self.tree_width, ctx.sampling.greedy
        per_depth = math.inf if greedy else max(1, self.max_tree_nodes // K)  # sampling: draws
        num_expand = width if greedy else min(width, math.ceil(per_depth / width))
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []  # cumulative draft log probability
        rank: list[int] = []  # number of distinct earlier siblings
        rows: list[torch.Tensor | None] = []  # distribution each node was drawn from
        fed_slot: list[int] = []  # offset of the node's draft-cache slot from n, or -1
        ancestors: dict[int, list[int]] = {-1: []}  # fed node -> slots offsets of its path
        frontier: list[tuple[int, torch.Tensor]] = [(-1, root_logits)]
        for depth in range(1, K + 1):
            new_nodes: list[int] = []
            for parent, logits in frontier:
                count = int(min(width, per_depth - len(new_nodes)))
                if count <= 0:
                    break
                kids, log_probs, row = self._children(logits, ctx, count)
                base = scores[parent] if parent >= 0 else 0.0
                seen: set[int] = set()
                for token, lp in zip(kids, log_probs, strict=True):
                    new_nodes.append(len(tokens))
                    fed_slot.append(-1 if token not in seen else -2)  # -2: a duplicate sibling
                    rank.append(len(seen))
                    seen.add(token)
                    tokens.append(token)
                    parents.append(parent)
                    scores.append(base + lp)
                    rows.append(row)
            if depth == K:
                break
            free = self.cache.max_seq_len - n - sum(s >= 0 for s in fed_slot)
            expandable = [i for i in new_nodes if fed_slot[i] == -1]
            priority = (lambda i: -scores[i]) if greedy else (lambda i: (rank[i], -scores[i]))
            expand = sorted(expandable, key=priority)[: min(num_expand, free)]
            if not expand:
                break
            logits_rows = self._feed(expand, tokens, parents, fed_slot, ancestors, n + depth - 1)  # (F, V)
            frontier = list(zip(expand, logits_rows, strict=True))
        fed_slot = [max(s, -1) for s in fed_slot]
        keep = list(range(len(tokens)))
        if greedy and len(keep) > self.max_tree_nodes:  # EAGLE-2 reranking; ties keep parents first
            depth_of = [0] * len(tokens)
            for i, p in enumerate(parents):
                depth_of[i] = 1 + (depth_of[p] if p >= 0 else 0)
            keep = sorted(sorted(keep, key=lambda i: (-scores[i], depth_of[i], i))[: self.max_tree_nodes])
        remap = {old: new for new, old in enumerate(keep)}
        self._fed_slot = [fed_slot[i] for i in keep]
        tree = DraftTree(
            torch.tensor([tokens[i] for i in keep], dtype=torch.long),
            torch.tensor([remap[parents[i]] if parents[i] >= 0 else -1 for i in keep], dtype=torch.long),
            None if greedy else torch.stack([rows[i] for i in keep]),  # type: ignore[misc]
        )
        return DraftProposal(tree.tokens, tree.draft_probs, tree=tree)

    def _feed(
        self,
        nodes: list[int],
        tokens: list[int],
        parents: list[int],
        fed_slot: list[int],
        ancestors: dict[int, list[int]],
        position: int,
    ) -> torch.Tensor:
        """One draft forward over ``nodes`` (all at RoPE ``position``) with tree attention;
        records their cache slots and returns their logits ``(F, V)``."""
        n, device = self._n, self.model.device
        first = sum(s >= 0 for s in fed_slot)
        for j, node in enumerate(nodes):
            fed_slot[node] = first + j
            ancestors[node] = [*ancestors[parents[node]], first + j]
        S = n + first + len(nodes)
        mask = torch.zeros(1, len(nodes), S, dtype=torch.bool, device=device)  # (1, F, S)
        mask[0, :, :n] = True  # the committed tokens, pending included
        for j, node in enumerate(nodes):
            mask[0, j, [n + s for s in ancestors[node]]] = True
        inp = torch.tensor([[tokens[i] for i in nodes]], device=device)  # (1, F)
        pos = torch.full_like(inp, position)
        slots = torch.arange(n + first, S, device=device)[None]  # (1, F)
        return draft_pass(  # (F, V)
            self.model, self.draft_vocab, inp, pos, self.cache, len(nodes), attn_mask=mask, cache_slots=slots
        )

    def on_verified(self, result: VerifyResult) -> None:
        if not self._proposed:
            return
        if self.tree_width == 1:
            self.cache.truncate(self._n + min(result.num_accepted, self._proposed - 1))
            return
        keep: list[int] = []
        for node in result.accepted_path:  # the fed nodes of a path form its prefix
            if self._fed_slot[node] < 0:
                break
            keep.append(self._fed_slot[node])
        self.cache.compact(self._n, keep)
