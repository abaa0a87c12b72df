"""Drafters: one file each, all behind the :class:`~specdec.drafters.base.Drafter` protocol."""

from specdec.drafters.base import DraftContext, Drafter, DraftProposal, TargetOutput
from specdec.drafters.draft_model import DraftModelDrafter

__all__ = ["DraftContext", "DraftModelDrafter", "DraftProposal", "Drafter", "TargetOutput"]
