"""Load models into specdec: Hugging Face folders (config.json + safetensors, sharded or not),
GGUF files (:mod:`specdec.models.gguf`) and named models.

``load_model("demo-target")`` resolves the pair shipped inside the package, ``"smollm2"`` the
SmolLM2-135M-Instruct GGUF file (:mod:`specdec.models.sources`), ``"org/name"`` a Hugging Face
Hub repo where it is not a local path; anything else is a folder or ``.gguf`` path.
Unsupported architectures, missing paths and broken checkpoints raise
:class:`ModelLoadError` with a one-line message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from specdec.cache import KVCache
from specdec.kernels.quant import QuantWeight
from specdec.models import cuda_graphs, sources
from specdec.models.config import ModelConfig, ModelLoadError
from specdec.models.llama import Transformer, rope_inv_freq
from specdec.models.tokenizer import Tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED = ("demo-target", "demo-draft")
NAMED = ("smollm2",)  # GGUF files fetched by name (specdec.models.sources)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZED = "quantized"  # GGUF files: keep the file's block formats (CPU; CUDA dequantizes)


@dataclass
class LoadedModel:
    """A model ready to decode: the module, its configuration, tokenizer and folder."""

    module: Transformer
    config: ModelConfig
    tokenizer: Tokenizer | None
    path: Path
    # CUDA graphs of this model's chain passes (see :meth:`step`); None: every pass runs eagerly.
    graphs: cuda_graphs.GraphedPasses | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' and the cache's dtype (float32 for a quantized model)."""
        return self.module.dtype

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def quantized(self) -> bool:
        """Whether the model runs on a GGUF file's quantized blocks (see :func:`load_model`)."""
        return self.module.quantized

    @property
    def max_seq_len(self) -> int:
        return self.config.max_position_embeddings

    def new_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> KVCache:
        return self.module.new_cache(batch_size, max_seq_len)

    def __post_init__(self) -> None:
        if cuda_graphs.enabled(self.device):
            self.graphs = cuda_graphs.GraphedPasses(self.module)

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.module(*args, **kwargs)

    def step(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache: KVCache, **kwargs: Any):  # type: ignore[no-untyped-def]
        """``self(tokens, input_pos, cache, **kwargs)`` for a decoding step over a cache that
        lives across steps (the engine's, a drafter's): on CUDA a single-sequence chain pass
        replays a graph recorded for its shape (:mod:`specdec.models.cuda_graphs`)."""
        if self.graphs is not None and self.graphs.applies(tokens, kwargs):
            return self.graphs(tokens, input_pos, cache, **kwargs)
        return self.module(tokens, input_pos, cache, **kwargs)


def resolve_path(name_or_path: str | Path) -> Path:
    """The folder or GGUF file a model name stands for: an embedded pair, ``smollm2`` (found or
    fetched), a local folder or ``.gguf`` file, or a Hub repo id ``org/name`` (fetched)."""
    name = str(name_or_path)
    if name in EMBEDDED:
        path = ASSETS / name
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"the embedded model {name!r} is missing from {ASSETS}")
        return path
    if name == "smollm2":
        return sources.smollm2_path()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
        return path.resolve()
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
    if not isinstance(name_or_path, Path) and sources.looks_like_hub_id(name):
        return sources.hub_snapshot(name)
    raise ModelLoadError(f"no such model folder or GGUF file: {path}")


