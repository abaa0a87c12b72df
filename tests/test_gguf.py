"""GGUF loading: dequantizers, the container reader, configuration, tokenizer, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gguf_support import finish, new_writer, random_blocks, write_gguf_from_folder
from helpers import save_tiny_llama
from specdec import SpeculativeGenerator, load_model
from specdec.cli import main
from specdec.models import ModelLoadError
from specdec.models.gguf import load_gguf, read_tensor, unpermute_rows
from specdec.models.gguf_file import read_gguf
from specdec.models.gguf_quants import DEQUANTIZERS, dequantize
from specdec.models.gguf_tokenizer import tokenizer_from_metadata
from specdec.models.loading import ASSETS
from specdec.models.tokenizer import Tokenizer

QUANTIZED = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
TINY_CFG = {
    "num_hidden_layers": 1,
    "max_position_embeddings": 128,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 64,
}


@pytest.mark.parametrize("type_name", QUANTIZED)
def test_dequantizers_equal_the_gguf_library(type_name: str) -> None:
    raw = random_blocks(type_name, 9, np.random.default_rng(0))
    block_size = DEQUANTIZERS[type_name][0]
    ours = dequantize(raw, type_name, 9 * block_size).numpy()
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(-1)
    assert ours.dtype == np.float32 and np.array_equal(ours, ref)


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16"])
def test_float_types_are_read_exactly(type_name: str) -> None:
    values = torch.randn(300)
    stored = values.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[type_name])
    raw = stored.view(torch.uint8).numpy() if type_name == "BF16" else stored.numpy()
    assert torch.equal(dequantize(raw, type_name, 300), stored.float())


def write_tensor_file(path: Path, type_name: str, weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A GGUF file with one tensor ``blk.0.ffn_up.weight`` of ``type_name``; returns its stored
    bytes (quantized with the gguf library where it can, random blocks for the K formats)."""
    writer = new_writer(path, "llama", TINY_CFG)
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in ("Q4_K", "Q5_K", "Q6_K"):
        blocks_per_row = weight.shape[1] // 256
        stored = random_blocks(type_name, weight.shape[0] * blocks_per_row, rng).reshape(weight.shape[0], -1)
    elif type_name == "F32":
        stored = weight
    else:
        stored = gguf.quants.quantize(weight, qtype)
    writer.add_tensor("blk.0.ffn_up.weight", stored, raw_dtype=None if type_name == "F32" else qtype)
    finish(writer)
    return stored


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", *QUANTIZED])
def test_each_tensor_type_round_trips_through_a_file(tmp_path: Path, type_name: str) -> None:
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((8, 512)) * 0.1).astype(np.float32)  # (N, K) as torch orders it
    stored = write_tensor_file(tmp_path / "t.gguf", type_name, weight, rng)
    (tensor,) = read_gguf(tmp_path / "t.gguf").tensors
    assert tensor.type_name == type_name and tensor.shape == (8, 512)
    loaded = read_tensor(tensor, tmp_path / "t.gguf")
    ref = gguf.quants.dequantize(stored, gguf.GGMLQuantizationType[type_name]).reshape(8, 512)
    assert torch.equal(loaded, torch.from_numpy(np.ascontiguousarray(ref)))
    if type_name not in ("Q4_K", "Q5_K", "Q6_K"):  # quantized from `weight`: close to it
        tolerances = {"F32": 0, "F16": 1e-3, "BF16": 1e-3, "Q8_0": 4e-3, "Q4_0": 0.06, "Q4_1": 0.05}
        tolerance = tolerances.get(type_name, 0.03)  # Q5_0, Q5_1
        assert (loaded - torch.from_numpy(weight)).abs().max() <= tolerance


def test_reader_agrees_with_the_gguf_library(tmp_path: Path) -> None:
    path = tmp_path / "t.gguf"
    write_tensor_file(path, "Q4_1", np.ones((4, 256), np.float32), np.random.default_rng(0))
    ours = read_gguf(path)
    ref = gguf.GGUFReader(path)
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            value = field.contents()
            assert ours.metadata[key] == pytest.approx(
                value.tolist() if isinstance(value, np.ndarray) else value
            )
    (tensor,), (ref_tensor,) = ours.tensors, ref.tensors
    assert tensor.name == ref_tensor.name and np.array_equal(tensor.data, ref_tensor.data.reshape(-1))


def test_unpermute_inverts_the_converter() -> None:
    from gguf_support import permute_rows

    weight = torch.randn(4 * 16, 8)  # 4 heads of 16 rows
    assert torch.equal(unpermute_rows(torch.from_numpy(permute_rows(weight.numpy(), 4)), 4), weight)


