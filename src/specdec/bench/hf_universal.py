"""``hf-assisted`` with a draft of another vocabulary: Hugging Face's universal assisted generation.

``transformers`` runs it when ``generate`` gets ``assistant_model=`` a draft whose vocabulary size
differs from the target's, with ``tokenizer=`` and ``assistant_tokenizer=`` (Timor et al. 2025,
"Accelerating LLM inference with lossless speculative decoding algorithms for heterogeneous
vocabularies"; HF blog "Universal assisted generation", 2024). Greedy, the draft drafts after the
committed text retokenised for it, and its drafts are retokenised for the target
(``AssistedCandidateGeneratorDifferentTokenizers``); sampled, it drafts only tokens whose text
both vocabularies hold (``UniversalSpeculativeDecodingGenerator``, token-level intersection).

The greedy generator of ``transformers`` 5.x records the *target's* length as the last drafted
length, which the next round compares with the *draft's* input to crop the draft's KV cache. A
draft whose tokens are shorter than the target's (demo-draft for SmolLM2) then never gets its
cache cropped: rejected drafts stay in it, and once the cache is as long as the draft's input,
the draft's next pass gets no token (``RuntimeError: cannot reshape tensor of 0 elements``).
:func:`enable_universal_assisted` makes a target's ``generate`` use a subclass that crops the
draft's cache to the tokens it still shares with the draft's new input, the rule of
same-vocabulary assisted generation; drafting and verification are HF's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

MARK = "_specdec_universal_assisted"  # set on a target whose generate uses the cropping generator


def hf_tokenizer(path: Path) -> Any:
    """``transformers``' own tokenizer of a model folder or, for a ``.gguf`` file, the one its
    GGUF loading builds from the file's metadata."""
    from transformers import AutoTokenizer

    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def _cropping_class() -> type:
    """The greedy different-tokenizers generator with the draft cache cropped to what it shares
    with the draft's next input (see the module docstring)."""
    from transformers.generation.candidate_generator import AssistedCandidateGeneratorDifferentTokenizers

    class CroppingDifferentTokenizers(AssistedCandidateGeneratorDifferentTokenizers):  # type: ignore[misc]
        cached_ids: torch.Tensor | None = None  # (C,) the draft tokens whose keys / values the cache holds

        def get_candidates(
            self, input_ids: torch.LongTensor, **kwargs: Any
        ) -> tuple[torch.LongTensor, torch.Tensor]:
            out = super().get_candidates(input_ids, **kwargs)
            cache: Any = self.assistant_kwargs.get("cache")
            if cache is not None and self.prev_assistant_ids is not None:
                # (cloned: the next round edits prev_assistant_ids in place)
                self.cached_ids = self.prev_assistant_ids[0, : cache.get_seq_length()].clone()
            return out

        def _update_past_and_masks(
            self, assistant_input_ids: torch.LongTensor, num_extra_tokens_to_remove: int = 0
        ) -> bool:
            cache: Any = self.assistant_kwargs.get("cache")
            if cache is not None and self.cached_ids is not None:
                new = assistant_input_ids[0]  # (T,)
                n = min(len(self.cached_ids), len(new) - 1)  # the last input token is fed again
                shared = int((self.cached_ids[:n] == new[:n]).cumprod(0).sum())
                # the parent crops _last_ids_length - T + extra tokens: make that the unshared ones
                remove = cache.get_seq_length() - shared
                self._last_ids_length = remove + len(new) - num_extra_tokens_to_remove
            return bool(super()._update_past_and_masks(assistant_input_ids, num_extra_tokens_to_remove))

    return CroppingDifferentTokenizers


def enable_universal_assisted(model: Any) -> None:
    """Make ``model.generate``'s greedy universal assisted generation crop the draft's cache
    (idempotent; assisted generation with a shared vocabulary and the other modes are unchanged)."""
    if getattr(model, MARK, False):
        return
    cropping = _cropping_class()
    original = model._get_candidate_generator

    def candidate_generator(*args: Any, **kwargs: Any) -> Any:
        generator = original(*args, **kwargs)
        if type(generator) is cropping.__bases__[0]:
            generator.__class__ = cropping
        return generator

    model._get_candidate_generator = candidate_generator
    setattr(model, MARK, True)
