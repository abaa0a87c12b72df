"""Staged speculative decoding (Spector & Re 2023, "Accelerating LLM inference with staged
speculative decoding"): the draft model is itself sped up by speculation, and the target
verifies a tree.

Stage 2 (n-gram -> draft model): to write its chain of K drafts, the draft model does not run
once per token; prompt lookup (:class:`~specdec.drafters.ngram.NgramIndex`) guesses the next
tokens, and one draft forward over ``[last, g1 .. gm]`` verifies the guesses exactly like the
target verifies drafts (greedy: longest argmax prefix; sampling: rejection sampling of a
deterministic proposal, Leviathan et al. 2023). The chain is therefore distributed exactly as
if the draft model had sampled it token by token, so its ``draft_probs`` are the draft model's
distributions ``q_i`` at each position. A forward commits ``accepted + 1`` draft tokens.

Stage 1 (draft model -> target): the chain is proposed as a tree with extra siblings at the
first ``branch_depth`` positions (Spector & Re, Sec. 3.1, tree-structured batches): greedy adds
the draft's next best tokens; sampling adds ``tree_width - 1`` more i.i.d. draws from ``q_i``
(the chain token is the first draw), as the lossless recursive rejection of
:mod:`specdec.verify.tree` requires. The extra siblings are leaves; they cost the target one
tree row each and no draft forward.

Where no n-gram guess is left, a stage-2 step would be a one-token draft forward; a chain
(``tree_width == 1``) then takes the rest from the draft model's one-call chain
(``Transformer.draft_chain``, C++ where the kernels run), which drafts the same tokens (greedy)
or draws from the same distributions (sampling) without a Python step per token. Demo pair,
decoding phase against plain decoding, best of 3 alternating rounds in one process (code /
edit / long): greedy 3.14 / 1.41 / 1.86x against 2.88 / 1.29 / 1.66x for the stage-2 loop
alone, sampled (T = 0.7) 1.71 / 2.59 / 1.18x against 1.23 / 1.57 / 1.00x. The draft model alone
(``draft``) was still faster in the same runs (4.23 / 1.81 / 2.18x greedy): on this pair its
one-call steps cost less than a stage-2 pass through Python.

Draft cache bookkeeping: with ``n`` committed tokens, the cache holds ``n + K - 1`` slots after
``propose`` (the chain's last token is never fed) and keeps ``n + min(j, K - 1)`` after ``j``
chain tokens were accepted, as :class:`~specdec.drafters.draft_model.DraftModelDrafter` does.
"""

from __future__ import annotations

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
from specdec.drafters.ngram import NgramIndex
from specdec.drafters.vocab import DraftVocab, draft_pass
from specdec.models.loading import LoadedModel
from specdec.sampling import logits_to_probs, sample
from specdec.verify.chain import VerifyResult, verify_greedy, verify_rejection


