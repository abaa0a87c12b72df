"""specdec: lossless speculative decoding for Llama-family language models."""

from specdec.drafters import DraftModelDrafter, Drafter, DraftProposal
from specdec.engine import (
    GenerationError,
    GenerationOutput,
    SpecStats,
    SpeculativeGenerator,
    StreamChunk,
)
from specdec.models import LoadedModel, ModelLoadError, load_model
from specdec.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "DraftModelDrafter",
    "DraftProposal",
    "Drafter",
    "GenerationError",
    "GenerationOutput",
    "LoadedModel",
    "ModelLoadError",
    "SamplingParams",
    "SpecStats",
    "SpeculativeGenerator",
    "StreamChunk",
    "load_model",
]
