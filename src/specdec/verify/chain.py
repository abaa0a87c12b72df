"""Verification of a chain of K draft tokens against one target pass: pure functions.

Vocabulary (as in vLLM's rejection sampler):

* **accepted** — a draft token the target keeps;
* **recovered** — at the first rejection, a token sampled from the residual
  ``norm(max(0, target_probs - draft_probs))``; it replaces the rejected draft;
* **bonus** — when all K drafts are accepted, one more token sampled from the target's
  distribution after the last draft (it comes free with the verify pass).

Worked example, K = 3, drafts ``[a, b, c]``; the target pass over ``[t0, a, b, c]`` gives 4
distributions ``target_probs[0..3]``; ``target_probs[i]`` is the distribution of the token that
follows draft ``i-1`` (``t0`` for ``i = 0``). If ``a`` is accepted and ``b`` rejected, the step
commits ``[a, r]`` with ``r ~ residual(target_probs[1], draft_probs[1])``; ``target_probs[2:]``
are discarded. If all three pass it commits ``[a, b, c, bonus ~ target_probs[3]]``.

Rejection sampling keeps the output distributed exactly as the target's (Leviathan et al.
2023, Thm. 1; Chen et al. 2023, Alg. 2). A drafter without probabilities (n-gram lookup) is
a deterministic proposal: its ``draft_probs`` is the one-hot of its token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specdec.sampling import sample


@dataclass(frozen=True)
class VerifyResult:
    """What one verify step commits.

    ``tokens`` = the ``num_accepted`` accepted drafts followed by one recovered or bonus token.
    ``accepted_path`` are the accepted tree-node indices (a chain: ``0 .. num_accepted-1``).
    """

    tokens: list[int]
    num_accepted: int
    num_drafted: int
    bonus: bool
    accepted_path: tuple[int, ...] = ()
    # (num_accepted + 1, d): the target's final hidden states at the pending token and the
    # accepted drafts; set by the engine for drafters with ``needs_hidden`` (EAGLE, Medusa).
    target_hidden: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def kinds(self) -> list[str]:
        """Provenance per token: ``accepted`` drafts, then ``bonus`` / ``recovered``."""
        last = "bonus" if self.bonus else "recovered"
        return ["accepted"] * self.num_accepted + [last]


def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> VerifyResult:
    """Accept the longest draft prefix equal to the target's argmax.

    draft_tokens: ``(K,)``; target_logits: ``(K+1, V)``.
    """
    K = draft_tokens.shape[0]
    target_tokens = target_logits.argmax(-1).tolist()  # (K+1,)
    drafts = draft_tokens.tolist()
    n = 0
    while n < K and drafts[n] == target_tokens[n]:
        n += 1
    return VerifyResult(
        tokens=drafts[:n] + [target_tokens[n]],
        num_accepted=n,
        num_drafted=K,
        bonus=n == K,
        accepted_path=tuple(range(n)),
    )


def residual_probs(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """``norm(max(0, target_probs - draft_probs))`` ``(V,)``; falls back to the target when the
    residual is empty (only possible when the two distributions are equal)."""
    residual = (target_probs - draft_probs).clamp_min(0)
    total = residual.sum()
    return torch.where(total > 0, residual / total, target_probs)  # no host sync


def verify_rejection(
    draft_tokens: torch.Tensor,  # (K,)
    draft_probs: torch.Tensor | None,  # (K, V); None = deterministic drafts (one-hot)
    target_probs: torch.Tensor,  # (K+1, V), already temperature / top-k / top-p processed
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Lossless speculative sampling of a chain (Leviathan et al. 2023, Alg. 1)."""
    K = draft_tokens.shape[0]
    idx = torch.arange(K, device=draft_tokens.device)
    p = target_probs[idx, draft_tokens]  # (K,) target prob of each draft
    q = draft_probs[idx, draft_tokens] if draft_probs is not None else torch.ones_like(p)
    u = torch.rand(K, generator=generator, device=p.device)
    # Accept draft i with probability min(1, p/q); u*q < p avoids dividing by q.
    accept = (u * q < p).tolist()
    n = 0
    while n < K and accept[n]:
        n += 1
    drafts = draft_tokens.tolist()
    if n == K:
        last = int(sample(target_probs[K], generator))
    else:
        if draft_probs is not None:
            q_row = draft_probs[n]
        else:
            q_row = torch.zeros_like(target_probs[n])
            q_row[drafts[n]] = 1.0
        last = int(sample(residual_probs(target_probs[n], q_row), generator))
    return VerifyResult(
        tokens=drafts[:n] + [last],
        num_accepted=n,
        num_drafted=K,
        bonus=n == K,
        accepted_path=tuple(range(n)),
    )
