"""What every engine does the same way for a request: validation, seeding, EOS, hidden rows.

The single-sequence :class:`~specdec.engine.SpeculativeGenerator` and the batched server's
:class:`~specdec.serving.batch_engine.BatchEngine` both call these, so a request gives the same
tokens, the same errors and the same draws of its seeded generator in either.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from specdec.models.loading import LoadedModel
from specdec.sampling import SamplingParams
from specdec.verify.chain import VerifyResult


class GenerationError(ValueError):
    """A request the engine cannot serve (a user-facing error)."""


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None) -> SamplingParams:
    """Sampling parameters from user input; :class:`GenerationError` names what is wrong."""
    try:
        return SamplingParams(float(temperature), top_k, top_p)
    except (TypeError, ValueError) as e:
        raise GenerationError(str(e)) from None


def check_request(prompt_ids: list[int], max_new_tokens: int, vocab_size: int, context_len: int) -> None:
    """Refuse a negative or non-integer ``max_new_tokens`` and a bad prompt (:func:`check_prompt`)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")
    check_prompt(prompt_ids, vocab_size, context_len)


def check_prompt(prompt_ids: list[int], vocab_size: int, context_len: int) -> None:
    """Refuse an empty prompt, token ids outside the vocabulary and a prompt that fills the
    context (:class:`GenerationError`)."""
    if not prompt_ids:
        raise GenerationError("the prompt is empty")
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
        raise GenerationError(f"prompt token ids must lie in [0, {vocab_size})")
    if len(prompt_ids) >= context_len:
        raise GenerationError(
            f"the prompt has {len(prompt_ids)} tokens; the model's context is {context_len} tokens"
        )


def request_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """The request's own random generator: seeded by ``seed``, or from torch's global one."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))
    return generator


def eos_token_ids(target: LoadedModel) -> frozenset[int]:
    """The config's EOS ids and the tokenizer's, if it names one."""
    eos = set(target.config.eos_token_ids)
    if target.tokenizer is not None and target.tokenizer.eos_token_id is not None:
        eos.add(target.tokenizer.eos_token_id)
    return frozenset(eos)


def cut_at_eos(
    new: list[int], kinds: list[str], eos: frozenset[int]
) -> tuple[list[int], list[str], bool]:
    """``new`` and ``kinds`` up to (without) the first EOS token, and whether there was one."""
    eos_at = next((i for i, t in enumerate(new) if t in eos), None)
    if eos_at is None:
        return new, kinds, False
    return new[:eos_at], kinds[:eos_at], True


def with_accepted_hidden(result: VerifyResult, hidden: torch.Tensor | None) -> VerifyResult:
    """``result`` carrying the target's hidden states of the pending token and the accepted
    drafts: rows ``0`` and ``1 + i`` for ``i`` on the accepted path of ``hidden`` ``(T, d)``."""
    if hidden is None:
        return result
    rows = [0, *(1 + i for i in result.accepted_path)]
    return replace(result, target_hidden=hidden[rows])  # (num_accepted + 1, d)
