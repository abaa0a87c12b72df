"""Write a Hugging Face Llama-family checkpoint folder as a GGUF file, e.g. a draft model for
llama.cpp's ``llama-speculative-simple`` beside a GGUF target.

Tensor names, tensor types and the q/k row order follow llama.cpp's ``convert_hf_to_gguf.py``:
``model.layers.N.self_attn.q_proj.weight`` becomes ``blk.N.attn_q.weight``; for the ``llama``
architecture the rows of q/k (weights and biases) are permuted so that the two rotary halves of
each head interleave (:func:`permute_rows`; :func:`specdec.models.gguf.unpermute_rows` undoes it);
1-D tensors (norms, biases) are F32 and matrices take the requested type (``q8_0`` falls back to
F16 for rows that are not whole 32-weight blocks). A tied ``lm_head`` writes no ``output.weight``.

With ``like`` (the target's GGUF file) the file takes the target's ``general.architecture`` and
every ``tokenizer.*`` key with its stored value type: llama.cpp refuses a draft whose vocabulary
or special tokens differ from the target's. The hyper-parameters are the folder's own.

A draft that borrows its target's embedding table (``"specdec_embeddings": "target"`` in its
``config.json``) stores no ``model.embed_tokens.weight`` nor ``lm_head.weight``; they are read from
a GGUF file (``embeddings_from``, by default ``like``), dequantized with ``gguf.quants.dequantize``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from specdec.models.config import ModelConfig
from specdec.models.gguf import ARCHITECTURES, LAYER_TENSORS, ROPE_FREQS, TOP_TENSORS
from specdec.models.loading import BORROWED

# The loader's name tables (specdec.models.gguf), read the other way round.
HF_TO_GGUF = {f"{hf}.weight": f"{name}.weight" for name, hf in TOP_TENSORS.items()}
LAYER = {hf: name for name, hf in LAYER_TENSORS.items()}  # inside model.layers.N -> inside blk.N
# ModelConfig.model_type -> general.architecture (llama.cpp writes Mistral as llama)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
PERMUTED_ARCHS = {arch for arch, (_, permuted) in ARCHITECTURES.items() if permuted}
Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
# dtype -> (general.file_type, type of the matrices)
DTYPES: dict[str, tuple[int, gguf.GGMLQuantizationType]] = {
    "f32": (int(FT.ALL_F32), Q.F32),
    "f16": (int(FT.MOSTLY_F16), Q.F16),
    "q8_0": (int(FT.MOSTLY_Q8_0), Q.Q8_0),
}


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name of a Hugging Face state-dict name (ValueError for one llama.cpp has no
    place for)."""
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    parts = hf_name.split(".", 3)  # model.layers.N.<module>.<weight|bias>
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        module, _, kind = parts[3].rpartition(".")
        if module in LAYER and kind in ("weight", "bias"):
            return f"blk.{parts[2]}.{LAYER[module]}.{kind}"
    raise ValueError(f"tensor {hf_name} has no place in a Llama-family GGUF file")


