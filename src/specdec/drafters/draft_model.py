"""A separate small draft model proposes a chain (Leviathan et al. 2023; Chen et al. 2023).

The drafter keeps its own KV cache. Bookkeeping, with ``n`` committed tokens (the last one
pending) when ``propose`` is called and K drafts proposed::

    fed to the draft:   token_ids[cache_len:n], d1, ..., d_{K-1}   -> cache holds n + K - 1
    after j accepted:   cache keeps n + min(j, K-1) slots; the rest is rolled back

so the next ``propose`` feeds only the one or two tokens it has not seen.
"""

from __future__ import annotations

import torch

from specdec.drafters.base import DraftContext, DraftProposal, TargetOutput, empty_proposal
from specdec.models.loading import LoadedModel
from specdec.sampling import logits_to_probs, sample
from specdec.verify.chain import VerifyResult


class DraftModelDrafter:
    def __init__(self, model: LoadedModel, num_draft_tokens: int = 4) -> None:
        if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens}")
        self.model = model
        self.num_draft_tokens = num_draft_tokens
        self.cache = model.new_cache(1)
        self._n = 0  # committed length at the last propose
        self._proposed = 0

    def prefill(self, prompt_ids: list[int], target_out: TargetOutput) -> None:
        self.cache.truncate(0)
        if len(prompt_ids) > 1:
            self._forward(prompt_ids[:-1], 0, num_logits=1)

    def _forward(self, token_ids: list[int] | torch.Tensor, start: int, num_logits: int = 1):  # type: ignore[no-untyped-def]
        tokens = torch.as_tensor(token_ids, device=self.model.device).reshape(1, -1)  # (1, T)
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        logits = self.model(tokens, pos, self.cache, num_logits=num_logits)
        self.cache.truncate(start + tokens.shape[1])
        return logits[0, -1]  # (V,)

    def propose(self, ctx: DraftContext) -> DraftProposal:
        n = len(ctx.token_ids)
        room = self.cache.max_seq_len - n + 1
        K = min(self.num_draft_tokens, ctx.max_draft_tokens, room)
        self._n, self._proposed = n, max(K, 0)
        if K <= 0:
            return empty_proposal(self.model.device)
        start = self.cache.lengths[0]
        logits = self._forward(ctx.token_ids[start:], start)
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

    def on_verified(self, result: VerifyResult) -> None:
        if self._proposed:
            self.cache.truncate(self._n + min(result.num_accepted, self._proposed - 1))
