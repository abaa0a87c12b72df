"""Read GGUF files (llama.cpp's format) into specdec: configuration, weights and tokenizer.

The container is read by :mod:`specdec.models.gguf_file` (memory-mapped, with the ``gguf``
library's constants). Its metadata
(``general.architecture``, ``{arch}.block_count``, ``{arch}.embedding_length``, ...) becomes a
:class:`ModelConfig`, its tensors (``token_embd.weight``, ``blk.N.attn_q.weight``, ...) a state dict
with Hugging Face names, dequantized at load (:mod:`specdec.models.gguf_quants`) or, for a
quantized model on the CPU, its matrices kept in their block formats
(:class:`~specdec.kernels.quant.QuantWeight`, run by the kernels of :mod:`specdec.kernels.quant`), and its
``tokenizer.ggml.*`` fields a tokenizer (:mod:`specdec.models.gguf_tokenizer`).

llama.cpp's converter reorders the rows of ``attn_q`` / ``attn_k`` for the ``llama`` architecture
(it pairs rotary dimension i with i + 1, Hugging Face pairs i with i + D/2); :func:`unpermute_rows`
puts them back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdec import kernels
from specdec.kernels.quant import FORMATS, QuantWeight, q5_0_as_q8_0
from specdec.models.config import ModelConfig, ModelLoadError
from specdec.models.gguf_file import TensorInfo, read_gguf
from specdec.models.gguf_quants import DEQUANTIZERS, dequantize
from specdec.models.gguf_tokenizer import tokenizer_from_metadata
from specdec.models.tokenizer import Tokenizer
from specdec.options import get_options

# general.architecture -> (Hugging Face architecture, q/k rows permuted by the converter).
# Mistral and SmolLM files say "llama".
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
}

# GGUF tensor name inside blk.N -> Hugging Face name inside model.layers.N
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 frequency factors: inv_freq is divided by them


@dataclass
class GGUFModel:
    """What a GGUF file holds, ready for :func:`specdec.models.loading.load_model`."""

    config: ModelConfig
    state: dict[str, torch.Tensor | QuantWeight]  # Hugging Face names -> tensors in the requested dtype
    # (or, loaded quantized, the matrices in a kernel format as their blocks)
    tokenizer: Tokenizer | None
    rope_factors: torch.Tensor | None  # (D/2,) float32, or None


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str], path: Path) -> ModelConfig:
    """The :class:`ModelConfig` the metadata describes; refuses architectures, RoPE variants and
    layouts specdec does not run."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r}; specdec loads {supported}")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    hidden, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        raise ModelLoadError(f"{path}: per-layer key/value head counts are not supported")
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // n_heads))
    rot_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rot_dim != head_dim:
        raise ModelLoadError(
            f"{path}: partial rotary embeddings ({rot_dim} of {head_dim} dims) are not supported"
        )
    tokens = meta.get("tokenizer.ggml.tokens") or []
    vocab = int(meta.get(f"{arch}.vocab_size", len(tokens)) or 0)
    if vocab <= 0:
        raise ModelLoadError(f"{path}: GGUF metadata gives no vocabulary size")
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    hf_arch, _ = ARCHITECTURES[arch]
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, arch, path),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "eos_token_id": list(dict.fromkeys(int(e) for e in eos)),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "gguf_file_type": meta.get("general.file_type"),
    }
    return ModelConfig.from_dict(cfg)


def _rope_scaling(meta: dict[str, Any], arch: str, path: Path) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if kind == "none" and factor not in (None, 1.0):
        kind = "linear"  # older files: rope.scale_linear alone
    if kind == "none":
        return None
    if kind != "linear":
        raise ModelLoadError(
            f"{path}: unsupported RoPE scaling {kind!r} (specdec runs linear and Llama 3 factors)"
        )
    return {"rope_type": "linear", "factor": float(factor or 1.0)}


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: within each head its converter interleaves the two rotary
    halves (rows 0, D/2, 1, D/2 + 1, ...); Hugging Face keeps the halves apart. ``weight`` is
    ``(H * D, d)`` (or a bias ``(H * D,)``)."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face state-dict name of a GGUF tensor, or None for a name specdec does not use."""
    stem, _, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in TOP_TENSORS:
        return f"{TOP_TENSORS[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{kind}"
    return None


