"""One verify step for a tree proposal: score all nodes in one target pass, verify, commit.

The tree decoding of SpecInfer (Miao et al. 2024, Sec. 4) and Medusa (Cai et al. 2024): the
pending token and the N nodes are written to slots ``P .. P+N`` under a tree attention mask
(:mod:`specdec.verify.tree`); after verification the accepted path's keys/values are moved to
``P+1, P+2, ...`` with :meth:`KVCache.compact`, so the cache is a plain chain of
``P + 1 + len(path)`` committed slots again, exactly as after a chain step.
"""

from __future__ import annotations

import torch

from specdec.cache import KVCache
from specdec.drafters.base import DraftTree
from specdec.engine.request import with_accepted_hidden
from specdec.models.loading import LoadedModel
from specdec.sampling import SamplingParams, logits_to_probs
from specdec.verify.chain import VerifyResult
from specdec.verify.tree import (
    tree_attention_mask,
    tree_positions,
    truncate_tree,
    verify_tree_greedy,
    verify_tree_rejection,
)


def tree_step(
    target: LoadedModel,
    cache: KVCache,
    token_ids: list[int],
    tree: DraftTree,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    needs_hidden: bool = False,
    feature_layers: tuple[int, ...] = (),
) -> VerifyResult:
    """Verify ``tree`` below the pending token ``token_ids[-1]`` and commit the accepted path.

    The target cache must hold ``len(token_ids) - 1`` committed slots; afterwards it holds
    ``len(token_ids) + num_accepted``. With ``needs_hidden`` the result carries the target's
    hidden states of the pending token and the accepted path (``target_hidden``), after the
    outputs of ``feature_layers``. Nodes that do not fit in the cache are dropped (a prefix
    of a topologically sorted tree is a tree, and node indices stay the same).
    """
    device = target.device
    P = len(token_ids) - 1
    tree = truncate_tree(tree, cache.max_seq_len - P - 1)
    N = tree.num_nodes
    pending = torch.tensor([token_ids[-1]], device=device)
    inp = torch.cat([pending, tree.tokens.to(device)])[None]  # (1, N+1)
    pos = tree_positions(tree.parents, P).to(device)[None]  # (1, N+1)
    slots = torch.arange(P, P + N + 1, device=device)[None]  # (1, N+1)
    mask = tree_attention_mask(tree.parents, P).to(device)[None]  # (1, N+1, P+1+N)
    out = target(
        inp,
        pos,
        cache,
        attn_mask=mask,
        cache_slots=slots,
        return_hidden=needs_hidden,
        feature_layers=feature_layers,
    )
    logits, hidden = out if needs_hidden else (out, None)
    logits = logits[0]  # (N+1, V)
    if params.greedy:
        result = verify_tree_greedy(tree, logits)
    else:
        result = verify_tree_rejection(tree, logits_to_probs(logits, params), generator)
    cache.compact(P + 1, list(result.accepted_path))
    return with_accepted_hidden(result, None if hidden is None else hidden[0])  # (N+1, d) rows
