"""Lean Llama-family models and Hugging Face checkpoint loading."""

from specdec.models.config import ModelConfig, ModelLoadError
from specdec.models.llama import Transformer
from specdec.models.loading import LoadedModel, check_compatible, load_model
from specdec.models.tokenizer import Tokenizer

__all__ = [
    "LoadedModel",
    "ModelConfig",
    "ModelLoadError",
    "Tokenizer",
    "Transformer",
    "check_compatible",
    "load_model",
]
