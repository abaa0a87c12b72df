"""Exporting a Hugging Face draft folder to GGUF (specdec.models.gguf_export, scripts/draft_to_gguf.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gguf_support import finish, gguf_tensors, new_writer
from helpers import save_tiny_llama
from specdec import load_model
from specdec.models.gguf_export import export_gguf
from specdec.models.loading import BORROWED

ROOT = Path(__file__).resolve().parent.parent
MERGES = ["H e", "l l", "He ll", "Ġ w", "o r"]
VOCAB = 256 + len(MERGES) + 1  # the bytes, the merged pieces, <|endoftext|>
TEXT = "Hello world, 42 times"


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the bytes 0..255."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    spelled, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


def add_tokenizer(writer: gguf.GGUFWriter) -> None:
    """A byte-level BPE vocabulary of ``VOCAB`` tokens as GGUF tokenizer metadata."""
    tokens = byte_alphabet() + [m.replace(" ", "") for m in MERGES] + ["<|endoftext|>"]
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "default")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", [1] * (VOCAB - 1) + [3])
    writer.add_array("tokenizer.ggml.merges", MERGES)
    writer.add_uint32("tokenizer.ggml.eos_token_id", VOCAB - 1)
    writer.add_bool("tokenizer.ggml.add_bos_token", False)


def write_target(tmp_path: Path) -> Path:
    """A tiny 2-layer target GGUF file with a tokenizer and its token embedding in Q8_0."""
    folder = save_tiny_llama(tmp_path / "target-hf", vocab_size=VOCAB, num_layers=2, seed=7, init_std=0.1)
    cfg = json.loads((folder / "config.json").read_text())
    path = tmp_path / "target.gguf"
    writer = new_writer(path, "llama", cfg)
    add_tokenizer(writer)
    for name, array in gguf_tensors(load_file(str(folder / "model.safetensors")), "llama", 4, 2).items():
        if name == "token_embd.weight":
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
        else:
            writer.add_tensor(name, array)
    finish(writer)
    return path


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_target(tmp_path_factory.mktemp("target"))


def logits_of(path: Path, tokens: list[int]) -> torch.Tensor:
    """Logits ``(T, V)`` of one float32 pass over ``tokens``."""
    model = load_model(path, dtype="float32")
    with torch.inference_mode():
        return model(torch.tensor([tokens]), torch.arange(len(tokens)), model.new_cache(1, 64))[0].float()


PROMPT = [5, 17, 42, 8, 3, 200, 257]


def test_f32_export_runs_like_the_folder_and_carries_the_targets_tokenizer(
    tmp_path: Path, target: Path
) -> None:
    draft = save_tiny_llama(tmp_path / "draft", vocab_size=VOCAB, num_layers=1, seed=1, init_std=0.1)
    out = export_gguf(draft, tmp_path / "draft.gguf", like=target, dtype="f32")
    assert torch.allclose(logits_of(out, PROMPT), logits_of(draft, PROMPT), atol=1e-5, rtol=1e-5)
    exported, reference = load_model(out, dtype="float32"), load_model(target, dtype="float32")
    assert exported.tokenizer is not None and reference.tokenizer is not None
    ids = exported.tokenizer.encode(TEXT)
    assert ids == reference.tokenizer.encode(TEXT) and 256 + 2 in ids  # "Hell" merged
    assert exported.config.num_hidden_layers == 1 and exported.config.eos_token_ids == (VOCAB - 1,)
    meta = gguf.GGUFReader(str(out)).fields
    assert meta["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    assert meta["general.architecture"].contents() == "llama"
    assert meta["tokenizer.ggml.add_bos_token"].types == [gguf.GGUFValueType.BOOL]
    assert meta["tokenizer.ggml.eos_token_id"].types == [gguf.GGUFValueType.UINT32]


def test_f16_and_q8_0_exports_are_close_and_typed(tmp_path: Path, target: Path) -> None:
    draft = save_tiny_llama(tmp_path / "draft", vocab_size=VOCAB, num_layers=1, seed=2, init_std=0.1)
    ref = logits_of(draft, PROMPT)
    for dtype, matrix_type, atol in (("f16", "F16", 1e-2), ("q8_0", "Q8_0", 1e-1)):
        out = export_gguf(draft, tmp_path / f"draft-{dtype}.gguf", like=target, dtype=dtype)
        assert torch.allclose(logits_of(out, PROMPT), ref, atol=atol), dtype
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
        assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == matrix_type
        assert types["blk.0.attn_norm.weight"] == "F32"
        assert not torch.equal(logits_of(out, PROMPT), ref)  # stored in fewer bits, not a copy


def test_tied_embeddings_write_no_output_tensor(tmp_path: Path) -> None:
    draft = save_tiny_llama(tmp_path / "draft", vocab_size=VOCAB, num_layers=1, seed=3)
    cfg = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    state = load_file(str(draft / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, str(draft / "model.safetensors"))
    out = export_gguf(draft, tmp_path / "tied.gguf", dtype="f32")
    names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    assert torch.allclose(logits_of(out, PROMPT), logits_of(draft, PROMPT), atol=1e-5, rtol=1e-5)


def borrowing_draft(tmp_path: Path) -> Path:
    """A 1-layer draft folder that stores no embedding table nor lm_head (they are the target's)."""
    draft = save_tiny_llama(tmp_path / "borrowing", vocab_size=VOCAB, num_layers=1, seed=4, init_std=0.1)
    cfg = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**cfg, BORROWED: "target"}))
    state = load_file(str(draft / "model.safetensors"))
    own = {k: v for k, v in state.items() if k not in ("model.embed_tokens.weight", "lm_head.weight")}
    save_file(own, str(draft / "model.safetensors"))
    return draft


