"""Fixtures: tiny random checkpoints (session-scoped, saved once) and fixed torch threads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from helpers import save_tiny_llama
from specdec import load_model

torch.set_num_threads(1)


@pytest.fixture
def set_options():  # type: ignore[no-untyped-def]
    """``set_options(bf16_rows=False, ...)``: change specdec's options for one test, restored after."""
    from specdec import options

    saved = options.get_options()
    yield options.set_options
    options.set_options(**dataclasses.asdict(saved))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def target_path(tiny_dir: Path) -> Path:
    return save_tiny_llama(tiny_dir / "target", init_std=0.15, seed=0)


@pytest.fixture(scope="session")
def good_draft_path(tiny_dir: Path, target_path: Path) -> Path:
    """The target's weights plus a little noise: agrees with the target most of the time."""
    return save_tiny_llama(tiny_dir / "good-draft", seed=1, base=target_path, noise=0.08)


@pytest.fixture(scope="session")
def far_draft_path(tiny_dir: Path) -> Path:
    """An unrelated random model of the same vocabulary."""
    return save_tiny_llama(tiny_dir / "far-draft", num_layers=1, hidden_size=32, init_std=0.15, seed=7)


@pytest.fixture(scope="module")
def models(target_path: Path, good_draft_path: Path, far_draft_path: Path) -> dict:  # type: ignore[type-arg]
    """The three tiny checkpoints above, loaded in float32: ``target``, ``good``, ``far``."""
    return {
        name: load_model(path, dtype="float32")
        for name, path in [("target", target_path), ("good", good_draft_path), ("far", far_draft_path)]
    }
