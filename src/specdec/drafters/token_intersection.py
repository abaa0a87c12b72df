"""Lossless sampling with a draft model of another vocabulary: token-level intersection (TLI;
Timor et al., ICML 2025, "Accelerating LLM inference with lossless speculative decoding
algorithms for heterogeneous vocabularies", Sec. 3.3).

Rejection sampling (Leviathan et al. 2023, Thm. 1) keeps the target's distribution for *any*
proposal distribution over the target's tokens, as long as each draft is drawn from the
distribution reported with it. A draft of another vocabulary gives such a distribution once it
is restricted to the tokens both vocabularies share: the draft's processed distribution
(temperature, top-k, top-p) over the shared tokens only, renormalised, and read as a
distribution over the target's ids of the same tokens (zero elsewhere). A target token outside
the intersection is never drafted, only recovered or bonus.

Tokens are shared when they decode to the same non-empty text (special tokens and tokens that
end inside a UTF-8 character are left out). Which tokens are matched only affects acceptance,
never the output distribution: every draft is a target token drawn from the distribution it
carries.
"""

from __future__ import annotations

import torch

from specdec.models.tokenizer import Tokenizer
from specdec.sampling import SamplingParams, logits_to_probs


def token_texts(tokenizer: Tokenizer, vocab_size: int) -> list[str]:
    """The text of each token id alone (``""`` for special tokens)."""
    return [tokenizer.decode([i], skip_special_tokens=True) for i in range(vocab_size)]


class TokenIntersection:
    """The tokens a draft vocabulary shares with a target vocabulary, and the draft's
    distribution restricted to them."""

    def __init__(
        self,
        target_tokenizer: Tokenizer,
        draft_tokenizer: Tokenizer,
        target_vocab_size: int,
        draft_vocab_size: int,
    ) -> None:
        target_ids: dict[str, int] = {}
        for i, text in enumerate(token_texts(target_tokenizer, target_vocab_size)):
            if text and "\ufffd" not in text:
                target_ids.setdefault(text, i)
        pairs = [
            (d, target_ids[text])
            for d, text in enumerate(token_texts(draft_tokenizer, draft_vocab_size))
            if text in target_ids
        ]
        self.draft_ids = torch.tensor([d for d, _ in pairs], dtype=torch.long)  # (M,)
        self.target_ids = torch.tensor([t for _, t in pairs], dtype=torch.long)  # (M,)
        self.to_target = dict(pairs)
        self.target_vocab_size = target_vocab_size

    def __len__(self) -> int:
        return len(self.to_target)

    def restrict(self, logits: torch.Tensor, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft's processed distribution over the shared tokens, from its ``logits`` ``(V_d,)``:
        over the draft's ids ``(V_d,)`` (to sample from) and over the target's ids ``(V_t,)``
        (the ``draft_probs`` of rejection sampling)."""
        ids = self.draft_ids.to(logits.device)
        masked = torch.full_like(logits, float("-inf"))  # (V_d,)
        masked[ids] = logits[ids]
        draft_side = logits_to_probs(masked, sampling)  # (V_d,)
        target_side = torch.zeros(
            self.target_vocab_size, dtype=draft_side.dtype, device=logits.device
        )  # (V_t,)
        target_side[self.target_ids.to(logits.device)] = draft_side[ids]
        return draft_side, target_side