@lru_cache(maxsize=1)
def _cpu_has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def fast_bf16(device: torch.device | str) -> bool:
    """True where bfloat16 matmuls are fast: CUDA, or a CPU with AMX (Sapphire Rapids on).

    Elsewhere (AVX2 / AVX-512 without AMX) PyTorch's bfloat16 matrix-vector products run at a
    fraction of float32's speed (measured here: 5-7 GB/s of weights against 25-30 GB/s).
    """
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and _cpu_has_amx())


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists here (``auto``: the first GPU where torch
    sees one, else the CPU); :class:`ModelLoadError` (one line for the CLI, a 4xx for the
    server) for a name torch does not know or a GPU this machine lacks."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if resolved.type != "cpu":
        try:
            torch.empty(1, device=resolved)  # torch's own check: built for it, present, index in range
        except (RuntimeError, AssertionError) as e:
            text = str(e).strip()
            why = (
                text.splitlines()[0].split(". ")[0][:160] if text else type(e).__name__
            )  # its first sentence
            raise ModelLoadError(f"device {str(device)!r} is not available here: {why}") from None
    return resolved


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig, device: str = "cpu") -> torch.dtype:
    """``auto``: the checkpoint's 16-bit dtype where 16-bit matmuls are fast, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        stored_name = cfg.raw.get("torch_dtype") or cfg.raw.get("dtype") or "float32"  # transformers 5: dtype
        stored = DTYPES.get(str(stored_name), torch.float32)
        return stored if fast_bf16(device) else torch.float32
    if dtype == QUANTIZED:
        raise ModelLoadError(
            "dtype 'quantized' applies to GGUF files; a folder loads in auto, float32, bfloat16, float16"
        )
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}, {QUANTIZED}")
    return DTYPES[dtype]


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    bins = folder / "pytorch_model.bin"
    if bins.is_file():
        return torch.load(bins, map_location="cpu", weights_only=True)  # type: ignore[no-any-return]
    raise ModelLoadError(f"{folder} has no model.safetensors, sharded index or pytorch_model.bin")


BORROWED = "specdec_embeddings"  # config.json key of a draft whose embeddings are its target's


def load_model(
    name_or_path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    embeddings_from: LoadedModel | None = None,
) -> LoadedModel:
    """Load a Llama-family model onto ``device`` (``cpu``, ``cuda``, ``cuda:N``, or ``auto``: a
    GPU where there is one) from a Hugging Face folder, a GGUF file, an embedded name
    (``demo-target``, ``demo-draft``, ``smollm2``) or a Hub id.

    A GGUF file on the CPU keeps its quantized blocks (``dtype="auto"`` where its layer matrices
    are all in a format the kernels run, or ``dtype="quantized"``): memory about the file's
    size, products in float32 on the blocks; ``"float32"`` / ``"bfloat16"`` dequantize at load,
    as every GGUF file on CUDA does.

    A draft folder whose ``config.json`` has ``"specdec_embeddings": "target"`` stores no
    embedding table (nor an untied ``lm_head``, nor tokenizer files): they are its target's,
    given as ``embeddings_from`` (``make_drafter`` does this), so such a draft ships in a few MB."""
    path = resolve_path(name_or_path)
    device = str(resolve_device(device))
    if path.is_file():
        return _load_gguf(path, dtype, device)
    cfg = ModelConfig.from_folder(path)
    torch_dtype = resolve_dtype(dtype, cfg, device)
    state: dict[str, torch.Tensor | QuantWeight] = dict(read_state_dict(path))
    tokenizer = Tokenizer.from_folder(path)
    if cfg.raw.get(BORROWED) == "target":
        state.update(borrowed_embeddings(path, cfg, embeddings_from))
        assert embeddings_from is not None  # (borrowed_embeddings refuses None)
        tokenizer = tokenizer or embeddings_from.tokenizer  # its tokens are the target's
    module = build_module(cfg, state, torch_dtype, device, str(path))
    return LoadedModel(module, cfg, tokenizer, path)


def borrowed_embeddings(path: Path, cfg: ModelConfig, target: LoadedModel | None) -> dict[str, torch.Tensor]:
    """The target's embedding table (and untied ``lm_head``) for a draft in ``path`` that stores
    none, as float32 tensors by Hugging Face name (ModelLoadError without a target of the same
    width and vocabulary)."""
    if target is None:
        raise ModelLoadError(
            f"{path} uses its target's embedding table; run it as the draft of that target "
            f"(--drafter draft --draft {path})"
        )
    tc = target.config
    if (tc.vocab_size, tc.hidden_size) != (cfg.vocab_size, cfg.hidden_size):
        raise ModelLoadError(
            f"{path} needs a target with {cfg.vocab_size} tokens of width {cfg.hidden_size}; "
            f"{target.path.name} has {tc.vocab_size} of width {tc.hidden_size}"
        )
    return embedding_weights(target, cfg.tie_word_embeddings)


def embedding_weights(target: LoadedModel, tied: bool) -> dict[str, torch.Tensor]:
    """``target``'s embedding table (and ``lm_head`` unless ``tied``) as float32 ``(V, d)``
    tensors by Hugging Face name (a quantized table dequantized)."""
    module = target.module
    out = {"model.embed_tokens.weight": module.model.embed_tokens.weight.detach().float()}
    if not tied:
        out["lm_head.weight"] = module.lm_head.weight.detach().float()
    return out


def _load_gguf(path: Path, dtype: str | torch.dtype, device: str) -> LoadedModel:
    from specdec.models.gguf import load_gguf

    on_cpu = torch.device(device).type == "cpu"
    quantized: bool | None = False
    if isinstance(dtype, torch.dtype):
        torch_dtype = dtype
    elif dtype in ("auto", QUANTIZED):  # CUDA dequantizes to bfloat16; the CPU kernels run the blocks
        torch_dtype = torch.float32 if on_cpu else torch.bfloat16
        if on_cpu:
            quantized = None if dtype == "auto" else True  # auto: where the layer matrices all are
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}, {QUANTIZED}")
    contents = load_gguf(path, torch_dtype, quantized)
    cfg, tokenizer = contents.config, contents.tokenizer
    module = build_module(cfg, contents.state, torch_dtype, device, str(path))
    if contents.rope_factors is not None:
        module.inv_freq = (rope_inv_freq(cfg) / contents.rope_factors).to(device)  # (D/2,)
    del contents  # the unfused q/k/v and gate/up tensors go with it
    _release_freed_memory()
    return LoadedModel(module, cfg, tokenizer, path)


def _release_freed_memory() -> None:
    """Hand the heap pages freed by dequantization back to the OS (glibc keeps them otherwise:
    SmolLM2 in float32 would hold about 400 MB more than its weights)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def build_module(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor | QuantWeight],
    torch_dtype: torch.dtype,
    device: str,
    source: str,
) -> Transformer:
    """A fused, inference-ready :class:`Transformer` holding ``state`` (Hugging Face names) in
    ``torch_dtype`` on ``device``; the module is built on the meta device, so no weight is drawn.
    Quantized matrices (:class:`QuantWeight`, CPU only) stay as they are, their layers swapped
    for :class:`~specdec.kernels.quant.QuantLinear` / ``QuantEmbedding``."""
    with torch.device("meta"):
        module = Transformer(cfg)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    elif "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # checkpoint tied in fact
    expected = set(module.state_dict()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    missing = sorted(expected - set(state))
    if missing:
        raise ModelLoadError(f"{source}: checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for key in sorted(expected):
        if tuple(state[key].shape) != shapes[key]:
            got = tuple(state[key].shape)
            raise ModelLoadError(f"{source}: {key} has shape {got}, the configuration gives {shapes[key]}")
    quantized = {k: v for k, v in state.items() if k in expected and isinstance(v, QuantWeight)}
    if quantized and torch.device(device).type != "cpu":
        raise ModelLoadError(
            f"{source}: quantized weights run on the CPU; load with dtype='bfloat16' for {device}"
        )
    floats = {k: v.to(torch_dtype) for k, v in state.items() if k in expected and isinstance(v, torch.Tensor)}
    module.load_state_dict(floats, strict=False, assign=True)
    head = module.lm_head
    if (
        cfg.tie_word_embeddings
        and isinstance(head, torch.nn.Linear)
        and "model.embed_tokens.weight" not in quantized
    ):
        head.weight = module.model.embed_tokens.weight
    module.use_quantized(quantized)
    module.inv_freq = rope_inv_freq(cfg)  # buffers are not in the checkpoint: rebuild off meta
    module = module.to(device).eval().requires_grad_(False)
    module.fuse()
    return module


def check_compatible(target: LoadedModel, draft: LoadedModel) -> None:
    """Refuse a draft whose token ids do not mean what the target's mean."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ModelLoadError(
            f"vocabulary mismatch: target has {tv} tokens, draft has {dv}; "
            "speculative decoding needs a draft with the target's tokenizer"
        )
    if target.tokenizer is not None and draft.tokenizer is not None:
        if target.tokenizer.fingerprint() != draft.tokenizer.fingerprint():
            raise ModelLoadError(
                "vocabulary mismatch: the draft's tokenizer maps tokens to different ids than the target's"
            )
