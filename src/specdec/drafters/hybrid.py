"""Prompt lookup first, the draft model where it finds nothing (``hybrid``).

The two cheapest drafters fail in opposite places. Prompt lookup (:mod:`~specdec.drafters.ngram`)
costs nothing and is right for long stretches where the text repeats itself (an edit that
re-types its input, a model that loops, quoted context), and has nothing to say on new text;
a draft model drafts new text well and copies only as far as it has learned to. Each step
this drafter proposes the n-gram continuation when there is one worth verifying, else the
draft model's chain, so the draft model runs only where lookup fails.

When is a continuation worth it? Under greedy decoding a copied token is accepted exactly when
it is the target's argmax. On the demo pair a continuation found after a match of 3 tokens
paid (any length); after shorter matches lookup took more steps than it deserved (after
1-token matches 69 % of the ``edit`` task's steps, with τ 2.51 against 3.00 for the draft model
alone; after 2-token matches 43 %, τ 2.84; after 3-token matches 33 %, τ 2.98), and timed
side by side ``edit`` ran at 1.44x plain decoding with 2-token matches, 1.78x with 3-token
matches and 1.66x for the draft model alone.
Under sampling a copied token is a deterministic draft, accepted only with the target's
probability of that token (Leviathan et al. 2023, Sec. 3), while the draft model's sampled
tokens are accepted with probability 1 - TV(p, q). On the demo pair at temperature 0.7 lookup
alone ran at 1.06x plain decoding against 1.83x for the draft model, and even full-length
continuations after 2-token matches cost the hybrid speed (1.42x), so under sampling it
drafts with the draft model only, unless given a ``sampled_rule``. Measured figures:
docs/drafters.md and docs/benchmarks.md section 2.

The draft model only sees the steps it drafts: on the others its cache keeps the committed
prefix it had, and its next proposal first feeds the tokens it missed (one multi-token pass).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from specdec.drafters.base import DraftContext, Drafter, DraftProposal, TargetOutput
from specdec.drafters.ngram import NgramIndex
from specdec.verify.chain import VerifyResult


@dataclass(frozen=True)
class LookupRule:
    """Propose a continuation of at least ``min_tokens`` (None: the full K) found after a
    match of at least ``min_match`` tokens."""

    min_tokens: int | None
    min_match: int


GREEDY_RULE = LookupRule(min_tokens=1, min_match=3)


class HybridDrafter:
    """Prompt lookup where it finds a continuation the rule allows (greedy: ``greedy_rule``;
    sampling: ``sampled_rule``, None = never), else ``draft`` (a chain drafter: the draft
    model's)."""

    def __init__(
        self,
        draft: Drafter,
        max_ngram: int = 3,
        greedy_rule: LookupRule = GREEDY_RULE,
        sampled_rule: LookupRule | None = None,
    ) -> None:
        self.draft = draft
        self.num_draft_tokens = draft.num_draft_tokens
        self.capabilities = replace(draft.capabilities, batchable=False)  # (lookup steps are per row)
        self.index = NgramIndex(1, max_ngram)
        self.rules = {True: greedy_rule, False: sampled_rule}  # by ctx.sampling.greedy
        self.looked_up = 0  # steps proposed by lookup (tests and reports read them)
        self.drafted = 0  # steps proposed by the draft
        self._draft_proposed = False

    def prefill(self, prompt_ids: list[int], target_out: TargetOutput) -> None:
        self.index.reset(prompt_ids)
        self.draft.prefill(prompt_ids, target_out)

    def propose(self, ctx: DraftContext) -> DraftProposal:
        ids = ctx.token_ids
        self.index.sync(ids)
        K = min(self.num_draft_tokens, ctx.max_draft_tokens)
        rule = self.rules[ctx.sampling.greedy]
        if rule is not None and K > 0:
            found = self.index.continuations(ids, K, 1, min_n=rule.min_match)
            if found and len(found[0]) >= (rule.min_tokens or K):
                self.looked_up += 1
                self._draft_proposed = False
                return DraftProposal(torch.tensor(found[0], dtype=torch.long))  # (k,) deterministic
        self.drafted += 1
        self._draft_proposed = True
        self.draft.num_draft_tokens = self.num_draft_tokens
        return self.draft.propose(ctx)

    def on_verified(self, result: VerifyResult) -> None:
        if self._draft_proposed:  # (a lookup step leaves the draft's state as it was)
            self.draft.on_verified(result)
