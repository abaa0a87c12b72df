"""Tiny GGUF files for the tests, written with the ``gguf`` library the way llama.cpp's
converter writes them (q/k rows of the llama architecture permuted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, idx, rest = hf_name.split(".", 3)  # model.layers.N.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    return f"blk.{idx}.{LAYER[module]}.{kind}"


def permute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order: the two rotary halves of each head interleaved."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def new_writer(path: Path, arch: str, cfg: dict[str, Any]) -> gguf.GGUFWriter:
    """A writer with the hyper-parameters of a Hugging Face ``config.json`` dict."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.block_count", cfg["num_hidden_layers"])
    writer.add_uint32(f"{arch}.context_length", cfg["max_position_embeddings"])
    writer.add_uint32(f"{arch}.embedding_length", cfg["hidden_size"])
    writer.add_uint32(f"{arch}.feed_forward_length", cfg["intermediate_size"])
    writer.add_uint32(f"{arch}.attention.head_count", cfg["num_attention_heads"])
    writer.add_uint32(f"{arch}.attention.head_count_kv", cfg["num_key_value_heads"])
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    writer.add_float32(f"{arch}.rope.freq_base", cfg.get("rope_theta", 10000.0))
    writer.add_uint32(f"{arch}.vocab_size", cfg["vocab_size"])
    return writer


def finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf_from_folder(folder: Path, path: Path, arch: str = "llama", drop: tuple[str, ...] = ()) -> Path:
    """The Hugging Face checkpoint in ``folder`` as a float32 GGUF file (no tokenizer)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    writer = new_writer(path, arch, cfg)
    for name, value in load_file(str(folder / "model.safetensors")).items():
        if name in drop:
            continue
        array = value.to(torch.float32).numpy()
        if arch == "llama" and ".q_proj." in name:
            array = permute_rows(array, cfg["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            array = permute_rows(array, cfg["num_key_value_heads"])
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(array))
    finish(writer)
    return path


def random_blocks(type_name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of a quantized type ``(n_blocks, type_size)`` uint8 with finite, small
    float16 scales (the K formats have no quantizer in the gguf library)."""
    qtype = gguf.GGMLQuantizationType[type_name]
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    scale_at = {
        "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
    }  # fmt: skip
    for at in scale_at[type_name]:
        raw[:, at : at + 2] = (rng.standard_normal((n_blocks, 1)) * 0.05).astype(np.float16).view(np.uint8)
    return raw
