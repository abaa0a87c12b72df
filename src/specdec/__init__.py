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
from specdec.drafters.base import DrafterCapabilities
from specdec.drafters.registry import make_drafter
from specdec.engine import (
    GenerationError,
    GenerationOutput,
    SpecStats,
    SpeculativeGenerator,
    StreamChunk,
)
from specdec.models import LoadedModel, ModelLoadError, load_model
from specdec.options import Options, get_options, set_options
from specdec.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "AdaptiveDrafter",
    "DraftModelDrafter",
    "DraftProposal",
    "DraftTree",
    "Drafter",
    "DrafterCapabilities",
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
    "Options",
    "SamplingParams",
    "SpecStats",
    "SpeculativeGenerator",
    "StreamChunk",
    "get_options",
    "load_model",
    "make_drafter",
    "set_options",
]
