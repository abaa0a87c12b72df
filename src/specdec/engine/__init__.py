"""The generation loop (propose -> score -> verify -> commit) and its statistics."""

from specdec.engine.generator import (
    GenerationError,
    GenerationOutput,
    GenerationStream,
    SpeculativeGenerator,
)
from specdec.engine.stats import SpecStats
from specdec.engine.textstream import StreamChunk

__all__ = [
    "GenerationError",
    "GenerationOutput",
    "GenerationStream",
    "SpecStats",
    "SpeculativeGenerator",
    "StreamChunk",
]
