"""The decoding methods a benchmark compares, behind one call: ``generate(prompt_ids, n)``.

* ``plain`` — :class:`~specdec.SpeculativeGenerator` without a drafter (our baseline);
* ``hf`` — ``transformers`` ``AutoModelForCausalLM.generate``, greedy (``do_sample=False``);
* ``hf-assisted`` — the same with ``assistant_model=`` the draft (HF's own draft schedule;
  Gante 2023, "Assisted generation");
* ``hf-lookup`` — the same with ``prompt_lookup_num_tokens=K`` (prompt lookup decoding,
  Saxena 2023: drafts copied from n-gram matches in the context);
* ``llama.cpp``, ``llama.cpp-lookup``, ``llama.cpp-spec`` — llama.cpp's programs on the target's
  GGUF file, where a build is given (:mod:`specdec.bench.llama_cpp`);
* any name in :data:`specdec.drafters.registry.DRAFTERS` (``draft``, ``adaptive``, ...);
  ``NAME@K`` overrides its number of draft tokens (``draft@8``), ``NAME@KxW`` also sets a
  tree width (``draft@4x2``: a tree of depth 4 with 2 children per expanded node).

Every method decodes greedily, ignores EOS (all produce exactly ``n`` tokens unless the
context ends) and runs in the target's dtype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from specdec.drafters.registry import DRAFTERS, DrafterSpec, make_drafter
from specdec.engine import SpecStats, SpeculativeGenerator
from specdec.models.loading import LoadedModel
from specdec.sampling import SamplingParams

GREEDY = SamplingParams()

HF_METHODS = ("hf", "hf-assisted", "hf-lookup")


@dataclass(frozen=True)
class Run:
    """One timed generation."""

    token_ids: list[int] | None  # None where the method does not give them (llama.cpp)
    wall_s: float
    cpu_s: float  # process CPU time: immune to preemption by other processes (1 thread); 0: not measured
    stats: SpecStats | None  # None for the Hugging Face and llama.cpp methods
    new_tokens: int | None = None  # None: len(token_ids)
    drafted: int | None = None  # draft tokens proposed / accepted, for peers that print only counts
    accepted: int | None = None

    @property
    def num_tokens(self) -> int:
        """New tokens generated."""
        if self.new_tokens is not None:
            return self.new_tokens
        return len(self.token_ids or [])


class Method(Protocol):
    name: str

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingParams = GREEDY,
        seed: int = 0,
        text: str | None = None,
    ) -> Run:
        """Generate ``max_new_tokens`` after ``prompt_ids``; ``text`` is the same prompt as text
        (used by peers that tokenize themselves)."""


class SpecdecMethod:
    def __init__(self, name: str, generator: SpeculativeGenerator) -> None:
        self.name = name
        self.generator = generator

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingParams = GREEDY,
        seed: int = 0,
        text: str | None = None,
    ) -> Run:
        start, cpu = time.perf_counter(), time.process_time()
        out = self.generator.generate(
            prompt_ids, max_new_tokens=max_new_tokens, ignore_eos=True, seed=seed, temperature=sampling.temperature,
            top_k=sampling.top_k, top_p=sampling.top_p,
        )  # fmt: skip
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        return Run(out.token_ids, wall, cpu, out.stats)


class HFMethod:
    """``transformers`` generation, optionally assisted by a draft model or by prompt lookup."""

    def __init__(self, name: str, model, assistant=None, prompt_lookup: int | None = None) -> None:  # type: ignore[no-untyped-def]
        self.name = name
        self.model = model
        self.assistant = assistant
        self.prompt_lookup = prompt_lookup

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingParams = GREEDY,
        seed: int = 0,
        text: str | None = None,
    ) -> Run:
        ids = torch.tensor([prompt_ids], device=self.model.device)  # (1, T)
        kwargs = dict(
            attention_mask=torch.ones_like(ids),
            do_sample=not sampling.greedy,
            max_new_tokens=max_new_tokens,
            eos_token_id=None,
            pad_token_id=0,
        )
        if not sampling.greedy:  # our processing: no top-k / top-p unless asked (HF's default top-k is 50)
            kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k or 0, top_p=sampling.top_p or 1.0)
            torch.manual_seed(seed)  # HF samples from torch's global generators
        if self.assistant is not None:
            kwargs["assistant_model"] = self.assistant
        if self.prompt_lookup is not None:
            kwargs["prompt_lookup_num_tokens"] = self.prompt_lookup
        start, cpu = time.perf_counter(), time.process_time()
        out = self.model.generate(ids, **kwargs)  # (1, T + n)
        if out.is_cuda:
            torch.cuda.synchronize()  # the last step's kernels may still run
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        return Run(out[0, ids.shape[1] :].tolist(), wall, cpu, None)


def load_hf(path: str, dtype: torch.dtype, device: torch.device):  # type: ignore[no-untyped-def]
    """``transformers``' model of a Hugging Face folder or, for a ``.gguf`` file, its own GGUF
    loading (``from_pretrained(folder, gguf_file=name)``, dequantized to ``dtype``)."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    file = Path(path)
    model: Any
    if file.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, like ours
    return model


