"""Self-speculative drafting: the target's first L layers plus a trained exit head.

Zhang et al. 2023 (Draft & Verify: skip layers of the target to draft) and Elhoushi et al.
2024 (LayerSkip, Sec. 4: draft with the first E layers and an early-exit head, verify with
the full model). No second model is loaded: the drafter runs ``embed -> layers[0:L] ->
ExitHead -> lm_head`` of the target's own weights.

What is reused and what is not:

* The drafter keeps its own KV cache of layers ``0..L-1`` and, like a draft model, keeps the
  entries of accepted draft tokens after verification. These entries are exactly what the
  target computes in those layers for the same tokens and positions (same weights, same
  inputs; up to floating-point shape effects), so nothing is recomputed for them.
* Not reused: the verify pass recomputes layers ``0..L-1`` for all K+1 tokens (LayerSkip's
  "cache reuse" would feed the draft's layer-L states into the verify pass, which needs an
  engine that can start the target at layer L), and the drafter reads the prompt through
  its L layers itself instead of copying them from the target's cache (the engine does not
  share the target's cache with drafters). Both cost at most L/N of a target pass.

Cache bookkeeping is the draft model's (see :mod:`specdec.drafters.draft_model`): with ``n``
committed tokens and K drafts, the cache holds ``n + K - 1`` slots after ``propose`` and keeps
``n + min(j, K-1)`` of them after ``j`` drafts are accepted.
"""

from __future__ import annotations

from pathlib import Path

import torch

from specdec.drafters.base import DraftContext, DraftProposal, TargetOutput, check_draft_shape, empty_proposal
from specdec.drafters.heads import ExitHead, pick_tokens, resolve_head
from specdec.drafters.vocab import DraftVocab, projector, resolve_draft_vocab
from specdec.models.loading import LoadedModel
from specdec.verify.chain import VerifyResult


class EarlyExitDrafter:
    """Draft with the target's first ``head.exit_layer`` layers and an :class:`ExitHead`.

    ``head``: an ExitHead, a head folder, or None for ``<target folder>/early-exit/``.
    ``draft_vocab``: tokens the head scores (see :mod:`specdec.drafters.vocab`): a size, a
    :class:`DraftVocab`, 0 for the full vocabulary, None for the default.
    """

    def __init__(
        self,
        target: LoadedModel,
        head: ExitHead | str | Path | None = None,
        num_draft_tokens: int = 4,
        draft_vocab: int | DraftVocab | None = None,
    ) -> None:
        check_draft_shape(num_draft_tokens)
        self.target = target
        self.head = resolve_head(head, target.path, target.config, "early-exit", target.dtype, target.device)
        assert isinstance(self.head, ExitHead)
        self.draft_vocab = resolve_draft_vocab(target, draft_vocab)
        self._project = projector(target, self.draft_vocab)
        self.num_draft_tokens = num_draft_tokens
        self.exit_layer = self.head.exit_layer
        self.cache = target.module.new_cache(1, num_layers=self.exit_layer)
        self._n = 0  # committed length at the last propose
        self._proposed = 0

    def prefill(self, prompt_ids: list[int], target_out: TargetOutput) -> None:
        self.cache.truncate(0)
        if len(prompt_ids) > 1:
            self._forward(prompt_ids[:-1], 0)

    @torch.inference_mode()
    def _forward(self, token_ids: list[int] | torch.Tensor, start: int) -> torch.Tensor:
        """Read ``token_ids`` at positions ``start..`` through layers 0..L-1; logits ``(V,)`` of
        the next token after the last one."""
        module = self.target.module
        tokens = torch.as_tensor(token_ids, device=self.target.device).reshape(1, -1)  # (1, T)
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]  # (1, T)
        h = module.model.embed_tokens(tokens)  # (1, T, d)
        h = module.run_layers(h, pos, self.cache, layers=range(self.exit_layer))  # (1, T, d)
        self.cache.truncate(start + tokens.shape[1])
        return self._project(self.head(h[0, -1]))

    def propose(self, ctx: DraftContext) -> DraftProposal:
        n = len(ctx.token_ids)
        K = min(self.num_draft_tokens, ctx.max_draft_tokens, self.cache.max_seq_len - n + 1)
        self._n, self._proposed = n, max(K, 0)
        if K <= 0:
            return empty_proposal(self.target.device)
        start = self.cache.lengths[0]
        logits = self._forward(ctx.token_ids[start:], start)  # (V,)
        tokens, probs = [], []
        for i in range(K):
            token, draft_probs = pick_tokens(logits[None], ctx.sampling, ctx.generator)
            tokens.append(token[0])
            if draft_probs is not None:
                probs.append(draft_probs[0])
            if i < K - 1:
                logits = self._forward(token, n + i)
        return DraftProposal(
            torch.stack(tokens),  # (K,)
            torch.stack(probs) if probs else None,  # (K, V)
        )

    def on_verified(self, result: VerifyResult) -> None:
        if self._proposed:
            self.cache.truncate(self._n + min(result.num_accepted, self._proposed - 1))