class StagedDrafter:
    def __init__(
        self,
        model: LoadedModel,
        num_draft_tokens: int = 4,
        tree_width: int = 2,
        branch_depth: int = 1,
        max_ngram: int = 3,
        min_ngram: int = 1,
        draft_vocab: DraftVocab | None = None,
    ) -> None:
        check_draft_shape(num_draft_tokens)
        if tree_width < 1 or branch_depth < 0:
            raise ValueError(f"need tree_width >= 1 and branch_depth >= 0, got {tree_width}, {branch_depth}")
        self.model = model
        self.draft_vocab = draft_vocab  # score drafts over these tokens only (specdec.drafters.vocab)
        self.num_draft_tokens = num_draft_tokens
        self.tree_width = tree_width
        self.branch_depth = branch_depth
        self.capabilities = DrafterCapabilities(
            max_tree_nodes=num_draft_tokens + min(branch_depth, num_draft_tokens) * (tree_width - 1),
            draft_model=model,
            draft_vocab=draft_vocab,
        )
        self.index = NgramIndex(min_ngram, max_ngram)
        self.cache = model.new_cache(1)
        self.draft_forwards = 0  # draft-model passes during propose (stage-2 speedup: < tokens)
        self._n = 0
        self._chain_len = 0

    def prefill(self, prompt_ids: list[int], target_out: TargetOutput) -> None:
        self.cache.truncate(0)
        self.index.reset(prompt_ids)
        if len(prompt_ids) > 1:
            self._forward(prompt_ids[:-1], 0, 0)

    def _forward(self, token_ids: list[int], start: int, num_logits: int) -> torch.Tensor:
        """Feed ``token_ids`` at ``start``; logits ``(num_logits, V)`` of the last ones."""
        tokens = torch.tensor([token_ids], device=self.model.device)  # (1, T)
        end = start + len(token_ids)
        pos = torch.arange(start, end, device=tokens.device)
        # (kv_len known: no device sync, and on a GPU the pass replays a graph)
        logits = draft_pass(self.model, self.draft_vocab, tokens, pos, self.cache, num_logits, kv_len=end)
        self.cache.truncate(end)
        self.draft_forwards += 1
        return logits  # (num_logits, V)

    def _chain(self, ctx: DraftContext, K: int) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """K draft tokens, the draft logits ``(K, V)`` and distributions ``(K, V)`` they follow
        (one-hot when greedy); each stage-2 step is one draft forward. Where no n-gram guess is
        left and a chain is wanted, the rest of it comes from the draft model's one-call chain
        (``Transformer.draft_chain``, where the kernels run): the logits are then None, and so
        are the distributions when greedy (a chain needs neither)."""
        ids = ctx.token_ids
        start = min(self.cache.lengths[0], len(ids) - 1)
        unfed = ids[start:]  # ends with the pending token
        chain: list[int] = []
        logit_rows: list[torch.Tensor] = []
        prob_rows: list[torch.Tensor] = []
        while len(chain) < K:
            remaining = K - len(chain)
            query = ids[-self.index.max_n :] + chain
            found = self.index.continuations(query, remaining - 1, 1) if remaining > 1 else []
            guess = found[0] if found else []
            if not guess and self.tree_width == 1:
                rest = self._rest_in_one_call(unfed, start, remaining, ctx)
                if rest is not None:
                    drafts, probs = rest  # (K',), (K', V) or None (greedy)
                    chain += drafts.tolist()
                    return chain, None, None if probs is None else torch.cat([*prob_rows, probs])
            logits = self._forward(unfed + guess, start, len(guess) + 1)  # (m+1, V)
            draft_probs = logits_to_probs(logits, ctx.sampling)  # (m+1, V)
            guess_t = torch.tensor(guess, dtype=torch.long, device=logits.device)
            if ctx.sampling.greedy:
                inner = verify_greedy(guess_t, logits)
            else:
                inner = verify_rejection(guess_t, None, draft_probs, ctx.generator)
            chain += inner.tokens
            logit_rows.append(logits[: inner.num_accepted + 1])
            prob_rows.append(draft_probs[: inner.num_accepted + 1])
            # keep [unfed, accepted guesses]; the last token of the step is fed next time
            start += len(unfed) + inner.num_accepted
            self.cache.truncate(start)
            unfed = chain[-1:]
        return chain, torch.cat(logit_rows), torch.cat(prob_rows)  # (K,), (K, V), (K, V)

    def _rest_in_one_call(
        self, unfed: list[int], start: int, num_tokens: int, ctx: DraftContext
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Feed ``unfed`` at ``start`` and draft ``num_tokens`` in one C++ call: ``(K',)`` drafts
        and, when sampling, their ``(K', V)`` distributions; None where the kernels do not run.
        The cache then holds every token but the last draft, as after the stage-2 loop."""
        feed = torch.tensor([unfed], device=self.model.device)  # (1, T)
        vocab = self.draft_vocab.kernel_rows if self.draft_vocab is not None else None
        rest = self.model.module.draft_chain(feed, start, num_tokens, self.cache, ctx.sampling, ctx.generator, vocab)
        if rest is not None:
            self.draft_forwards += num_tokens
        return rest

    def propose(self, ctx: DraftContext) -> DraftProposal:
        self.index.sync(ctx.token_ids)
        n = len(ctx.token_ids)
        K = min(self.num_draft_tokens, ctx.max_draft_tokens, self.cache.max_seq_len - n + 1)
        self._n, self._chain_len = n, max(K, 0)
        if K <= 0:
            return empty_proposal(self.model.device)
        chain, logits, draft_probs = self._chain(ctx, K)
        greedy = ctx.sampling.greedy
        if self.tree_width == 1:
            return DraftProposal(torch.tensor(chain, dtype=torch.long), None if greedy else draft_probs)
        assert logits is not None and draft_probs is not None  # (trees take the stage-2 loop)
        tokens, parents = list(chain), [i - 1 for i in range(K)]
        node_probs = list(range(K))  # node -> its row of draft_probs
        for d in range(min(self.branch_depth, K)):
            for token in self._alternatives(chain[d], logits[d], draft_probs[d], ctx):
                tokens.append(token)
                parents.append(d - 1)
                node_probs.append(d)
        probs = None if greedy else draft_probs[node_probs]  # (N, V)
        if len(tokens) == K:
            return DraftProposal(torch.tensor(chain, dtype=torch.long), probs)
        tree = DraftTree(
            torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long), probs
        )
        return DraftProposal(tree.tokens, probs, tree=tree)

    def _alternatives(
        self, chain_token: int, logits: torch.Tensor, draft_probs: torch.Tensor, ctx: DraftContext
    ) -> list[int]:
        """Extra siblings of ``chain_token`` at one position (see the module docstring)."""
        extra = self.tree_width - 1
        if extra <= 0:
            return []
        if ctx.sampling.greedy:  # the draft's next best tokens, distinct from the chain token
            ranked = logits.topk(min(extra + 1, logits.shape[-1])).indices.tolist()
            return [t for t in ranked if t != chain_token][:extra]
        draws = sample(draft_probs, ctx.generator, num_samples=extra)
        return draws.tolist()

    def on_verified(self, result: VerifyResult) -> None:
        if not self._chain_len:
            return
        on_chain = 0  # chain nodes are 0 .. K-1, along a path they come first
        while on_chain < len(result.accepted_path) and result.accepted_path[on_chain] == on_chain:
            on_chain += 1
        self.cache.truncate(self._n + min(on_chain, self._chain_len - 1))