def read_tensor(tensor: TensorInfo, path: Path) -> torch.Tensor:
    """One GGUF tensor dequantized to float32, in torch's shape."""
    type_name = tensor.type_name
    if type_name not in DEQUANTIZERS:
        supported = ", ".join(DEQUANTIZERS)
        raise ModelLoadError(
            f"{path}: tensor {tensor.name} has type {type_name}, which specdec cannot load (it reads {supported})"
        )
    shape = tensor.shape
    try:
        flat = dequantize(tensor.data, type_name, int(np.prod(shape)))
    except ValueError as e:
        raise ModelLoadError(f"{path}: tensor {tensor.name}: {e}") from None
    return flat.reshape(shape)


KERNEL_FORMATS = {name for name, _, _ in FORMATS.values()}


def quantized_matrices(tensors: list[TensorInfo]) -> bool:
    """Whether a GGUF file's large matrices (its decoder layers' products) are stored in block
    formats the kernels run (:data:`~specdec.kernels.quant.FORMATS`): then it loads quantized by default."""
    matrices = [t for t in tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return bool(matrices) and all(t.type_name in KERNEL_FORMATS for t in matrices)


def read_blocks(tensor: TensorInfo) -> torch.Tensor:
    """A 2-D GGUF tensor in a kernel format as its blocks, ``(N, row_bytes)`` uint8, copied out of the file."""
    N, _ = tensor.shape
    return torch.from_numpy(np.array(tensor.data).reshape(N, -1))


def quant_type(type_name: str) -> int:
    """The GGML type id of a kernel format's name."""
    return next(type_id for type_id, (name, _, _) in FORMATS.items() if name == type_name)


def load_gguf(path: Path, dtype: torch.dtype, quantized: bool | None = False) -> GGUFModel:
    """Configuration, weights and tokenizer of the GGUF file ``path``: weights dequantized to
    ``dtype``, or with ``quantized`` every 2-D matrix stored in a kernel format kept as its blocks
    (a :class:`QuantWeight`; norms and other tensors in float32; Q5_0 blocks become the Q8_0
    blocks of the same weights, :func:`~specdec.kernels.quant.q5_0_as_q8_0`). ``quantized=None``:
    quantized where the file's layer matrices all are (:func:`quantized_matrices`)."""
    contents = read_gguf(path)
    # read once per load: every matrix of the model alike (8-bit rows are the kernels' products)
    q8_rows = get_options().q8_rows and kernels.load() is not None
    if quantized is None:
        quantized = quantized_matrices(contents.tensors)
    meta = contents.metadata
    names = {t.name for t in contents.tensors}
    cfg = config_from_metadata(meta, names, path)
    _, permuted = ARCHITECTURES[cfg.model_type]
    state: dict[str, torch.Tensor | QuantWeight] = {}
    rope_factors = None
    for tensor in contents.tensors:
        if tensor.name == ROPE_FREQS:
            rope_factors = read_tensor(tensor, path)
            continue
        name = hf_name(tensor.name)
        if name is None:
            raise ModelLoadError(f"{path}: unexpected tensor {tensor.name!r} for a {cfg.model_type} model")
        keep = quantized and len(tensor.shape) == 2 and tensor.type_name in KERNEL_FORMATS
        value = read_blocks(tensor) if keep else read_tensor(tensor, path)  # blocks: (N, row_bytes)
        if permuted and ".q_proj." in name:
            value = unpermute_rows(value, cfg.num_attention_heads)  # blocks are row-wise: rows move whole
        elif permuted and ".k_proj." in name:
            value = unpermute_rows(value, cfg.num_key_value_heads)
        if keep:
            N, K = tensor.shape
            weight = QuantWeight(value.contiguous(), quant_type(tensor.type_name), (N, K))
            weight = q5_0_as_q8_0(weight) if weight.name == "Q5_0" else weight  # same weights, 2x faster
            state[name] = weight.with_q8_rows() if q8_rows else weight
        else:
            state[name] = value.to(torch.float32 if quantized else dtype)
    tokenizer = tokenizer_from_metadata(meta) if "tokenizer.ggml.model" in meta else None
    return GGUFModel(cfg, state, tokenizer, rope_factors)


def gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer stored in the GGUF file ``path`` (without reading its weights)."""
    path = Path(path)
    meta = read_gguf(path).metadata
    if "tokenizer.ggml.model" not in meta:
        raise ModelLoadError(f"{path}: the GGUF file holds no tokenizer")
    return tokenizer_from_metadata(meta)
