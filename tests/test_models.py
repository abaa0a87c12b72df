"""Our Llama-family implementation matches transformers on random checkpoints (float32)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from helpers import needs_kernels
from specdec import ModelLoadError, load_model
from specdec.models.llama import Transformer
from specdec.models.loading import resolve_device

SMALL = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
CASES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "llama3-rope-gqa": (LlamaConfig, LlamaForCausalLM, {"rope_scaling": LLAMA3_ROPE}),
    "llama-tied-mha": (
        LlamaConfig,
        LlamaForCausalLM,
        {"tie_word_embeddings": True, "num_key_value_heads": 4},
    ),
    "llama-attn-bias": (LlamaConfig, LlamaForCausalLM, {"attention_bias": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2-bias-tied": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
}


@pytest.fixture(params=sorted(CASES))
def hf_pair(request, tmp_path):
    config_cls, model_cls, extra = CASES[request.param]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**{**SMALL, **extra})).eval()
    if extra.get("attention_bias") or request.param.startswith("qwen2"):
        with torch.no_grad():  # random biases: a zero bias would hide a missing one
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    hf.save_pretrained(tmp_path)
    return hf, load_model(tmp_path, dtype="float32")


def test_prefill_and_cached_decoding_match_transformers(hf_pair):
    hf, ours = hf_pair
    ids = torch.randint(0, SMALL["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf(ids).logits[0]  # (T, V)
    cache = ours.new_cache(max_seq_len=64)
    prefill = ours(ids[:, :25], torch.arange(25), cache)[0]
    steps = [ours(ids[:, i : i + 1], torch.tensor([i]), cache)[0] for i in range(25, 32)]
    chunk = ours(ids[:, 32:], torch.arange(32, 40), cache)[0]  # a multi-token verify-style pass
    got = torch.cat([prefill, *steps, chunk])
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=0)


def test_config_fields_are_read(hf_pair):
    hf, ours = hf_pair
    assert ours.config.vocab_size == SMALL["vocab_size"]
    assert ours.config.num_key_value_heads == hf.config.num_key_value_heads
    assert ours.module.lm_head.weight.dtype == torch.float32


def test_bfloat16_load_is_close(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMALL)).save_pretrained(tmp_path)
    f32 = load_model(tmp_path, dtype="float32")
    bf16 = load_model(tmp_path, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    ids = torch.arange(10)[None]
    a = f32(ids, torch.arange(10), f32.new_cache(max_seq_len=16))
    b = bf16(ids, torch.arange(10), bf16.new_cache(max_seq_len=16)).float()
    assert (a - b).abs().max() < 0.05


def test_sharded_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path, dtype="float32")
    ids = torch.arange(12)[None]
    with torch.no_grad():
        reference = hf(ids).logits
    torch.testing.assert_close(
        ours(ids, torch.arange(12), ours.new_cache(max_seq_len=16)), reference, atol=1e-4, rtol=0
    )


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(ModelLoadError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(tmp_path)


def test_missing_and_non_hf_folders_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="not a Hugging Face model folder"):
        load_model(tmp_path)


def test_auto_dtype_is_bfloat16_only_where_it_is_fast(tmp_path, monkeypatch):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMALL)).to(torch.bfloat16).save_pretrained(tmp_path)
    monkeypatch.setattr("specdec.models.loading._cpu_has_amx", lambda: False)
    assert load_model(tmp_path).dtype == torch.float32  # AVX2 CPUs emulate bf16 matmuls slowly
    monkeypatch.setattr("specdec.models.loading._cpu_has_amx", lambda: True)
    assert load_model(tmp_path).dtype == torch.bfloat16
    assert load_model(tmp_path, dtype="float16").dtype == torch.float16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(tmp_path, dtype="int3")


def test_auto_device_is_a_gpu_only_where_torch_sees_one(tmp_path, monkeypatch):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMALL)).save_pretrained(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_model(tmp_path, device="auto").device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_fused_projections_change_nothing_but_the_number_of_products(hf_pair):
    # load_model fuses q/k/v and gate/up; the unfused module (separate products) must give the
    # same logits, the state dict must keep its names and values, and .to() must re-fuse.
    hf, ours = hf_pair
    module = ours.module
    assert all(layer.self_attn.qkv is not None for layer in module.model.layers)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    assert set(state) >= {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"}
    q = module.model.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() == module.model.layers[0].self_attn.qkv[0].data_ptr()  # a view, no copy

    def logits(m):
        cache = m.new_cache(1, 64)
        tokens = torch.tensor([[5, 17, 3, 99, 42, 8, 1]])
        pre = m(tokens[:, :5], torch.arange(5), cache)  # (1, 5, V)
        step = m(tokens[:, 5:], torch.arange(5, 7), cache)  # (1, 2, V): a 2-token verify pass
        return torch.cat([pre, step], dim=1)

    with torch.inference_mode():
        fused = logits(module)
        unfused = Transformer(module.config)
        unfused.load_state_dict(state)
        unfused.inv_freq = module.inv_freq
        unfused.eval().requires_grad_(False)
        separate = logits(unfused)
        torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
        moved = module.to(torch.float64).to(torch.float32)  # converts each parameter: must re-fuse
        mlp = moved.model.layers[1].mlp
        assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_up[0].untyped_storage().data_ptr()
        torch.testing.assert_close(logits(moved), fused, rtol=1e-5, atol=1e-5)


def test_no_logits_gives_the_same_hidden_states_on_both_paths(hf_pair):
    # num_logits=0 (prefill, drafts scored by a reduced vocabulary): hidden states only, no lm_head
    module = hf_pair[1].module
    tokens = torch.tensor([[5, 17, 3, 99, 42]])
    with torch.inference_mode():
        outs = []
        for one_call in (True, False):
            weights = module._layer_weights
            if not one_call:
                module._layer_weights = None
            try:
                for n in (1, 0):
                    outs.append(module(tokens, torch.arange(5), module.new_cache(1, 8), num_logits=n, return_hidden=True))
            finally:
                module._layer_weights = weights
    V, d = module.lm_head.weight.shape
    assert [tuple(logits.shape) for logits, _ in outs] == [(1, 1, V), (1, 0, V)] * 2
    assert all(hidden.shape == (1, 5, d) for _, hidden in outs)
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[2][1], outs[3][1])
    torch.testing.assert_close(outs[0][1], outs[2][1], rtol=1e-5, atol=1e-5)


def test_one_call_forward_matches_the_module_path_and_is_batch_invariant(hf_pair):
    # On CPUs with the kernels, forward (and run_layers) hand the pass to one C++ call (forward.cpp).
    # It must agree with the Python modules, and give every row bit-identical results whatever the
    # pass around it: T one-token passes = one T-token pass (greedy equality with plain decoding rests
    # on it), and a row batched with another = the row alone. The prompt is longer than the blocks
    # of cache slots attention reads at a time (kSlotBlock, 64), so the passes cross a block edge.
    needs_kernels()
    module = hf_pair[1].module
    P = 70  # prompt tokens; then 3 more
    tokens = torch.randint(0, 101, (2, P + 3), generator=torch.Generator().manual_seed(0))

    def passes(rows, steps):  # prefill P tokens, then passes of `steps` tokens each: (B, P + 3, V)
        cache = module.new_cache(len(rows), 128)
        out = [module(tokens[rows, :P], torch.arange(P), cache)]
        for start in range(P, P + 3, steps):
            end = min(P + 3, start + steps)
            out.append(module(tokens[rows, start:end], torch.arange(start, end), cache, kv_len=end))
        return torch.cat(out, dim=1)

    with torch.inference_mode():
        fast = passes([0, 1], 3)
        one_by_one, alone = passes([0, 1], 1), passes([1], 3)
        weights, module._layer_weights = module._layer_weights, None
        try:
            slow = passes([0, 1], 3)
        finally:
            module._layer_weights = weights
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast[:, P:], one_by_one[:, P:])
    assert torch.equal(fast[1], alone[0])
    # Rows at different lengths, each with its own cache slots (the server's batches)
    with torch.inference_mode():
        cache = module.new_cache(2, 128)
        module(tokens[:, :P], torch.arange(P), cache)
        pos = torch.tensor([[P, P + 1], [66, 67]])  # row 1 rolled back to 66 committed tokens
        step = module(tokens[:, P : P + 2], pos, cache, cache_slots=pos, kv_len=P + 2)  # (2, 2, V)
        solo = module.new_cache(1, 128)
        module(tokens[1:, :P], torch.arange(P), solo)  # the same cache rows (then 66, 67 are overwritten)
        row = module(tokens[1:, P : P + 2], torch.arange(66, 68), solo, kv_len=68)  # (1, 2, V)
    assert torch.equal(step[1], row[0])


def test_bfloat16_copies_of_exact_weights_give_identical_results(hf_pair):
    # A float32 model whose weights all fit in bfloat16 (a bfloat16 checkpoint) is read from bfloat16
    # copies: half the bytes, and the same bits out as from the float32 weights.
    from specdec import kernels

    needs_kernels()
    module = hf_pair[1].module
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.bfloat16().float())
    module.fuse()
    assert module._layer_weights[1].dtype == torch.bfloat16
    assert module._kernel_io[0].dtype == torch.bfloat16

    def logits():
        cache = module.new_cache(1, 64)
        tokens = torch.tensor([[5, 17, 3, 99, 42, 8, 1, 77]])
        pre = module(tokens[:, :5], torch.arange(5), cache)
        return torch.cat([pre, module(tokens[:, 5:], torch.arange(5, 8), cache, kv_len=8)], dim=1)

    with torch.inference_mode():
        compact = logits()
        exact_bfloat16 = kernels.exact_bfloat16
        kernels.exact_bfloat16 = lambda weight: None  # keep the float32 weights
        try:
            module.fuse()
            assert module._layer_weights[1].dtype == torch.float32
            full = logits()
        finally:
            kernels.exact_bfloat16 = exact_bfloat16
    assert compact.dtype == torch.float32
    assert torch.equal(compact, full)
    # heads' features through the copy of lm_head (Transformer.project): the same bits again
    module.fuse()
    features = torch.randn(3, module.config.hidden_size)
    with torch.inference_mode():
        assert torch.equal(module.project(features), module.lm_head(features))
    # one weight that needs float32 keeps them all in float32
    with torch.no_grad():
        module.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-4
    module.fuse()
    assert module._layer_weights[1].dtype == torch.float32


def test_long_prefill_in_one_call_reads_the_float32_originals_and_matches_transformers(tmp_path):
    # A pass over more than MAX_ROWS tokens (prefill) runs BLAS inside the one-call forward, the MLP
    # in chunks of 1024 intermediate features (2100 here: three chunks, the last partial). It reads
    # the float32 originals, not the bfloat16 copies widened on every pass, and gives the same bits.
    from specdec import kernels

    needs_kernels()
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**{**SMALL, "intermediate_size": 2100})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.bfloat16().float())  # a bfloat16 checkpoint: the kernels get exact copies
    hf.save_pretrained(tmp_path)
    module = load_model(tmp_path, dtype="float32").module
    T = kernels.MAX_ROWS + 16
    compact, _ = module._kernel_weights(1)
    originals, (embed, head) = module._kernel_weights(T)
    assert compact[5].dtype == torch.bfloat16
    assert all(w is None or w.dtype == torch.float32 for w in originals) and head.dtype == torch.float32
    tokens = torch.randint(0, SMALL["vocab_size"], (2, T), generator=torch.Generator().manual_seed(2))
    calls = []
    forward = kernels.model_forward
    kernels.model_forward = lambda *args: calls.append(args[0].shape) or forward(*args)
    try:
        with torch.inference_mode():
            ours = module(tokens, torch.arange(T), module.new_cache(2, 64))  # (2, T, V)
            module._prefill_weights = compact  # the copies, widened a chunk at a time
            widened = module(tokens, torch.arange(T), module.new_cache(2, 64))
    finally:
        kernels.model_forward = forward
    assert calls == [(2, T), (2, T)]
    assert torch.equal(ours, widened)
    with torch.no_grad():
        reference = hf(tokens).logits  # (2, T, V)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


def test_long_prefill_of_a_model_run_in_bfloat16_takes_bfloat16_products(tmp_path, set_options):
    # A model run in bfloat16 with bfloat16 rows (the default; kernels.bf16_rows) prefills with
    # torch's bfloat16 GEMM on rows rounded to bfloat16, the MLP in chunks (2100 features: three):
    # not the float32-row prefill's bits, and as close to the float32 reference as that one.
    from specdec import kernels

    needs_kernels()
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**{**SMALL, "intermediate_size": 2100})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.bfloat16().float())
    hf.save_pretrained(tmp_path)
    module = load_model(tmp_path, dtype="bfloat16").module
    T = kernels.MAX_ROWS + 16
    tokens = torch.randint(0, SMALL["vocab_size"], (2, T), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        rows = module(tokens, torch.arange(T), module.new_cache(2, 64)).float()  # (2, T, V)
        set_options(bf16_rows=False)
        float_rows = module(tokens, torch.arange(T), module.new_cache(2, 64)).float()
    with torch.no_grad():
        reference = hf(tokens).logits  # float32, the same weights
    assert torch.equal(rows, float_rows) != kernels.bf16_dot()
    for logits in (rows, float_rows):  # logits in bfloat16 (steps of 0.002 here), scale 0.56
        torch.testing.assert_close(logits, reference, atol=0.01, rtol=0)


def test_prefill_from_slot_zero_takes_the_causal_attention_and_agrees_with_the_masked_one(hf_pair):
    # A prefill from slot 0 with the default mask hands the kernels no mask: torch's causal
    # attention, which skips the masked half of the scores. A pass that starts later (or brings
    # its own mask) keeps the explicit mask. Both agree with the module path.
    from specdec import kernels
    from specdec.models.llama import causal_mask

    needs_kernels()
    module = hf_pair[1].module
    T = kernels.MAX_ROWS + 8
    tokens = torch.randint(0, module.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(T)[None].expand(2, -1)
    masks = []
    forward = kernels.model_forward
    kernels.model_forward = lambda *args: masks.append(args[7]) or forward(*args)
    try:
        with torch.inference_mode():
            causal = module(tokens, pos, module.new_cache(2, 2 * T))  # (2, T, V)
            masked = module(tokens, pos, module.new_cache(2, 2 * T), attn_mask=causal_mask(pos, T)[:, 0])
            cache = module.new_cache(2, 2 * T)
            module(tokens[:, :4], torch.arange(4), cache)  # then T - 4 tokens from slot 4
            later = module(tokens[:, 4:], torch.arange(4, T), cache)
            weights, module._layer_weights = module._layer_weights, None
            try:
                reference = module(tokens, pos, module.new_cache(2, 2 * T))  # the module path
            finally:
                module._layer_weights = weights
    finally:
        kernels.model_forward = forward
    assert masks[0] is None and masks[1] is not None and masks[3] is not None
    torch.testing.assert_close(causal, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(causal, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(later, reference[:, 4:], rtol=1e-5, atol=1e-5)
