"""EAGLE: feature-level autoregressive drafting (Li et al. 2024, Sec. 4).

The target's feature ``f_t`` is its final normed hidden state at token ``t`` (``lm_head(f_t)``
are the logits of token ``t+1``). One :class:`~specdec.drafters.heads.EagleHead` entry reads
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
"""

from __future__ import annotations

from pathlib import Path

import torch

from specdec.drafters.base import DraftContext, DraftProposal, TargetOutput
from specdec.drafters.heads import EagleHead, pick_tokens, resolve_head
from specdec.models.loading import LoadedModel
from specdec.verify.chain import VerifyResult


class EagleDrafter:
    """Propose a chain of ``num_draft_tokens`` with an EAGLE head.

    ``head``: an EagleHead, a head folder, or None for ``<target folder>/eagle/``.
    """

    needs_hidden = True  # the engine passes the verify pass's hidden states to on_verified

    def __init__(
        self, target: LoadedModel, head: EagleHead | str | Path | None = None, num_draft_tokens: int = 4
    ) -> None:
        if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens}")
        self.target = target
        self.head = resolve_head(head, target.path, target.config, "eagle", target.dtype, target.device)
        assert isinstance(self.head, EagleHead)
        self.num_draft_tokens = num_draft_tokens
        capacity = target.max_seq_len + num_draft_tokens
        self.cache = self.head.new_cache(1, capacity)
        self.features = torch.zeros(
            capacity, target.config.hidden_size, dtype=target.dtype, device=target.device
        )  # (S, d) target features by position
        self._num_features = 0

    def prefill(self, prompt_ids: list[int], target_out: TargetOutput) -> None:
        self.cache.truncate(0)
        self._num_features = 0
        if target_out.hidden is not None:
            self._store(target_out.hidden)

    def _store(self, hidden: torch.Tensor) -> None:
        m = self._num_features
        self.features[m : m + hidden.shape[0]] = hidden  # (T, d)
        self._num_features = m + hidden.shape[0]

    def _step(self, tokens: torch.Tensor, features: torch.Tensor, start: int) -> torch.Tensor:
        """Feed entries ``t = start ..`` (``tokens`` are x_{t+1} ``(T,)``, ``features`` f_t
        ``(T, d)``); the predicted feature of the last entry ``(d,)``."""
        embed = self.target.module.model.embed_tokens(tokens[None])  # (1, T, d)
        pos = torch.arange(start, start + tokens.shape[0], device=tokens.device)[None]  # (1, T)
        predicted = self.head(embed, features[None], pos, self.cache)  # (1, T, d)
        self.cache.truncate(start + tokens.shape[0])
        return predicted[0, -1]  # type: ignore[no-any-return]

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftProposal:
        n = len(ctx.token_ids)
        device = self.target.device
        if self._num_features == 0:
            # One-token prompt: propose the pending token once (a deterministic draft) only to
            # have the verify pass compute its feature.
            return DraftProposal(torch.tensor([ctx.token_ids[-1]], device=device))
        if self._num_features != n - 1:
            raise RuntimeError(f"EagleDrafter has features for {self._num_features} tokens, expected {n - 1}")
        K = min(self.num_draft_tokens, ctx.max_draft_tokens)
        start = self.cache.lengths[0]
        next_tokens = torch.tensor(ctx.token_ids[start + 1 : n], device=device)  # (T,) x_{t+1}
        feature = self._step(next_tokens, self.features[start : n - 1], start)  # (d,)
        tokens, probs = [], []
        for i in range(K):
            logits = self.target.module.lm_head(feature)[None]  # (1, V)
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

    def on_verified(self, result: VerifyResult) -> None:
        if result.target_hidden is None:
            raise RuntimeError("EagleDrafter needs an engine that sets VerifyResult.target_hidden")
        self._store(result.target_hidden)  # (num_accepted + 1, d)