def available_methods(llama_cpp: bool = False) -> list[str]:
    """Every method name known now: the Hugging Face baselines, ``plain``, the drafters and,
    with a llama.cpp build, llama.cpp's programs."""
    from specdec.bench.llama_cpp import LLAMA_CPP_METHODS

    return [*HF_METHODS, "plain", *DRAFTERS, *(LLAMA_CPP_METHODS if llama_cpp else ())]


def parse_method(name: str, default_k: int) -> tuple[str, int, int]:
    """``draft@8`` -> ``("draft", 8, 1)``; ``medusa@4x3`` -> ``("medusa", 4, 3)`` (K, tree width);
    ``draft`` -> ``("draft", default_k, 1)``."""
    base, _, suffix = name.partition("@")
    known = available_methods(llama_cpp=True)
    if base not in known:
        raise ValueError(f"unknown method {base!r}; choose from {', '.join(known)}")
    if not suffix:
        return base, default_k, 1
    k, x, width = suffix.partition("x")
    width = width if x else "1"
    if not (k.isdigit() and width.isdigit() and int(k) >= 1 and int(width) >= 1):
        raise ValueError(f"method {name!r}: write NAME@K or NAME@KxW with integers K, W >= 1")
    return base, int(k), int(width)


def build_method(  # type: ignore[type-arg]
    name: str,
    target: LoadedModel,
    draft: str,
    default_k: int,
    hf_cache: dict,
    draft_vocab: int | None = None,
    llama_cpp: Path | None = None,
) -> Method:
    """Build one method. ``hf_cache`` shares the loaded HF models between ``hf`` methods;
    ``llama_cpp``: the folder of a llama.cpp build (its methods are refused without one)."""
    from specdec.bench.llama_cpp import LLAMA_CPP_METHODS, LlamaCppMethod

    base, k, width = parse_method(name, default_k)
    if base in LLAMA_CPP_METHODS:
        if llama_cpp is None:
            raise ValueError(f"{base} needs a llama.cpp build: --llama-cpp DIR")
        draft_path = Path(draft).expanduser()
        return LlamaCppMethod(name, llama_cpp, Path(target.path), draft_path if draft_path.is_file() else None, k)
    if base in HF_METHODS:
        if "target" not in hf_cache:
            hf_cache["target"] = load_hf(str(target.path), target.dtype, target.device)
        if base == "hf":
            return HFMethod(name, hf_cache["target"])
        if base == "hf-lookup":
            return HFMethod(name, hf_cache["target"], prompt_lookup=k)
        if "draft" not in hf_cache:
            from specdec.models.loading import resolve_path

            draft_path = Path(draft).expanduser()
            hf_draft = load_hf(str(draft_path if draft_path.is_file() else resolve_path(draft)), target.dtype, target.device)
            if hf_draft.config.vocab_size != hf_cache["target"].config.vocab_size:
                raise ValueError(
                    f"the draft's vocabulary ({hf_draft.config.vocab_size}) is not the target's "
                    f"({hf_cache['target'].config.vocab_size})"
                )
            hf_cache["draft"] = hf_draft
        return HFMethod(name, hf_cache["target"], hf_cache["draft"])
    dtype = str(target.dtype).removeprefix("torch.")
    drafter = make_drafter(
        "none" if base == "plain" else base,
        DrafterSpec(target, draft, k, dtype, tree_width=width, draft_vocab=draft_vocab),
    )
    return SpecdecMethod(name, SpeculativeGenerator(target, drafter))
