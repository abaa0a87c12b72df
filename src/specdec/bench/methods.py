"""The decoding methods a benchmark compares, behind one call: ``generate(prompt_ids, n)``.

* ``plain`` — :class:`~specdec.SpeculativeGenerator` without a drafter (our baseline);
* ``hf`` — ``transformers`` ``AutoModelForCausalLM.generate``, greedy (``do_sample=False``);
* ``hf-assisted`` — the same with ``assistant_model=`` the draft (HF's own draft schedule;
  Gante 2023, "Assisted generation"); a draft with another vocabulary drafts through text, HF's
  universal assisted generation (:mod:`specdec.bench.hf_universal`);
* ``hf-lookup`` — the same with ``prompt_lookup_num_tokens=K`` (prompt lookup decoding,
  Saxena 2023: drafts copied from n-gram matches in the context);
* ``llama.cpp``, ``llama.cpp-lookup``, ``llama.cpp-spec`` — llama.cpp's programs on the target's
  GGUF file, where a build is given (:mod:`specdec.bench.llama_cpp`);
* any name in :data:`specdec.drafters.registry.DRAFTERS` (``draft``, ``adaptive``, ...);
  ``NAME@K`` overrides its number of draft tokens (``draft@8``), ``NAME@KxW`` also sets a
  tree width (``draft@4x2``: a tree of depth 4 with 2 children per expanded node);
* ``draft+parallel``, ``draft@K+parallel`` — ``draft`` drafting in a thread of its own while the
  target verifies (``SpeculativeGenerator(..., parallel=True)``, :mod:`specdec.engine.parallel`);
  only ``draft`` as a chain of a draft model with the target's vocabulary can.

The grammar is ``NAME[@K[xW]][+parallel]``. Threads: the bench's ``--threads N`` (default: torch's)
is what each row may use. A parallel row splits it: the target verifies on ``max(1, N - 1)``
torch threads and the draft thread runs one, so at ``N >= 2`` it uses the same cores as the
sequential rows; at ``N = 1`` it cannot, and uses two (1 + 1).

Every method decodes greedily, ignores EOS (all produce exactly ``n`` tokens unless the
context ends) and runs in the target's dtype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch

from specdec.drafters.registry import DRAFTERS, DrafterSpec, make_drafter
from specdec.engine import SpecStats, SpeculativeGenerator
from specdec.models.loading import LoadedModel
from specdec.sampling import SamplingParams

GREEDY = SamplingParams()

HF_METHODS = ("hf", "hf-assisted", "hf-lookup")
PARALLEL = "parallel"  # the suffix of the methods that draft while the target verifies
PARALLEL_DRAFTERS = ("draft",)  # the drafters that can (a plain chain of a draft model)


class MethodSpec(NamedTuple):
    """A parsed method name: ``draft@4x2`` -> ``MethodSpec("draft", 4, 2, False)``."""

    base: str
    num_draft_tokens: int
    tree_width: int
    parallel: bool = False


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
    """A :class:`~specdec.SpeculativeGenerator`; ``target_threads``: the torch threads its
    generations run on (None: the process's), restored after each."""

    def __init__(self, name: str, generator: SpeculativeGenerator, target_threads: int | None = None) -> None:
        self.name = name
        self.generator = generator
        self.target_threads = target_threads

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingParams = GREEDY,
        seed: int = 0,
        text: str | None = None,
    ) -> Run:
        threads = torch.get_num_threads()
        if self.target_threads is not None:
            torch.set_num_threads(self.target_threads)
        try:
            start, cpu = time.perf_counter(), time.process_time()
            out = self.generator.generate(
                prompt_ids, max_new_tokens=max_new_tokens, ignore_eos=True, seed=seed, temperature=sampling.temperature,
                top_k=sampling.top_k, top_p=sampling.top_p,
            )  # fmt: skip
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        finally:
            torch.set_num_threads(threads)
        return Run(out.token_ids, wall, cpu, out.stats)


class HFMethod:
    """``transformers`` generation, optionally assisted by a draft model or by prompt lookup;
    ``tokenizers``: the target's and the draft's HF tokenizers, for a draft of another
    vocabulary (universal assisted generation, :mod:`specdec.bench.hf_universal`)."""

    def __init__(
        self,
        name: str,
        model,
        assistant=None,
        prompt_lookup: int | None = None,
        tokenizers: tuple[Any, Any] | None = None,
    ) -> None:  # type: ignore[no-untyped-def]
        self.name = name
        self.model = model
        self.assistant = assistant
        self.prompt_lookup = prompt_lookup
        self.tokenizers = tokenizers

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
            kwargs.update(
                temperature=sampling.temperature, top_k=sampling.top_k or 0, top_p=sampling.top_p or 1.0
            )
            torch.manual_seed(seed)  # HF samples from torch's global generators
        if self.assistant is not None:
            kwargs["assistant_model"] = self.assistant
        if self.tokenizers is not None:
            kwargs["tokenizer"], kwargs["assistant_tokenizer"] = self.tokenizers
        if self.prompt_lookup is not None:
            kwargs["prompt_lookup_num_tokens"] = self.prompt_lookup
        start, cpu = time.perf_counter(), time.process_time()
        out = self.model.generate(ids, **kwargs)  # (1, T + n)
        if out.is_cuda:
            torch.cuda.synchronize()  # the last step's kernels may still run
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        return Run(out[0, ids.shape[1] :].tolist(), wall, cpu, None)


