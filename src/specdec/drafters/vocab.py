"""A reduced draft vocabulary for the drafters that score with an ``lm_head``: the head drafters
(EAGLE, Medusa, early exit) with the target's, the draft model with its own.

These drafters score every draft token over the whole vocabulary: a ``(V, d)`` product per
drafted token. For the head drafters that is the target's ``lm_head``, a third of the demo
target's weights and most of an EAGLE draft's cost on a large-vocabulary model; for the demo
draft model its own ``lm_head`` is 73 % of its weights. Most of the probability mass sits on a
small set of frequent tokens, so the drafters may score only the ``N`` most frequent ones (FR-Spec, Zhao et al. 2025, restricts
EAGLE-2's drafting to a frequency-ranked subset; EAGLE-3, Li et al. 2025, trains its head
over a reduced draft vocabulary). Verification still scores the full vocabulary, so the output
is unchanged: greedy output stays identical, and a sampled draft comes with its exact
distribution (zero outside the subset), which is all rejection sampling needs to stay lossless.
A draft token the subset cannot name is simply a rejected draft.

On the demo pair the 1024 most frequent tokens of the training split (of 8192) left the greedy
tau of EAGLE and early exit unchanged on the bench's code and long tasks (edit: 2.91 -> 2.84).
The draft model shares the target's vocabulary (the loader checks it), so it reads the same
ranking, from the target's folder.

The ranking lives beside the target as ``draft_vocab.json`` (token ids, most frequent first;
beside a GGUF file in ``<file stem>.draft-vocab/``, or shipped, see :mod:`specdec.drafters.locate`),
written by ``specdec train draft-vocab`` from the training corpus, your own text files or the
target's replies in self-distillation data.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from specdec.cache import KVCache
from specdec.models.config import ModelLoadError
from specdec.models.llama import project_rows
from specdec.models.loading import LoadedModel

DRAFT_VOCAB_FILE = "draft_vocab.json"


def rank_tokens(counts: Counter[int], vocab_size: int) -> list[int]:
    """Every id in ``0 .. vocab_size-1``, most frequent by ``counts`` first (ties: lower id
    first; ids never seen come last)."""
    return sorted(range(vocab_size), key=lambda t: (-counts.get(t, 0), t))


def write_draft_vocab(folder: str | Path, ranking: list[int], counted_tokens: int, source: str) -> Path:
    """Write ``<folder>/draft_vocab.json`` with the ranking (most frequent first)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / DRAFT_VOCAB_FILE
    meta = {"counted_tokens": counted_tokens, "source": source, "token_ids": ranking}
    path.write_text(json.dumps(meta) + "\n")
    return path


def read_draft_vocab(folder: str | Path, vocab_size: int) -> list[int]:
    """The ranking in ``<folder>/draft_vocab.json``; a missing or malformed file is a user error."""
    path = Path(folder) / DRAFT_VOCAB_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"no {DRAFT_VOCAB_FILE} in {folder}; rank the target's tokens with "
            f"'specdec train draft-vocab --target {folder}', or use --draft-vocab 0 (full vocabulary)"
        )
    try:
        ids = json.loads(path.read_text())["token_ids"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path} is not a draft vocabulary ({e})") from None
    if not isinstance(ids, list) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
        raise ModelLoadError(f"{path}: token_ids must be a list of ids in 0..{vocab_size - 1}")
    if len(set(ids)) != len(ids):
        raise ModelLoadError(f"{path}: token_ids repeats an id")
    return ids


