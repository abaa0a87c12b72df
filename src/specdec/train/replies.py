"""Windows of self-distillation conversations, scored on the target's replies.

The drafters that learn from ``specdec train data`` (Medusa and early-exit heads, the
DistillSpec draft) see a conversation through what the target computed on it: its final
normed hidden states ``f_t`` (whose ``lm_head`` logits are the target's next-token
distribution after ``x_0 .. x_t``), and for early exit the hidden states after the exit
layer. A drafter drafts replies, so the loss counts the positions whose next token is a reply
token (``t >= reply_start - 1``); the prompt before them is context.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.models.loading import LoadedModel


@dataclass(frozen=True)
class ReplyConversation:
    tokens: torch.Tensor  # (L,) long: prompt + reply
    final: torch.Tensor  # (L-1, d) float32: f_t for t = 0 .. L-2
    exit: torch.Tensor | None  # (L-1, d) float32: hidden states after the exit layer, or None
    reply_start: int  # the index of the reply's first token in ``tokens``


@dataclass(frozen=True)
class ReplyBatch:
    tokens: torch.Tensor  # (B, W) long: x_t (zero past a short conversation's end)
    next_tokens: torch.Tensor  # (B, W) long: x_{t+1}, the token the target wrote next
    final: torch.Tensor  # (B, W, d) f_t
    exit: torch.Tensor | None  # (B, W, d) hidden states after the exit layer
    mask: torch.Tensor  # (B, W) bool: x_{t+1} is a reply token (and t is inside the conversation)


def load_replies(
    folder: str | Path, target: LoadedModel, split: str, exit_layer: int | None = None
) -> list[ReplyConversation]:
    """The conversations of one split of a ``specdec train data`` folder with the target's
    features: the stored final hidden states (recomputed where a shard has none); with
    ``exit_layer``, both recomputed in one float32 pass per conversation. ValueError for data
    another target made."""
    from specdec.train.eagle import load_conversations

    if exit_layer is None:
        return [
            ReplyConversation(c.tokens, c.features, None, c.reply_start)
            for c in load_conversations(folder, target, split)
        ]
    from specdec.train.data import check_manifest, read_records
    from specdec.train.heads import target_features

    check_manifest(Path(folder), target)
    out = []
    for rec in read_records(folder, split):
        ids = torch.tensor(rec.token_ids)  # (L,)
        feats = target_features(target, ids[None, :-1], exit_layer, batch_size=1)
        assert feats.exit is not None
        out.append(ReplyConversation(ids, feats.final[0], feats.exit[0], rec.reply_start))
    return out


def _window_bounds(conv: ReplyConversation, window: int) -> tuple[int, int]:
    """The first and last start of a window over ``conv``'s positions that reaches its reply:
    at most a quarter of the window before the reply's first prediction, and never past the
    last position (a short conversation gives the one window at 0)."""
    positions = conv.final.shape[0]  # t = 0 .. L-2
    hi = max(0, positions - window)
    lo = min(hi, max(0, conv.reply_start - 1 - window // 4))
    return lo, hi


def _batch(convs: list[tuple[ReplyConversation, int]], window: int) -> ReplyBatch:
    """The windows starting at the given positions, right-padded to ``window``."""
    B, d = len(convs), convs[0][0].final.shape[1]
    with_exit = convs[0][0].exit is not None
    tokens = torch.zeros(B, window, dtype=torch.long)
    next_tokens = torch.zeros(B, window, dtype=torch.long)
    final = torch.zeros(B, window, d)
    exit = torch.zeros(B, window, d) if with_exit else None
    mask = torch.zeros(B, window, dtype=torch.bool)
    for b, (c, s) in enumerate(convs):
        n = min(window, c.final.shape[0] - s)
        tokens[b, :n] = c.tokens[s : s + n]
        next_tokens[b, :n] = c.tokens[s + 1 : s + 1 + n]
        final[b, :n] = c.final[s : s + n]
        if exit is not None and c.exit is not None:
            exit[b, :n] = c.exit[s : s + n]
        mask[b, :n] = torch.arange(s, s + n) >= c.reply_start - 1
    return ReplyBatch(tokens, next_tokens, final, exit, mask)


def sample_reply_windows(
    convs: list[ReplyConversation], batch_size: int, window: int, rng: random.Random
) -> ReplyBatch:
    """``batch_size`` windows of ``window`` positions, each from a random conversation at a
    random start that reaches its reply."""
    picks = []
    for _ in range(batch_size):
        c = convs[rng.randrange(len(convs))]
        picks.append((c, rng.randint(*_window_bounds(c, window))))
    return _batch(picks, window)


def validation_windows(convs: list[ReplyConversation], batch_size: int, window: int) -> list[ReplyBatch]:
    """Every conversation once, its window at the first start that reaches its reply, in
    batches (the same on every call)."""
    picks = [(c, _window_bounds(c, window)[0]) for c in convs]
    return [_batch(picks[i : i + batch_size], window) for i in range(0, len(picks), batch_size)]
