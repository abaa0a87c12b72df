"""A draft model that drafts for every batch row in the same forward passes.

Per-row drafters run K sequential one-token passes *per row*; this runs K passes for the
whole batch (Leviathan et al. 2023's draft model, batched as in Su et al. 2023). It is how the
server runs a drafter built by :func:`~specdec.drafters.registry.make_drafter` whose
capabilities say ``batchable`` (:meth:`BatchDraftModel.from_drafter`): the same drafts as one
such drafter per row, in shared passes. Its KV cache
has one row per batch row, kept with the same invariant as the target's: slots below
``lengths[row]`` hold the row's committed tokens, slots at or above it are scratch that every
pass overwrites, contiguously from ``lengths[row]``, before any real token can attend to them.
Rows that do not draft this step feed dummy tokens at ``lengths[row]`` onwards (scratch).

A new row reads its prompt lazily, at its first proposal, and a row that fell far behind (plain
steps) catches up in a pass of its own before the batched passes.

Bookkeeping for one row with ``n`` committed tokens (the last one pending), K drafts::

    first pass feeds tokens[lengths:n]       -> lengths = n
    pass i (1 .. K-1) feeds d_i at n + i - 1 -> lengths = n + K - 1
    after j accepted drafts                   -> lengths = n + min(j, K - 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.drafters.base import Drafter, DraftProposal, TargetOutput
from specdec.drafters.vocab import DraftVocab, projector
from specdec.models.loading import LoadedModel
from specdec.sampling import SamplingParams, logits_to_probs, sample

CATCH_UP_ALONE = 8  # a row with more unread tokens reads them in a pass of its own


@dataclass(frozen=True)
class DraftRow:
    """One row's request for drafts: its committed ``tokens`` and at most ``max_tokens``."""

    row: int
    tokens: list[int]
    sampling: SamplingParams
    generator: torch.Generator
    max_tokens: int