def permute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order: the two rotary halves of each head interleaved.
    ``weight`` is ``(H * D, d)`` or a bias ``(H * D,)``."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def new_writer(path: Path, arch: str, cfg: dict[str, Any]) -> gguf.GGUFWriter:
    """A writer with the hyper-parameters of a Hugging Face ``config.json`` dict (``rope_theta``
    at the top level; ``head_dim`` optional)."""
    writer = gguf.GGUFWriter(str(path), arch)
    hidden, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // n_heads
    writer.add_uint32(f"{arch}.block_count", cfg["num_hidden_layers"])
    writer.add_uint32(f"{arch}.context_length", cfg["max_position_embeddings"])
    writer.add_uint32(f"{arch}.embedding_length", hidden)
    writer.add_uint32(f"{arch}.feed_forward_length", cfg["intermediate_size"])
    writer.add_uint32(f"{arch}.attention.head_count", n_heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", cfg["num_key_value_heads"])
    writer.add_uint32(f"{arch}.attention.key_length", head_dim)
    writer.add_uint32(f"{arch}.attention.value_length", head_dim)
    writer.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    writer.add_float32(f"{arch}.rope.freq_base", cfg.get("rope_theta", 10000.0))
    writer.add_uint32(f"{arch}.vocab_size", cfg["vocab_size"])
    return writer


def finish(writer: gguf.GGUFWriter) -> None:
    """Write the header, metadata and tensors queued on ``writer`` and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_tensors(
    state: dict[str, torch.Tensor], arch: str, num_heads: int, num_kv_heads: int
) -> dict[str, np.ndarray]:
    """``state`` (Hugging Face names) as float32 arrays by GGUF name, q/k rows permuted where
    ``arch`` is permuted; rotary ``inv_freq`` buffers of old checkpoints are left out."""
    out = {}
    for name, value in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        array = value.detach().to(torch.float32).numpy()
        if arch in PERMUTED_ARCHS and ".q_proj." in name:
            array = permute_rows(array, num_heads)
        elif arch in PERMUTED_ARCHS and ".k_proj." in name:
            array = permute_rows(array, num_kv_heads)
        out[gguf_name(name)] = np.ascontiguousarray(array)
    return out


def add_tensor(
    writer: gguf.GGUFWriter, name: str, array: np.ndarray, qtype: gguf.GGMLQuantizationType
) -> None:
    """Queue a float32 tensor as llama.cpp's converter stores it: 1-D in F32, matrices in ``qtype``
    (Q8_0 falls back to F16 where a row is not whole blocks)."""
    if array.ndim <= 1 or qtype == Q.F32:
        writer.add_tensor(name, array.astype(np.float32))
        return
    if qtype == Q.Q8_0:
        try:
            writer.add_tensor(name, gguf.quants.quantize(array, Q.Q8_0), raw_dtype=Q.Q8_0)
            return
        except gguf.quants.QuantError:
            pass
    writer.add_tensor(name, array.astype(np.float16))


@dataclass(frozen=True)
class TargetFile:
    """What a draft takes from its target's GGUF file."""

    path: Path
    architecture: str
    tokenizer: list[
        tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None]
    ]  # key, value, type, element type
    vocab_size: int | None  # len(tokenizer.ggml.tokens), else {arch}.vocab_size


def open_gguf(path: Path) -> gguf.GGUFReader:
    """``gguf.GGUFReader`` of ``path``; ValueError in one line for a missing or unreadable file."""
    if not Path(path).is_file():
        raise ValueError(f"no such GGUF file: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e})") from None


def read_target(path: Path) -> TargetFile:
    """Architecture and ``tokenizer.*`` metadata (with their value types) of a target GGUF file."""
    reader = open_gguf(path)
    fields = reader.fields
    if "general.architecture" not in fields:
        raise ValueError(f"{path} has no general.architecture")
    arch = str(fields["general.architecture"].contents())
    tokenizer = []
    for key, field in fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            tokenizer.append((key, field.contents(), field.types[0], sub))
    if "tokenizer.ggml.tokens" in fields:
        vocab: int | None = len(fields["tokenizer.ggml.tokens"].data)
    elif f"{arch}.vocab_size" in fields:
        vocab = int(fields[f"{arch}.vocab_size"].contents())
    else:
        vocab = None
    return TargetFile(Path(path), arch, tokenizer, vocab)


def read_embeddings(path: Path) -> dict[str, np.ndarray]:
    """``token_embd.weight`` (and ``output.weight`` where present) of a GGUF file, dequantized to
    float32 ``(V, d)`` arrays by GGUF name."""
    reader = open_gguf(path)
    out = {}
    for tensor in reader.tensors:
        if tensor.name in ("token_embd.weight", "output.weight"):
            shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml lists the innermost first
            try:
                flat = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError:
                raise ValueError(
                    f"{path}: {tensor.name} is {tensor.tensor_type.name}, which the gguf library cannot dequantize"
                ) from None
            out[tensor.name] = np.ascontiguousarray(flat.reshape(shape), dtype=np.float32)
    if "token_embd.weight" not in out:
        raise ValueError(f"{path} holds no token_embd.weight to borrow")
    return out


def rope_factors(config: ModelConfig) -> np.ndarray | None:
    """Llama 3 frequency factors ``(D/2,)`` (``rope_freqs.weight``): the plain inverse frequencies
    over the scaled ones; None without Llama 3 scaling."""
    from specdec.models.llama import rope_inv_freq

    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    plain = rope_inv_freq(replace(config, rope_scaling=None))  # (D/2,)
    return (plain / rope_inv_freq(config)).numpy().astype(np.float32)


