"""specdec: lossless speculative decoding for Llama-family language models."""

from specdec.drafters import (
    Drafter,
    DraftModelDrafter,
    DraftProposal,
    DraftTree,
    EagleDrafter,
    EarlyExitDrafter,
    HybridDrafter,
    MedusaDrafter,
    NgramDrafter,
    StagedDrafter,
)
from specdec.drafters.adaptive import AdaptiveDrafter
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
    "AdaptiveDrafter",
    "DraftModelDrafter",
    "DraftProposal",
    "DraftTree",
    "Drafter",
    "EagleDrafter",
    "EarlyExitDrafter",
    "HybridDrafter",
    "MedusaDrafter",
    "NgramDrafter",
    "StagedDrafter",
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
