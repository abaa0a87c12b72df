"""The inputs of one batched verify pass over rows with ragged proposals (chains or trees).

Row ``b`` with ``n_b`` committed tokens (``P_b = n_b - 1``) feeds ``[pending, node_1 .. node_N]``
into cache slots ``P_b .. P_b + N``, padded to the batch's common width T. Chains use the
causal mask by slot; a tree uses :func:`~specdec.verify.tree.tree_attention_mask` (SpecInfer,
Miao et al. 2024, Sec. 4) and depth-based RoPE positions. Padding tokens sit in the slots
after the row's real ones and attend causally; the last cache slot is reserved as scratch for
padding that would fall beyond the cache, so padding never overwrites a real token's slot.

Worked example: row 0 has n = 10 and a chain of 1 draft, row 1 a chain of 3, so T = 4. Row 0
writes slots 9, 10 (real) and 11, 12 (padding). The real queries at slots 9 and 10 see slots
``<= 10`` only; slots 11 and 12 lie beyond the row's committed length and are overwritten by
the next pass before any real token can see them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.drafters.base import DraftProposal
from specdec.sampling import SamplingParams, logits_to_probs
from specdec.verify.chain import VerifyResult, verify_greedy, verify_rejection
from specdec.verify.tree import (
    tree_attention_mask,
    tree_depth,
    tree_positions,
    truncate_tree,
    verify_tree_greedy,
    verify_tree_rejection,
)


@dataclass(frozen=True)
class RowInput:
    row: int
    pending: int  # the last committed token
    prefix_len: int  # P: committed slots before the pending token
    proposal: DraftProposal


@dataclass(frozen=True)
class VerifyInputs:
    tokens: torch.Tensor  # (B', T) long
    positions: torch.Tensor  # (B', T) RoPE positions
    slots: torch.Tensor  # (B', T) cache slots
    attn_mask: torch.Tensor | None  # (B', T, S) bool, None = causal by slot (chains only)
    kv_len: int  # S: slots attention reads (known on the host: no device sync)


def fit_proposal(proposal: DraftProposal, prefix_len: int, capacity: int) -> DraftProposal:
    """Drop tree nodes that would not fit below the scratch slot ``capacity - 1``."""
    if proposal.tree is None:
        return proposal
    tree = truncate_tree(proposal.tree, capacity - prefix_len - 2)
    return DraftProposal(tree.tokens, tree.draft_probs, tree)


def build_inputs(rows: list[RowInput], num_rows: int, capacity: int, device: torch.device) -> VerifyInputs:
    """Inputs for rows ``0 .. num_rows-1``; rows without an entry (free rows) get dummies."""
    T = 1 + max(r.proposal.num_tokens for r in rows)
    tokens = torch.zeros(num_rows, T, dtype=torch.long, device=device)  # (B', T)
    slots = torch.arange(T, device=device).repeat(num_rows, 1)  # (B', T)
    for r in rows:
        k = r.proposal.num_tokens
        tokens[r.row, 0] = r.pending
        tokens[r.row, 1 : 1 + k] = r.proposal.tokens.to(device)
        slots[r.row] += r.prefix_len
    slots = slots.clamp_max(capacity - 1)  # padding past the end goes to the scratch slot
    positions = slots.clone()
    S = min(max([T, *(r.prefix_len + T for r in rows)]), capacity)
    trees = [r for r in rows if r.proposal.tree is not None]
    if not trees:
        return VerifyInputs(tokens, positions, slots, None, S)
    mask = torch.arange(S, device=device)[None, None, :] <= slots[:, :, None]  # (B', T, S) causal
    for r in trees:
        tree = r.proposal.tree
        assert tree is not None
        N, P = tree.num_nodes, r.prefix_len
        positions[r.row, : N + 1] = tree_positions(tree.parents, P).to(device)
        mask[r.row, : N + 1] = False
        mask[r.row, : N + 1, : P + 1 + N] = tree_attention_mask(tree.parents, P).to(device)
    return VerifyInputs(tokens, positions, slots, mask, S)


def verify_row(
    proposal: DraftProposal,
    logits: torch.Tensor,  # (T, V) the row's logits
    sampling: SamplingParams,
    generator: torch.Generator,
) -> tuple[VerifyResult, int]:
    """Verify one row's chain or tree; returns the result and the proposal's depth K."""
    k = proposal.num_tokens
    logits = logits[: k + 1]  # (k+1, V)
    tree = proposal.tree
    if tree is not None:
        if sampling.greedy:
            return verify_tree_greedy(tree, logits), tree_depth(tree)
        return verify_tree_rejection(tree, logits_to_probs(logits, sampling), generator), tree_depth(tree)
    if sampling.greedy:
        return verify_greedy(proposal.tokens, logits), k
    target_probs = logits_to_probs(logits, sampling)  # (k+1, V)
    return verify_rejection(proposal.tokens, proposal.draft_probs, target_probs, generator), k