def add_rope_scaling(writer: gguf.GGUFWriter, arch: str, config: ModelConfig) -> None:
    """Linear RoPE scaling as metadata; Llama 3 scaling is a tensor (:func:`rope_factors`);
    other kinds are refused."""
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        writer.add_string(f"{arch}.rope.scaling.type", "linear")
        writer.add_float32(f"{arch}.rope.scaling.factor", float(scaling["factor"]))
    elif kind not in (None, "default", "llama3"):
        raise ValueError(f"RoPE scaling {kind!r} is not exported (linear and llama3 are)")


def read_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Configuration and weights of a checkpoint folder; ValueError in one line where either is missing."""
    from specdec.models.loading import read_state_dict

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"no such model folder: {folder}")
    config = ModelConfig.from_folder(folder)  # ModelLoadError (a ValueError) without config.json
    return config, read_state_dict(folder)


def expected_names(config: ModelConfig) -> list[str]:
    """The Hugging Face weights a checkpoint of ``config`` must hold (biases aside)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_hidden_layers):
        names += [f"model.layers.{i}.{module}.weight" for module in LAYER]
    return names


def export_gguf(
    model_folder: Path | str,
    out_path: Path | str,
    like: Path | str | None = None,
    dtype: str = "f16",
    embeddings_from: Path | str | None = None,
) -> Path:
    """Write the Hugging Face checkpoint in ``model_folder`` as the GGUF file ``out_path`` with
    matrices in ``dtype`` (``f32``, ``f16`` or ``q8_0``). ``like``: a target GGUF file whose
    architecture and tokenizer the file takes (its vocabulary must be the folder's).
    ``embeddings_from``: the GGUF file a draft with borrowed embeddings takes them from (default
    ``like``). Raises ValueError with a one-line message for a user mistake."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; choose {', '.join(DTYPES)}")
    file_type, qtype = DTYPES[dtype]
    folder = Path(model_folder)
    config, state = read_folder(folder)
    arch = GGUF_ARCH[config.model_type]
    target = read_target(Path(like)) if like is not None else None
    if target is not None:
        if target.architecture != arch:
            raise ValueError(
                f"{folder} is a {arch} model; {target.path} is {target.architecture}: a draft needs its target's architecture"
            )
        if target.vocab_size is not None and target.vocab_size != config.vocab_size:
            raise ValueError(
                f"vocabulary mismatch: {folder} has {config.vocab_size} tokens, {target.path} has "
                f"{target.vocab_size}; a draft needs its target's vocabulary"
            )
    tensors = gguf_tensors(state, arch, config.num_attention_heads, config.num_key_value_heads)
    if config.raw.get(BORROWED) == "target":
        source = embeddings_from if embeddings_from is not None else like
        if source is None:
            raise ValueError(
                f"{folder} uses its target's embedding table; give the target's GGUF file (like= or embeddings_from=)"
            )
        borrowed = read_embeddings(Path(source))
        V, d = borrowed["token_embd.weight"].shape
        if (V, d) != (config.vocab_size, config.hidden_size):
            raise ValueError(
                f"{folder} needs embeddings of {config.vocab_size} tokens of width {config.hidden_size}; "
                f"{source} has {V} of width {d}"
            )
        tensors.setdefault("token_embd.weight", borrowed["token_embd.weight"])
        if not config.tie_word_embeddings:  # an untied draft on a tied target: its head is the table
            tensors.setdefault("output.weight", borrowed.get("output.weight", borrowed["token_embd.weight"]))
    if config.tie_word_embeddings:
        tensors.pop("output.weight", None)
    elif "output.weight" not in tensors and "token_embd.weight" in tensors:
        tensors["output.weight"] = tensors["token_embd.weight"]  # checkpoint tied in fact
    missing = [n for n in expected_names(config) if gguf_name(n) not in tensors]
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")

    hparams = {
        "num_hidden_layers": config.num_hidden_layers,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "vocab_size": config.vocab_size,
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = new_writer(out, arch, hparams)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(folder.resolve().name)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_rope_scaling(writer, arch, config)
        for key, value, vtype, sub in target.tokenizer if target is not None else []:
            writer.add_key_value(key, value, vtype, sub_type=sub)
        factors = rope_factors(config)
        if factors is not None:
            writer.add_tensor(ROPE_FREQS, factors)
        for name, array in tensors.items():
            add_tensor(writer, name, array, qtype)
        finish(writer)
    except BaseException:
        writer.close()
        out.unlink(missing_ok=True)
        raise
    return out
