"""One verify step for a chain proposal: score ``[pending, d1 .. dK]`` in one target pass,
verify, commit.

Chain verification of Leviathan et al. (2023) and Chen et al. (2023): the target's K + 1
distributions decide how many drafts to keep (:mod:`specdec.verify.chain`), and the cache is
rolled back to the committed tokens by moving its length. A proposal that carries
:class:`~specdec.drafters.base.ReusedLayers` (a drafter declaring ``reuses_target_cache`` has
already run the target's first layers for these tokens) is scored by a pass that skips them;
plain decoding is the same step with K = 0.
"""

from __future__ import annotations

import torch

from specdec.cache import KVCache
from specdec.drafters.base import DraftProposal
from specdec.engine.request import with_accepted_hidden
from specdec.models.loading import LoadedModel
from specdec.sampling import SamplingParams, logits_to_probs
from specdec.verify.chain import VerifyResult, verify_greedy, verify_rejection


def score_chain(
    target: LoadedModel,
    cache: KVCache,
    token_ids: list[int],
    proposal: DraftProposal,
    needs_hidden: bool,
    feature_layers: tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The target's logits ``(K+1, V)`` after the pending token and each draft, and its final
    hidden states ``(K+1, d)`` where ``needs_hidden`` (else None), after the outputs of
    ``feature_layers`` (``(K+1, (len + 1) d)``, see :class:`DrafterCapabilities`)."""
    device = target.device
    n, K = len(token_ids), proposal.num_tokens
    pending = torch.tensor([token_ids[-1]], device=device)
    inp = torch.cat([pending, proposal.tokens.to(device)])[None]  # (1, K+1)
    pos = torch.arange(n - 1, n + K, device=device)  # (K+1,)
    kv_len = n + K  # known on the host: no device sync
    reused = proposal.reused
    if reused is not None:  # the first layers ran while drafting (LayerSkip's cache reuse)
        logits, hidden = target.module.forward_reusing(
            inp, pos[None], cache, reused.num_layers, reused.hidden[None], kv_len
        )
    elif needs_hidden:
        logits, hidden = target.step(
            inp, pos, cache, return_hidden=True, kv_len=kv_len, feature_layers=feature_layers
        )
    else:
        logits, hidden = target.step(inp, pos, cache, kv_len=kv_len), None
    return logits[0], (hidden[0] if needs_hidden and hidden is not None else None)


def chain_step(
    target: LoadedModel,
    cache: KVCache,
    token_ids: list[int],
    proposal: DraftProposal,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    needs_hidden: bool = False,
    feature_layers: tuple[int, ...] = (),
) -> VerifyResult:
    """Verify the chain ``proposal`` after the pending token ``token_ids[-1]`` and commit.

    The target cache must hold ``len(token_ids) - 1`` committed slots; afterwards it holds
    ``len(token_ids) + num_accepted``. With ``needs_hidden`` the result carries the target's
    hidden states of the pending token and the accepted drafts (``target_hidden``), after the
    outputs of ``feature_layers``.
    """
    logits, hidden = score_chain(target, cache, token_ids, proposal, needs_hidden, feature_layers)  # (K+1, V)
    if params.greedy:
        result = verify_greedy(proposal.tokens, logits)
    else:
        target_probs = logits_to_probs(logits, params)  # (K+1, V)
        result = verify_rejection(proposal.tokens, proposal.draft_probs, target_probs, generator)
    cache.truncate(len(token_ids) + result.num_accepted)
    return with_accepted_hidden(result, hidden)
