"""Tiny GGUF files for the tests, written with the ``gguf`` library the way llama.cpp's
converter writes them (names, q/k row order and writer from :mod:`specdec.models.gguf_export`)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from specdec.models.gguf_export import (  # noqa: F401  (re-exported for the tests)
    HF_TO_GGUF,
    LAYER,
    finish,
    gguf_name,
    gguf_tensors,
    new_writer,
    permute_rows,
)


def write_gguf_from_folder(folder: Path, path: Path, arch: str = "llama", drop: tuple[str, ...] = ()) -> Path:
    """The Hugging Face checkpoint in ``folder`` as a float32 GGUF file (no tokenizer)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    writer = new_writer(path, arch, cfg)
    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if k not in drop}
    n_kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    for name, array in gguf_tensors(state, arch, cfg["num_attention_heads"], n_kv).items():
        writer.add_tensor(name, array)
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
