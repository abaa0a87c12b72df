"""Prompt lookup decoding: draft by copying what followed the last n tokens earlier in the text.

Saxena 2023, "Prompt Lookup Decoding" (also the n-gram candidate generator of HF
transformers): no model, near-zero cost. The suffix of the sequence (its last ``n`` tokens, ``n``
from ``max_ngram`` down to ``min_ngram``) is looked up among the earlier n-grams of prompt +
generated text, and the tokens that followed a match are the draft. An :class:`NgramIndex` maps
every n-gram to the positions right after its occurrences and is extended incrementally, so a
step costs O(new tokens), never a rescan.

With ``num_branches > 1`` the continuations of several matches (longest n first, then the most
recent) are merged into a trie and proposed as a tree (siblings are distinct tokens: the drafter
is deterministic, ``draft_probs`` None).

``min_ngram`` defaults to 2: a match on the last token alone is usually a coincidence, and its
rejected draft still costs a wider verify pass. A longer match is more often right, and for
longer (on SmolLM2's replies the first copied token is right after 56 % of 2-token matches and
95 % of 8-token ones), so a match of ``n`` tokens proposes at most ``n - 1`` (``max_ngram`` 8).
Measured greedy, one thread, CPU time against plain decoding (scripts/ngram_sweep.py): on
SmolLM2-135M-Instruct (quantized, the chat tasks) min_ngram 1 gave 0.90x, 2 gave 1.08x, and
matches of up to 8 with drafts scaled by them 1.13x; on the demo pair (code) 1.41x -> 1.45x.
"""

from __future__ import annotations

from collections.abc import Callable

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
from specdec.verify.chain import VerifyResult


class NgramIndex:
    """``n``-gram -> positions that follow its occurrences, for ``min_n <= n <= max_n``.

    Only n-grams that already have a following token are indexed, so a lookup of the text's own
    suffix never finds itself.
    """

    SCAN = 16  # occurrences looked at per lookup and n

    def __init__(self, min_n: int = 1, max_n: int = 3) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_n} and {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._follow: dict[tuple[int, ...], list[int]] = {}

    def reset(self, tokens: list[int]) -> None:
        self.tokens = []
        self._follow = {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        """Index ``tokens``, which must start with the tokens indexed so far."""
        old = len(self.tokens)
        self.tokens.extend(tokens[old:])
        # n-grams ending right before position e, for every e that now has a token.
        for e in range(max(old, 1), len(self.tokens)):
            for n in range(self.min_n, min(self.max_n, e) + 1):
                self._follow.setdefault(tuple(self.tokens[e - n : e]), []).append(e)

    def sync(self, tokens: list[int]) -> None:
        """Index ``tokens``: extend when they continue the indexed text (checked by its last
        token, O(1)), else start over (a new request)."""
        old = self.tokens
        if len(tokens) < len(old) or (old and tokens[len(old) - 1] != old[-1]):
            self.reset(tokens)
        else:
            self.extend(tokens)

    def continuations(
        self,
        query: list[int],
        max_len: int,
        max_count: int,
        min_n: int | None = None,
        length: Callable[[int], int] | None = None,
    ) -> list[list[int]]:
        """Up to ``max_count`` distinct continuations (each <= ``max_len`` tokens, and <=
        ``length(n)`` for a match of ``n`` tokens where given) of ``query``'s suffix: the
        longest matching n first (down to ``min_n``, default the index's); for one n, among its
        ``SCAN`` most recent occurrences, full-length continuations (most recent first) before
        ones cut short by the end of the text (longest first)."""
        found: list[list[int]] = []
        lowest = self.min_n if min_n is None else max(min_n, self.min_n)
        for n in range(min(self.max_n, len(query)), lowest - 1, -1):
            recent = self._follow.get(tuple(query[len(query) - n :]), [])[-self.SCAN :][::-1]
            cap = max_len if length is None else min(max_len, length(n))
            conts = [self.tokens[e : e + cap] for e in recent]
            conts.sort(key=lambda c: -len(c))  # stable: recency breaks ties
            for cont in conts:
                if any(cont == f[: len(cont)] for f in found):
                    continue  # a duplicate or a prefix of a continuation already found
                found.append(cont)
                if len(found) == max_count:
                    return found
        return found


def trie_tree(continuations: list[list[int]], max_nodes: int) -> DraftTree:
    """Merge continuations into a trie (distinct siblings) of at most ``max_nodes`` nodes."""
    tokens: list[int] = []
    parents: list[int] = []
    child: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for cont in continuations:
        parent = -1
        for token in cont:
            node = child.get((parent, token))
            if node is None:
                if len(tokens) == max_nodes:
                    break
                node = child[(parent, token)] = len(tokens)
                tokens.append(token)
                parents.append(parent)
            parent = node
    return DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


def _match_length(n: int) -> int:
    """Tokens proposed after a match of ``n`` tokens: ``n - 1`` (at least 1)."""
    return max(1, n - 1)


class NgramDrafter:
    """Prompt lookup drafter: a chain (``num_branches == 1``) or a trie of continuations.

    ``scale_with_match`` (the default): a match of ``n`` tokens proposes at most ``n - 1`` (and
    at most ``num_draft_tokens``); off, every match proposes ``num_draft_tokens``."""

    def __init__(
        self,
        num_draft_tokens: int = 4,
        max_ngram: int = 8,
        min_ngram: int = 2,
        num_branches: int = 1,
        max_tree_nodes: int | None = None,
        scale_with_match: bool = True,
    ) -> None:
        self.max_tree_nodes = check_draft_shape(num_draft_tokens, num_branches, max_tree_nodes)
        self.num_draft_tokens = num_draft_tokens
        self.num_branches = num_branches
        self.capabilities = DrafterCapabilities(max_tree_nodes=self.max_tree_nodes)
        self.index = NgramIndex(min_ngram, max_ngram)
        self._length = _match_length if scale_with_match else None

    def prefill(self, prompt_ids: list[int], target_out: TargetOutput) -> None:
        self.index.reset(prompt_ids)

    def propose(self, ctx: DraftContext) -> DraftProposal:
        ids = ctx.token_ids
        self.index.sync(ids)
        K = min(self.num_draft_tokens, ctx.max_draft_tokens)
        if K <= 0:
            return empty_proposal()
        found = self.index.continuations(ids, K, self.num_branches, length=self._length)
        if not found:
            return empty_proposal()
        if len(found) == 1:
            return DraftProposal(torch.tensor(found[0], dtype=torch.long))
        tree = trie_tree(found, self.max_tree_nodes)
        return DraftProposal(tree.tokens, tree=tree)

    def on_verified(self, result: VerifyResult) -> None:
        """Nothing to roll back: the index only holds committed tokens."""
