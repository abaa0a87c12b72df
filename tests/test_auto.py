"""``make_drafter("auto", target)``: a measured ranking where the target has one, else trained heads,
then a draft model beside the target, then prompt lookup; a named draft is always run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from specdec import load_model, make_drafter
from specdec.drafters.draft_model import DraftModelDrafter
from specdec.drafters.eagle import EagleDrafter
from specdec.drafters.early_exit import EarlyExitDrafter
from specdec.drafters.hybrid import HybridDrafter
from specdec.drafters.ngram import NgramDrafter
from specdec.models import ModelLoadError
from specdec.models.loading import ASSETS


@pytest.fixture
def own_target(tmp_path: Path) -> Path:
    """A copy of the demo target (with its trained heads) without its ranking."""
    folder = tmp_path / "target"
    shutil.copytree(ASSETS / "demo-target", folder)
    (folder / "auto.json").unlink()
    return folder


def rank(folder: Path, *order: str) -> None:
    (folder / "auto.json").write_text(json.dumps({"order": list(order), "measured": "by this test"}))


def test_the_shipped_demo_ranking_puts_prompt_lookup_first_and_a_named_draft_in_hybrid() -> None:
    target = load_model("demo-target")
    ranking = json.loads((ASSETS / "demo-target" / "auto.json").read_text())
    assert ranking["order"][:2] == ["ngram", "hybrid"] and "bench" in ranking["measured"]
    assert isinstance(make_drafter("auto", target), NgramDrafter)
    assert isinstance(make_drafter("auto", target, draft="demo-draft"), HybridDrafter)


def test_without_a_ranking_heads_come_first(own_target: Path) -> None:
    assert isinstance(make_drafter("auto", load_model(own_target)), EagleDrafter)


def test_the_first_ranked_drafter_that_can_be_built_is_picked(own_target: Path) -> None:
    rank(own_target, "early-exit", "ngram")
    assert isinstance(make_drafter("auto", load_model(own_target)), EarlyExitDrafter)
    rank(own_target, "draft", "eagle")  # no draft beside the target: the heads
    assert isinstance(make_drafter("auto", load_model(own_target)), EagleDrafter)
    shutil.copytree(ASSETS / "demo-draft", own_target / "draft")  # as `specdec train draft` writes it
    drafter = make_drafter("auto", load_model(own_target))
    assert isinstance(drafter, DraftModelDrafter)


def test_a_draft_beside_the_target_comes_after_heads_and_before_prompt_lookup(own_target: Path) -> None:
    for method in ("eagle", "early-exit", "medusa"):
        shutil.rmtree(own_target / method)
    assert isinstance(make_drafter("auto", load_model(own_target)), NgramDrafter)
    shutil.copytree(ASSETS / "demo-draft", own_target / "draft")
    assert isinstance(make_drafter("auto", load_model(own_target)), DraftModelDrafter)


def test_the_draft_drafter_runs_the_targets_own_draft_where_none_is_named(own_target: Path) -> None:
    """``draft`` without ``draft=``: the draft beside the target, else demo-draft; a named one
    wins."""
    target = load_model(own_target)
    shipped = make_drafter("draft", target)
    assert isinstance(shipped, DraftModelDrafter) and shipped.model.path == ASSETS / "demo-draft"
    shutil.copytree(ASSETS / "demo-draft", own_target / "draft")
    own = make_drafter("draft", target)
    assert isinstance(own, DraftModelDrafter) and own.model.path == own_target / "draft"
    named = make_drafter("draft", target, draft="demo-draft")
    assert isinstance(named, DraftModelDrafter) and named.model.path == ASSETS / "demo-draft"


def test_a_bad_ranking_is_refused_with_its_file_named(own_target: Path) -> None:
    rank(own_target, "ngram", "warp-drive")
    with pytest.raises(ModelLoadError, match="auto.json.*drafter names"):
        make_drafter("auto", load_model(own_target))
    (own_target / "auto.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="auto.json: not a drafter ranking"):
        make_drafter("auto", load_model(own_target))