class BatchDraftModel:
    """Drafts of ``model`` for many batch rows at once; one KV cache row per batch row."""

    def __init__(self, model: LoadedModel, num_draft_tokens: int = 4, draft_vocab: DraftVocab | None = None) -> None:
        if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens}")
        self.model = model
        self.draft_vocab = draft_vocab  # score drafts over these tokens only (specdec.drafters.vocab)
        self._project = projector(model, draft_vocab)
        self.num_draft_tokens = num_draft_tokens
        self.cache = model.new_cache(1, 1)
        self._fed: dict[int, int] = {}  # row -> K of its last proposal

    @classmethod
    def from_drafter(cls, drafter: Drafter) -> BatchDraftModel:
        """The batched form of ``drafter``, which must declare ``batchable`` (a plain chain of its
        ``draft_model``): same model, K and draft vocabulary."""
        caps = drafter.capabilities
        if not caps.batchable or caps.draft_model is None:
            raise ValueError(f"{type(drafter).__name__} does not declare batched drafting")
        return cls(caps.draft_model, drafter.num_draft_tokens, caps.draft_vocab)

    def allocate(self, batch_size: int, capacity: int) -> None:
        self.cache = self.model.new_cache(batch_size, capacity)

    def prefill(self, row: int, prompt_ids: list[int], target_out: TargetOutput) -> None:
        """A new request in ``row``. Nothing runs yet: the row reads its prompt at its first
        proposal (:meth:`_catch_up`), so a server that is not speculating (K = 0 under load)
        never pays the draft model's prefill."""
        self.cache.lengths[row] = 0
        self._fed.pop(row, None)

    def _catch_up(self, row: int, tokens: list[int]) -> None:
        """Feed ``row`` the ``tokens`` its cache has not read, in a pass of its own."""
        from specdec.serving.batch_engine import rows_view

        start = self.cache.lengths[row]
        if len(tokens) > start:
            feed = torch.tensor([tokens[start:]], device=self.model.device)  # (1, T)
            pos = torch.arange(start, len(tokens), device=self.model.device)
            view = rows_view(self.cache, slice(row, row + 1))
            self.model(feed, pos, view, num_logits=0, kv_len=len(tokens))
        self.cache.lengths[row] = len(tokens)

    def propose(self, rows: list[DraftRow]) -> dict[int, DraftProposal]:
        """Drafts for each row with ``max_tokens > 0`` (K = the largest ``max_tokens``)."""
        from specdec.serving.batch_engine import rows_view

        rows = [r for r in rows if r.max_tokens > 0]
        if not rows:
            return {}
        device = self.model.device
        K = max(r.max_tokens for r in rows)
        hi = max(r.row for r in rows) + 1
        lengths = self.cache.lengths
        for r in rows:  # a row far behind (a new request, or plain steps) catches up alone first:
            if len(r.tokens) - lengths[r.row] > CATCH_UP_ALONE:  # padding every row to its feed
                self._catch_up(r.row, r.tokens[:-1])  # would cost B' x its length
        feeds = {r.row: r.tokens[lengths[r.row] :] for r in rows}  # (pending and any unseen tokens)
        U = max(len(f) for f in feeds.values())
        last_slot = self.cache.max_seq_len - 1
        # Non-drafting rows write scratch slots at/after their length; padding goes after feeds.
        pos = [[min(lengths[b] + u, last_slot) for u in range(U)] for b in range(hi)]
        token_rows = [[0] * U for _ in range(hi)]
        for r in rows:
            token_rows[r.row][: len(feeds[r.row])] = feeds[r.row]
        view = rows_view(self.cache, slice(0, hi))
        _, hidden = self.model(
            torch.tensor(token_rows, device=device),  # (B', U)
            torch.tensor(pos, device=device),  # (B', U)
            view,
            num_logits=0,
            return_hidden=True,
            kv_len=max(p[-1] for p in pos) + 1,
        )  # (B', U, d)
        index = torch.tensor([r.row for r in rows], device=device)
        ends = torch.tensor([len(feeds[r.row]) - 1 for r in rows], device=device)
        # The vocabulary projection only where drafting starts: after a run of plain steps a row
        # catches up on many tokens, and projecting all of them would cost U x V per row.
        last = self._project(hidden[index, ends])  # (R, V)
        for r in rows:
            lengths[r.row] = len(r.tokens)
        drafts: list[list[torch.Tensor]] = [[] for _ in rows]
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        for i in range(K):
            step = torch.zeros(hi, 1, dtype=torch.long, device=device)  # (B', 1)
            for j, r in enumerate(rows):
                if r.sampling.greedy:
                    token = last[j].argmax(-1)
                else:
                    draft_probs = logits_to_probs(last[j], r.sampling)  # (V,)
                    token = sample(draft_probs, r.generator)
                    probs[j].append(draft_probs)
                drafts[j].append(token)
                step[r.row, 0] = token
            if i == K - 1:
                break
            step_pos = [lengths[b] for b in range(hi)]
            for r in rows:
                step_pos[r.row] = len(r.tokens) + i
            positions = torch.tensor(step_pos, device=device)[:, None]  # (B', 1)
            _, hidden = self.model(step, positions, view, num_logits=0, return_hidden=True, kv_len=max(step_pos) + 1)
            last = self._project(hidden[index, 0])  # (R, V)
        for r in rows:
            lengths[r.row] = len(r.tokens) + K - 1
            self._fed[r.row] = K
        return {
            r.row: DraftProposal(
                torch.stack(drafts[j][: r.max_tokens]),  # (k,)
                torch.stack(probs[j][: r.max_tokens]) if probs[j] else None,  # (k, V)
            )
            for j, r in enumerate(rows)
        }

    def on_verified(self, row: int, num_committed_before: int, num_accepted: int) -> None:
        """Keep the row's cache up to its accepted drafts (the rest is scratch again)."""
        K = self._fed.pop(row, 0)
        if K:
            self.cache.lengths[row] = num_committed_before + min(num_accepted, K - 1)