def load_hf(path: str, dtype: torch.dtype, device: torch.device, embeddings_from: Any = None):  # type: ignore[no-untyped-def]
    """``transformers``' model of a Hugging Face folder or, for a ``.gguf`` file, its own GGUF
    loading (``from_pretrained(folder, gguf_file=name)``, dequantized to ``dtype``). A draft that
    borrows its target's embeddings (:func:`specdec.models.loading.load_model`) gets those of
    ``embeddings_from``, the target's ``transformers`` model."""
    import transformers
    from transformers import AutoModelForCausalLM

    from specdec.models.loading import BORROWED

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    file = Path(path)
    model: Any
    if file.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if getattr(model.config, BORROWED, None) == "target":
            if embeddings_from is None:
                raise ValueError(f"{path} uses its target's embedding table: it drafts only for its target")
            model.set_input_embeddings(embeddings_from.get_input_embeddings())
            model.set_output_embeddings(embeddings_from.get_output_embeddings())
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, like ours
    return model


def available_methods(llama_cpp: bool = False) -> list[str]:
    """Every method name known now: the Hugging Face baselines, ``plain``, the drafters and,
    with a llama.cpp build, llama.cpp's programs."""
    from specdec.bench.llama_cpp import LLAMA_CPP_METHODS

    return [*HF_METHODS, "plain", *DRAFTERS, *(LLAMA_CPP_METHODS if llama_cpp else ())]


def parse_method(name: str, default_k: int) -> MethodSpec:
    """``draft@8`` -> ``("draft", 8, 1, False)``; ``medusa@4x3`` -> ``("medusa", 4, 3, False)``
    (K, tree width); ``draft@4+parallel`` -> ``("draft", 4, 1, True)``; ``draft`` ->
    ``("draft", default_k, 1, False)``. Raises ValueError (one line) for anything else."""
    spelled, plus, suffix = name.partition("+")
    if plus and suffix != PARALLEL:
        raise ValueError(
            f"method {name!r}: write NAME[@K]+{PARALLEL} ({PARALLEL} is the only suffix, written last)"
        )
    base, _, k_and_width = spelled.partition("@")
    known = available_methods(llama_cpp=True)
    if base not in known:
        raise ValueError(f"unknown method {base!r}; choose from {', '.join(known)}")
    k, width = default_k, 1
    if k_and_width:
        k_text, x, width_text = k_and_width.partition("x")
        width_text = width_text if x else "1"
        if not (k_text.isdigit() and width_text.isdigit() and int(k_text) >= 1 and int(width_text) >= 1):
            raise ValueError(f"method {name!r}: write NAME@K or NAME@KxW with integers K, W >= 1")
        k, width = int(k_text), int(width_text)
    if plus and (base not in PARALLEL_DRAFTERS or width != 1):
        raise ValueError(
            f"method {name!r}: only a chain of a draft model drafts in parallel "
            f"({', '.join(f'{d}+{PARALLEL}, {d}@K+{PARALLEL}' for d in PARALLEL_DRAFTERS)})"
        )
    return MethodSpec(base, k, width, bool(plus))


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

    base, k, width, parallel = parse_method(name, default_k)
    if base in LLAMA_CPP_METHODS:
        if llama_cpp is None:
            raise ValueError(f"{base} needs a llama.cpp build: --llama-cpp DIR")
        draft_path = Path(draft).expanduser()
        return LlamaCppMethod(
            name, llama_cpp, Path(target.path), draft_path if draft_path.is_file() else None, k
        )
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
            hf_cache["draft_path"] = draft_path if draft_path.is_file() else resolve_path(draft)
            hf_cache["draft"] = load_hf(
                str(hf_cache["draft_path"]), target.dtype, target.device, embeddings_from=hf_cache["target"]
            )
        if hf_cache["draft"].config.vocab_size == hf_cache["target"].config.vocab_size:
            return HFMethod(name, hf_cache["target"], hf_cache["draft"])
        # another vocabulary (HF's own test: the sizes differ): drafts through text
        from specdec.bench.hf_universal import enable_universal_assisted, hf_tokenizer

        tokenizers = (hf_tokenizer(Path(target.path)), hf_tokenizer(hf_cache["draft_path"]))
        enable_universal_assisted(hf_cache["target"])
        return HFMethod(name, hf_cache["target"], hf_cache["draft"], tokenizers=tokenizers)
    dtype = str(target.dtype).removeprefix("torch.")
    drafter = make_drafter(
        "none" if base == "plain" else base,
        DrafterSpec(target, draft, k, dtype, tree_width=width, draft_vocab=draft_vocab),
    )
    if not parallel:
        return SpecdecMethod(name, SpeculativeGenerator(target, drafter))
    if drafter is None or not drafter.capabilities.batchable:  # (parse_method let only draft chains through)
        raise ValueError(
            f"method {name!r}: parallel drafting needs a draft with the target's vocabulary "
            f"(this one drafts through text: {type(drafter).__name__})"
        )
    generator = SpeculativeGenerator(target, drafter, parallel=True)
    return SpecdecMethod(name, generator, parallel_target_threads())


def parallel_target_threads() -> int:
    """The torch threads of a parallel row's target: the process's budget less the draft
    thread's one (at least one; the module docstring's rule)."""
    return max(1, torch.get_num_threads() - 1)