def greedy(path: Path | str, prompt: list[int], n: int = 24, dtype: str = "float32") -> list[int]:
    return SpeculativeGenerator(load_model(path, dtype=dtype)).generate(prompt, max_new_tokens=n).token_ids


def test_gguf_llama_equals_the_safetensors_model(tmp_path: Path) -> None:
    folder = save_tiny_llama(tmp_path / "hf", init_std=0.15, seed=3)
    path = write_gguf_from_folder(folder, tmp_path / "tiny.gguf")
    hf, ours = load_model(folder, dtype="float32"), load_model(path, dtype="float32")
    assert ours.path == path.resolve() and ours.config.num_key_value_heads == 2
    assert not ours.config.tie_word_embeddings
    for key, value in hf.module.state_dict().items():  # the permutation undone: the same weights
        assert torch.equal(ours.module.state_dict()[key], value), key
    prompt = [5, 17, 42, 8, 3]
    assert greedy(path, prompt) == greedy(folder, prompt)


def test_gguf_qwen2_equals_the_safetensors_model(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.15,
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:  # biases are zero at init: make them matter
            layer.self_attn.q_proj.bias.normal_(0, 0.5)
            layer.self_attn.k_proj.bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "hf")
    path = write_gguf_from_folder(tmp_path / "hf", tmp_path / "qwen.gguf", arch="qwen2")
    loaded = load_model(path, dtype="float32")
    assert loaded.config.model_type == "qwen2" and loaded.config.attention_bias
    assert greedy(path, [1, 2, 3, 4]) == greedy(tmp_path / "hf", [1, 2, 3, 4])


def test_missing_output_weight_means_tied_embeddings(tmp_path: Path) -> None:
    folder = save_tiny_llama(tmp_path / "hf", seed=4)
    path = write_gguf_from_folder(folder, tmp_path / "tied.gguf", drop=("lm_head.weight",))
    model = load_model(path, dtype="float32")
    assert model.config.tie_word_embeddings
    assert model.module.lm_head.weight.data_ptr() == model.module.model.embed_tokens.weight.data_ptr()


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_is_honoured(tmp_path: Path) -> None:
    path = write_gguf_from_folder(save_tiny_llama(tmp_path / "hf", seed=5), tmp_path / "m.gguf")
    assert load_model(path).dtype == torch.float32
    assert load_model(path, dtype="bfloat16").dtype == torch.bfloat16


def demo_tokenizer_metadata() -> dict:  # type: ignore[type-arg]
    """The shipped demo tokenizer (byte-level BPE) as GGUF tokenizer metadata."""
    spec = json.loads((ASSETS / "demo-target" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in special else 1 for t in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.chat_template": "{{ messages[0]['content'] }}",
    }


SAMPLE = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 1234 naïve ✓<|endoftext|>"


def test_tokenizer_from_metadata_equals_the_hugging_face_tokenizer(tmp_path: Path) -> None:
    ours = tokenizer_from_metadata(demo_tokenizer_metadata())
    ref = Tokenizer.from_folder(ASSETS / "demo-target")
    assert ref is not None and ours.encode(SAMPLE) == ref.encode(SAMPLE)
    assert ours.decode(ours.encode(SAMPLE)) == ref.decode(ref.encode(SAMPLE))
    assert ours.eos_token == "<|endoftext|>" and ours.chat_template == "{{ messages[0]['content'] }}"


def test_tokenizer_is_written_and_read_back_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "tok.gguf"
    writer = new_writer(path, "llama", TINY_CFG)
    meta = demo_tokenizer_metadata()
    writer.add_string("tokenizer.ggml.model", meta["tokenizer.ggml.model"])
    writer.add_string("tokenizer.ggml.pre", meta["tokenizer.ggml.pre"])
    writer.add_array("tokenizer.ggml.tokens", meta["tokenizer.ggml.tokens"])
    writer.add_array("tokenizer.ggml.token_type", meta["tokenizer.ggml.token_type"])
    writer.add_array("tokenizer.ggml.merges", meta["tokenizer.ggml.merges"])
    writer.add_uint32("tokenizer.ggml.eos_token_id", 0)
    writer.add_string("tokenizer.chat_template", meta["tokenizer.chat_template"])
    finish(writer)
    from specdec.models.gguf import gguf_tokenizer

    tok = gguf_tokenizer(path)
    assert tok.encode(SAMPLE) == tokenizer_from_metadata(meta).encode(SAMPLE)
    assert tok.chat_template == meta["tokenizer.chat_template"] and tok.eos_token_id == 0


def bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.gguf"
    if kind == "text":
        path.write_text("not a model\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind in ("truncated", "header-cut"):
        good = write_gguf_from_folder(save_tiny_llama(tmp_path / "hf", seed=6), tmp_path / "good.gguf")
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2] if kind == "truncated" else data[:200])
    elif kind == "architecture":
        writer = new_writer(path, "falcon", TINY_CFG)
        finish(writer)
    elif kind == "tensor-type":
        writer = new_writer(path, "llama", TINY_CFG)
        q2 = gguf.GGMLQuantizationType.Q2_K  # 84 bytes per 256 weights
        writer.add_tensor("blk.0.ffn_up.weight", np.zeros((8, 84 * 2), np.uint8), raw_dtype=q2)
        finish(writer)
    return path