class DraftVocab:
    """Scores drafts over ``token_ids`` only, with the ``lm_head`` of ``model`` (the target for the
    head drafters, the draft model for itself): ``project(h)`` gives the full-vocabulary logits
    ``(..., V)`` with the subset's values and ``-inf`` elsewhere, so argmax, top-k and sampling
    downstream work unchanged. The subset's values are :meth:`Transformer.project`'s bit for bit
    where the few-row kernel computes both (each logit is the same FMA chain over ``d``)."""

    def __init__(self, model: LoadedModel, token_ids: list[int]) -> None:
        module = model.module
        weight = module.lm_head.weight.detach()  # (V, d)
        if not token_ids or not all(0 <= t < weight.shape[0] for t in token_ids):
            raise ValueError(f"a draft vocabulary needs token ids in 0..{weight.shape[0] - 1}")
        compact = module._kernel_io[1].detach() if module._kernel_io is not None else weight
        self.ids = torch.tensor(sorted(token_ids), device=weight.device)  # (N,)
        self.weight = weight[self.ids].contiguous()  # (N, d)
        self.compact = compact[self.ids].contiguous()  # (N, d), the rows of the kernels' copy
        self.vocab_size = int(weight.shape[0])

    def __len__(self) -> int:
        return int(self.ids.numel())

    @property
    def kernel_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``((N,) ids, (N, d) rows)`` for :meth:`Transformer.draft_chain`."""
        return self.ids, self.compact

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` -> ``(..., V)`` logits: the subset's, ``-inf`` elsewhere (the rows read as
        :meth:`Transformer.project` reads the whole head)."""
        sub = project_rows(h, self.compact, self.weight)  # (..., N)
        out = torch.full((*h.shape[:-1], self.vocab_size), float("-inf"), dtype=sub.dtype, device=h.device)
        out[..., self.ids] = sub
        return out


def projector(model: LoadedModel, vocab: DraftVocab | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``(..., d) -> (..., V)`` logits with ``model``'s ``lm_head``: over ``vocab`` if given
    (:meth:`DraftVocab.project`), else the whole vocabulary (:meth:`Transformer.project`)."""
    return vocab.project if vocab is not None else model.module.project


def head_rows(model: LoadedModel, vocab: DraftVocab | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``((N,) ids or None, (N, d) rows)`` of ``model``'s ``lm_head`` that a one-call greedy
    chain scores: ``vocab``'s (:attr:`DraftVocab.kernel_rows`), else the whole head as the
    kernels read it (ids None: row r is token r)."""
    if vocab is not None:
        return vocab.kernel_rows
    module = model.module
    return None, module._kernel_io[1] if module._kernel_io is not None else module.lm_head.weight


def draft_pass(
    model: LoadedModel,
    vocab: DraftVocab | None,
    tokens: torch.Tensor,  # (1, T)
    pos: torch.Tensor,  # (T,) or (1, T)
    cache: KVCache,
    num_logits: int,
    **kwargs: Any,  # attn_mask, cache_slots, kv_len: as Transformer.forward
) -> torch.Tensor:
    """One pass of a draft model over ``tokens``; logits ``(num_logits, V)`` of the last tokens,
    over ``vocab`` if given (``-inf`` outside it; the full ``lm_head`` product is skipped)."""
    if vocab is None or num_logits == 0:
        logits: torch.Tensor = model.step(tokens, pos, cache, num_logits=num_logits, **kwargs)[0]  # (num_logits, V)
        return logits
    _, hidden = model.step(tokens, pos, cache, num_logits=0, return_hidden=True, **kwargs)  # (1, T, d)
    return vocab.project(hidden[0, hidden.shape[1] - num_logits :])


def resolve_draft_vocab(
    target: LoadedModel, size: int | DraftVocab | None, scorer: LoadedModel | None = None
) -> DraftVocab | None:
    """The draft vocabulary a drafter uses: ``size`` most frequent tokens of the target's
    ``draft_vocab.json``, scored by ``scorer``'s ``lm_head`` (default: the target's). None (the
    default): a quarter of the vocabulary where the file exists, else the full vocabulary; 0 or
    at least the vocabulary size: the full vocabulary."""
    if isinstance(size, DraftVocab):
        return size
    from specdec.drafters.locate import draft_vocab_folder

    vocab_size, folder = target.config.vocab_size, draft_vocab_folder(target)
    if size is None:
        if not (folder / DRAFT_VOCAB_FILE).is_file():
            return None
        size = max(1, vocab_size // 4)
    if size < 0:
        raise ValueError(f"--draft-vocab must be >= 0, got {size}")
    if size == 0 or size >= vocab_size:
        return None
    return DraftVocab(scorer or target, read_draft_vocab(folder, vocab_size)[:size])
