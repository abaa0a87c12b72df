"""Medusa: extra decoding heads on the target's last hidden state (Cai et al. 2024).

With ``n`` committed tokens the last one is pending (drawn from the target's ``lm_head`` at the
hidden state ``h`` of token ``n-2``). Head ``k`` (0-based) reads the same ``h`` and predicts
token ``n + k``, i.e. draft ``d_{k+1}`` (Medusa, Sec. 2.1.1: the original head predicts t+1,
head k predicts t+k+1). All K drafts come from one small computation on ``h`` and none of them
sees the drafts before it; the verify pass supplies the next ``h`` (the engine hands the
accepted rows' hidden states to :meth:`on_verified`, see ``needs_hidden``).

Chain mode proposes each head's argmax (greedy) or one sample from each head's distribution
(sampling: ``draft_probs[k]`` is head k's distribution, which ignores the earlier drafts; that
is a valid conditional for rejection sampling, so the output stays the target's).
"""

from __future__ import annotations

from pathlib import Path

import torch

from specdec.drafters.base import DraftContext, DraftProposal, TargetOutput
from specdec.drafters.heads import MedusaHeads, pick_tokens, resolve_head
from specdec.models.loading import LoadedModel
from specdec.verify.chain import VerifyResult


class MedusaDrafter:
    """Propose ``num_draft_tokens`` (<= the number of heads) tokens from Medusa heads.

    ``heads``: a MedusaHeads, a head folder, or None for ``<target folder>/medusa/``.
    """

    needs_hidden = True  # the engine passes the verify pass's hidden states to on_verified

    def __init__(
        self,
        target: LoadedModel,
        heads: MedusaHeads | str | Path | None = None,
        num_draft_tokens: int | None = None,
    ) -> None:
        self.target = target
        self.heads = resolve_head(heads, target.path, target.config, "medusa", target.dtype, target.device)
        assert isinstance(self.heads, MedusaHeads)
        K = num_draft_tokens if num_draft_tokens is not None else self.heads.num_heads
        if not isinstance(K, int) or not 1 <= K <= self.heads.num_heads:
            raise ValueError(
                f"num_draft_tokens must be in [1, {self.heads.num_heads}] (one per head), got {K}"
            )
        self.num_draft_tokens = K
        self._hidden: torch.Tensor | None = None  # (d,) target hidden state of token n-2

    def prefill(self, prompt_ids: list[int], target_out: TargetOutput) -> None:
        self._hidden = target_out.hidden[-1] if target_out.hidden is not None else None

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> DraftProposal:
        K = min(self.num_draft_tokens, ctx.max_draft_tokens)
        if self._hidden is None:
            # One-token prompt: no hidden state yet. Propose the pending token once (a
            # deterministic draft) only to have the verify pass compute the hidden state.
            return DraftProposal(torch.tensor([ctx.token_ids[-1]], device=self.target.device))
        features = self.heads(self._hidden)[:K]  # (K, d)
        logits = self.target.module.lm_head(features)  # (K, V)
        tokens, draft_probs = pick_tokens(logits, ctx.sampling, ctx.generator)
        return DraftProposal(tokens, draft_probs)

    def on_verified(self, result: VerifyResult) -> None:
        if result.target_hidden is None:
            raise RuntimeError("MedusaDrafter needs an engine that sets VerifyResult.target_hidden")
        self._hidden = result.target_hidden[-1]  # the last accepted row predicted the new pending
