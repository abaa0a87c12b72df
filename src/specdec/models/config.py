"""Model configuration parsed from a Hugging Face ``config.json``.

One frozen dataclass covers the Llama family (Llama 1-3, Mistral, Qwen2): they differ only
in a handful of switches (qkv bias, tied embeddings, RoPE scaling, head_dim).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class ModelLoadError(ValueError):
    """A model folder or configuration that specdec cannot load (a user-facing error)."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    model_type: str = "llama"
    architecture: str = "LlamaForCausalLM"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            raise ModelLoadError(
                f"unsupported architecture {arch!r} (model_type {cfg.get('model_type')!r}); "
                f"specdec supports {supported}"
            )
        if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
            raise ModelLoadError(
                f"unsupported MLP (hidden_act {cfg.get('hidden_act')!r}, mlp_bias "
                f"{cfg.get('mlp_bias')}); specdec supports SwiGLU without bias"
            )
        # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_scaling`.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        hidden = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        model_type = SUPPORTED_ARCHITECTURES[arch]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        # Qwen2 always carries q/k/v biases; Llama exposes it as a switch.
        bias = True if model_type == "qwen2" else bool(cfg.get("attention_bias", False))
        max_pos = int(cfg.get("max_position_embeddings", 2048))
        window = cfg.get("sliding_window")
        if model_type == "mistral" and window and cfg.get("use_sliding_window", True):
            max_pos = min(max_pos, int(window))  # no sliding window: stay inside it
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=n_heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or hidden // n_heads),
            max_position_embeddings=max_pos,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope or None,
            attention_bias=bias,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            model_type=model_type,
            architecture=arch,
            raw=dict(cfg),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        path = folder / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder} is not a Hugging Face model folder (no config.json)")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
        gen_path = folder / "generation_config.json"
        if gen_path.is_file():  # chat models list their end-of-turn tokens here
            try:
                gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
            except json.JSONDecodeError:
                gen_eos = None
            if gen_eos is not None:
                own = cfg.get("eos_token_id")
                own = own if isinstance(own, list) else ([] if own is None else [own])
                extra = gen_eos if isinstance(gen_eos, list) else [gen_eos]
                cfg = {**cfg, "eos_token_id": own + [e for e in extra if e not in own]}
        try:
            return cls.from_dict(cfg)
        except KeyError as e:
            raise ModelLoadError(f"{path} lacks the field {e.args[0]!r}") from None

    @property
    def num_parameters(self) -> int:
        d, f, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
        emb = v * d * (1 if self.tie_word_embeddings else 2)
        return n * per_layer + emb + d
