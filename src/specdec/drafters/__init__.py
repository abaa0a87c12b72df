"""Drafters: one file each, all behind the :class:`~specdec.drafters.base.Drafter` protocol."""

from specdec.drafters.base import (
    DraftContext,
    Drafter,
    DrafterCapabilities,
    DraftProposal,
    DraftTree,
    ReusedLayers,
    TargetOutput,
)
from specdec.drafters.draft_model import DraftModelDrafter
from specdec.drafters.eagle import EagleDrafter
from specdec.drafters.early_exit import EarlyExitDrafter
from specdec.drafters.hybrid import HybridDrafter
from specdec.drafters.medusa import MedusaDrafter
from specdec.drafters.ngram import NgramDrafter
from specdec.drafters.staged import StagedDrafter

__all__ = [
    "DraftContext",
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
    "ReusedLayers",
    "StagedDrafter",
    "TargetOutput",
]