BAD = {
    "text": "is not a GGUF file",
    "empty": "is not a readable GGUF file",
    "truncated": "is truncated",
    "header-cut": "truncated header",
    "architecture": "unsupported GGUF architecture 'falcon'",
    "tensor-type": "has type Q2_K, which specdec cannot load",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_files_are_refused_in_one_line(tmp_path: Path, kind: str) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_gguf(bad_file(tmp_path, kind), torch.float32)
    assert BAD[kind] in str(err.value) and "\n" not in str(err.value)


def test_unknown_tokenizer_model_is_refused() -> None:
    meta = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(ModelLoadError, match="unsupported GGUF tokenizer model 'bert'"):
        tokenizer_from_metadata(meta)


def test_cli_refuses_a_bad_gguf_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "hi", "--target", str(bad_file(tmp_path, "text")), "--drafter", "none"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("specdec: error: ") and "not a GGUF file" in err
    assert err.count("\n") == 1 and "Traceback" not in err


SPM_PIECES = [
    "▁",
    "e",
    "t",
    "h",
    "a",
    "▁t",
    "he",
    "▁the",
    "at",
    "▁c",
    "c",
    "▁cat",
    "s",
    "▁a",
    "n",
    "d",
    "an",
    "▁and",
]


def write_spm_file(path: Path) -> Path:
    """A SentencePiece vocabulary (``tokenizer.ggml.model`` llama): unk, BOS, EOS, 256 byte
    tokens, then scored pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    writer = new_writer(path, "llama", TINY_CFG)
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.scores", [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))])
    writer.add_array("tokenizer.ggml.token_type", [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES))
    for key, idx in (("unknown", 0), ("bos", 1), ("eos", 2)):
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", idx)
    finish(writer)
    return path


def test_sentencepiece_tokenizer_equals_transformers_gguf_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from specdec.models.gguf import gguf_tokenizer

    path = write_spm_file(tmp_path / "spm.gguf")
    ours, ref = gguf_tokenizer(path), AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["the cat and the hat", "Zebra! the  cat\nand ü"]:  # ü: byte fallback
        assert ours.encode(text) == ref.encode(text)
        assert ours.decode(ours.encode(text)) == text
    # Where transformers and llama.cpp differ, llama.cpp's rule: a space is prepended to the text
    # after a special token too, so "</s>cat" gives "▁cat", and a leading space is kept.
    ids = ours.encode("the</s>cat")
    assert ids[-2:] == [2, ours.token_to_id("▁cat")] and ids[0] == 1  # BOS added by default
    assert ours.decode(ours.encode(" leading")) == " leading"


def test_llama3_rope_frequency_factors_divide_the_frequencies(tmp_path: Path) -> None:
    from specdec.models.llama import rope_inv_freq

    folder = save_tiny_llama(tmp_path / "hf", seed=8)
    path = write_gguf_from_folder(folder, tmp_path / "plain.gguf")
    factors = np.linspace(1.0, 8.0, 8, dtype=np.float32)  # head_dim 16: 8 frequencies
    scaled = tmp_path / "scaled.gguf"
    writer = new_writer(
        scaled, "llama", json.loads((folder / "config.json").read_text()) | {"rope_theta": 10000.0}
    )
    for tensor in read_gguf(path).tensors:
        writer.add_tensor(tensor.name, np.asarray(tensor.data).view(np.float32).reshape(tensor.shape))
    writer.add_tensor("rope_freqs.weight", factors)
    finish(writer)
    model = load_model(scaled, dtype="float32")
    assert torch.allclose(model.module.inv_freq, rope_inv_freq(model.config) / torch.from_numpy(factors))