def test_borrowed_embeddings_come_from_the_target_file(tmp_path: Path, target: Path) -> None:
    draft = borrowing_draft(tmp_path)
    out = export_gguf(draft, tmp_path / "draft.gguf", like=target, dtype="f32")
    # the same draft as a complete folder holding the target's (dequantized Q8_0) table and head
    full = tmp_path / "full"
    full.mkdir()
    cfg = json.loads((draft / "config.json").read_text())
    del cfg[BORROWED]
    (full / "config.json").write_text(json.dumps(cfg))
    module = load_model(target, dtype="float32").module
    state = load_file(str(draft / "model.safetensors"))
    state["model.embed_tokens.weight"] = module.model.embed_tokens.weight.detach().clone()
    state["lm_head.weight"] = module.lm_head.weight.detach().clone()
    save_file(state, str(full / "model.safetensors"))
    assert torch.allclose(logits_of(out, PROMPT), logits_of(full, PROMPT), atol=1e-5, rtol=1e-5)
    table = {t.name: t for t in gguf.GGUFReader(str(target)).tensors}["token_embd.weight"]
    assert table.tensor_type.name == "Q8_0"  # the borrowed table really was dequantized


def test_user_mistakes_raise_one_line_value_errors(tmp_path: Path, target: Path) -> None:
    with pytest.raises(ValueError, match="no such model folder"):
        export_gguf(tmp_path / "absent", tmp_path / "x.gguf", like=target)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no config\.json"):
        export_gguf(tmp_path / "empty", tmp_path / "x.gguf", like=target)
    weightless = save_tiny_llama(tmp_path / "weightless", vocab_size=VOCAB, num_layers=1)
    (weightless / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no model.safetensors"):
        export_gguf(weightless, tmp_path / "x.gguf", like=target)
    other_vocab = save_tiny_llama(tmp_path / "other", vocab_size=96, num_layers=1)
    with pytest.raises(ValueError, match=f"vocabulary mismatch: .* has 96 tokens, .* has {VOCAB}"):
        export_gguf(other_vocab, tmp_path / "x.gguf", like=target)
    with pytest.raises(ValueError, match="uses its target's embedding table; give the target's GGUF file"):
        export_gguf(borrowing_draft(tmp_path), tmp_path / "x.gguf")
    draft = save_tiny_llama(tmp_path / "draft", vocab_size=VOCAB, num_layers=1)
    with pytest.raises(ValueError, match="unknown GGUF dtype 'q4'"):
        export_gguf(draft, tmp_path / "x.gguf", like=target, dtype="q4")
    with pytest.raises(ValueError, match="no such GGUF file"):
        export_gguf(draft, tmp_path / "x.gguf", like=tmp_path / "missing.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_script_exports_and_refuses_a_mistake_in_one_line(tmp_path: Path, target: Path) -> None:
    draft = save_tiny_llama(tmp_path / "draft", vocab_size=VOCAB, num_layers=1)
    script = [sys.executable, str(ROOT / "scripts" / "draft_to_gguf.py")]
    done = subprocess.run([*script, str(draft), "--like", str(target), "--out", str(tmp_path / "d.gguf")],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "d.gguf").is_file() and "d.gguf" in done.stdout
    bad = subprocess.run([*script, str(tmp_path / "absent"), "--like", str(target)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"draft_to_gguf: error: no such model folder: {tmp_path / 'absent'}"
    ]


def test_names_and_permutation_match_the_converters() -> None:
    from specdec.models.gguf import hf_name, unpermute_rows
    from specdec.models.gguf_export import gguf_name, permute_rows

    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.3.self_attn.k_proj.bias",
                 "model.layers.0.mlp.down_proj.weight", "model.norm.weight"):  # fmt: skip
        assert hf_name(gguf_name(name)) == name
    with pytest.raises(ValueError, match="has no place"):
        gguf_name("model.layers.0.mlp.experts.weight")
    weight = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads of 4 rows
    assert permute_rows(weight, 2)[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]
    assert torch.equal(unpermute_rows(torch.from_numpy(permute_rows(weight, 2)), 2), torch.from_numpy(weight))
