"""Self-speculative drafting: the target's first L layers plus a trained exit head.

Zhang et al. 2023 (Draft & Verify: skip layers of the target to draft) and Elhoushi et al.
2024 (LayerSkip, Sec. 4: draft with the first E layers and an early-exit head, verify with
the full model). No second model is loaded: the drafter runs ``embed -> layers[0:L] ->
ExitHead -> lm_head`` of the target's own weights.

Two ways to keep the keys and values of layers ``0..L-1``:

* **In the target's own cache** (the single-sequence engine on a CPU with the kernels, where
  the target's rows do not depend on the pass around them): the target's prefill has already
  run the prompt through those layers, so the drafter reads nothing more; while drafting it
  writes the pending token's and its drafts' entries into the slots the verify pass would write
  them to, with the same values, and hands the layer-L states of all but the last draft to the
  verify pass (:class:`~specdec.drafters.base.ReusedLayers`), which then runs layers ``0..L-1``
  for that last draft only (LayerSkip's cache reuse, Sec. 4.2). The engine's rollback after
  verification rolls back the drafter too: each step feeds just the pending token.
* **In a cache of its own** (elsewhere: the server, the module path): the drafter reads the
  prompt through its L layers itself and keeps, like a draft model, the entries of accepted
  drafts: with ``n`` committed tokens and K drafts, the cache holds ``n + K - 1`` slots after
  ``propose`` and keeps ``n + min(j, K-1)`` of them after ``j`` drafts are accepted. The verify
  pass runs all N layers for all K + 1 tokens.

On a memory-bound target the reuse saves arithmetic, not weight reads (the verify pass reads
layers ``0..L-1`` for the last draft anyway); on a target bound by arithmetic, as the demo
target is on a CPU, it saves about L/N of the verify pass's work.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from specdec import kernels
from specdec.drafters.base import (
    DraftContext,
    DrafterCapabilities,
    DraftProposal,
    ReusedLayers,
    TargetOutput,
    check_draft_shape,
    empty_proposal,
)
from specdec.drafters.heads import ExitHead, pick_tokens, resolve_head
from specdec.drafters.vocab import DraftVocab, head_rows, projector, resolve_draft_vocab
from specdec.models import cuda_graphs
from specdec.models.llama import causal_mask
from specdec.models.loading import LoadedModel
from specdec.sampling import chain_draws, spread_rows
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
        resolved = resolve_head(head, target.path, target.config, "early-exit", target.dtype, target.device)
        assert isinstance(resolved, ExitHead)
        self.head: ExitHead = resolved
        self.draft_vocab = resolve_draft_vocab(target, draft_vocab)
        self._project = projector(target, self.draft_vocab)
        self.num_draft_tokens = num_draft_tokens
        self.exit_layer = self.head.exit_layer
        self.capabilities = DrafterCapabilities(
            max_tree_nodes=num_draft_tokens, draft_vocab=self.draft_vocab, reuses_target_cache=True
        )
        self._own_cache = target.module.new_cache(1, num_layers=self.exit_layer)
        self.cache = self._own_cache  # or the target's, see prefill
        self._shared = False
        self._n = 0  # committed length at the last propose
        self._proposed = 0
        self.graphs = cuda_graphs.GraphTable() if cuda_graphs.enabled(target.device) else None

    def prefill(self, prompt_ids: list[int], target_out: TargetOutput) -> None:
        shared = target_out.cache
        self._shared = shared is not None and self.target.module.reuses_layers()
        if shared is not None and self._shared:  # the target's prefill filled layers 0..L-1 for the prompt
            self.cache = shared
            return
        self.cache = self._own_cache
        self.cache.truncate(0)
        if len(prompt_ids) > 1:
            self._forward(prompt_ids[:-1], 0)

    @torch.inference_mode()
    def _forward(self, token_ids: list[int] | torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Read ``token_ids`` at positions ``start..`` through layers 0..L-1; logits ``(V,)`` of
        the next token after the last one, and the last token's layer-L state ``(d,)``. On a GPU
        a chain pass replays a graph recorded for its shape (:mod:`specdec.models.cuda_graphs`)."""
        tokens = torch.as_tensor(token_ids, device=self.target.device).reshape(1, -1)  # (1, T)
        end = start + tokens.shape[1]
        pos = torch.arange(start, end, device=tokens.device)[None]  # (1, T)
        layers = partial(self._exit_pass, end=end)
        logits, state = cuda_graphs.chain_pass(self.graphs, self.cache, end, (tokens, pos), layers)
        if not self._shared:  # (the engine keeps the length of its own cache)
            self.cache.truncate(end)
        return logits, state

    def _exit_pass(
        self, tokens: torch.Tensor, pos: torch.Tensor, slots: int | None, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers 0..L-1 and the exit head over ``tokens`` ``(1, T)`` at ``pos`` ``(1, T)``, the
        cache filled up to ``end``: ``((V,) logits after the last token, (d,) its layer-L
        state)``. With ``slots`` attention reads that many cache slots under the causal mask of
        ``pos`` instead (a fixed shape, for a graph)."""
        module = self.target.module
        h = module.model.embed_tokens(tokens)  # (1, T, d)
        if self._shared:  # float32 activations, as the verify pass that continues from them
            h = h.float()
        mask = None if slots is None else causal_mask(pos, slots)  # (1, 1, T, slots)
        kv_len = end if slots is None else slots
        h = module.run_layers(h, pos, self.cache, attn_mask=mask, layers=range(self.exit_layer), kv_len=kv_len)
        state = h[0, -1]  # (d,)
        return self._project(self.head(state.to(self.target.dtype))), state

    def propose(self, ctx: DraftContext) -> DraftProposal:
        n = len(ctx.token_ids)
        K = min(self.num_draft_tokens, ctx.max_draft_tokens, self.cache.max_seq_len - n + 1)
        self._n, self._proposed = n, max(K, 0)
        if K <= 0:
            return empty_proposal(self.target.device)
        start = self.cache.lengths[0]  # shared: n - 1, the pending token is fed alone
        if self._one_call():
            drafts, states, probs = self._chain(ctx, start, K)  # the loop below in one call
            reused = ReusedLayers(self.exit_layer, states) if self._shared else None  # (K, d)
            return DraftProposal(drafts, probs, reused=reused)  # (K,), (K, V) or None
        logits, state = self._forward(ctx.token_ids[start:], start)  # (V,), (d,)
        chain: list[torch.Tensor] = []
        chain_probs: list[torch.Tensor] = []
        chain_states = [state]
        for i in range(K):
            token, draft_probs = pick_tokens(logits[None], ctx.sampling, ctx.generator)
            chain.append(token[0])
            if draft_probs is not None:
                chain_probs.append(draft_probs[0])
            if i < K - 1:
                logits, state = self._forward(token, n + i)
                chain_states.append(state)
        reused = ReusedLayers(self.exit_layer, torch.stack(chain_states)) if self._shared else None  # (K, d)
        return DraftProposal(
            torch.stack(chain),  # (K,)
            torch.stack(chain_probs) if chain_probs else None,  # (K, V)
            reused=reused,
        )

    def _one_call(self) -> bool:
        """Whether the chain runs in one C++ call (``kernels.exit_greedy`` / ``exit_sample``): a
        float32 target on the one-call forward, whose exit head is computed in float32 as well."""
        return self.target.dtype == torch.float32 and self.target.module.reuses_layers()

    @torch.inference_mode()
    def _chain(self, ctx: DraftContext, start: int, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(K,)`` drafts, the ``(K, d)`` layer-L states of the tokens fed at each step and, when
        sampling, the ``(K, V)`` distributions the drafts were drawn from (None when greedy)."""
        module, cfg, head = self.target.module, self.target.config, self.head
        assert module._kernel_io is not None and module._layer_weights is not None  # (_one_call)
        embed = module._kernel_io[0]
        ids, rows = head_rows(self.target, self.draft_vocab)
        token_ids = ctx.token_ids[start:]
        tokens = torch.as_tensor(token_ids, device=self.target.device)  # (T,)
        common = (tokens, start, K, module.get_buffer("inv_freq"), embed, self.cache.k, self.cache.v, module._layer_weights,
                  self.exit_layer, head.norm.weight, head.proj.weight, rows, ids)  # fmt: skip
        shape = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps)
        probs = None
        if ctx.sampling.greedy:
            drafts, states = kernels.exit_greedy(*common, *shape)
        else:
            draws = chain_draws(ctx.sampling, K, ctx.generator)
            drafts, states, subset_probs = kernels.exit_sample(*common, *draws, *shape)
            probs = spread_rows(subset_probs, ids, cfg.vocab_size)  # (K, V)
        if not self._shared:  # (the engine keeps the length of its own cache)
            self.cache.truncate(start + len(token_ids) + K - 1)
        return drafts, states, probs

    def on_verified(self, result: VerifyResult) -> None:
        if self._proposed and not self._shared:  # (shared: the engine has rolled its cache back)
            self.cache.truncate(self._n + min(result.num_accepted, self._proposed - 1))
