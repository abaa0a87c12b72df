"""``specdec.bench.widen``: a zero-padded copy of a target computes the same function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specdec.bench.widen import WidenError, main, widen
from specdec.drafters.registry import DrafterSpec, make_drafter
from specdec.engine.generator import SpeculativeGenerator
from specdec.models.loading import load_model

PROMPTS = [
    "def parse(line):\n    ",  # short: the one-call kernel path from the first token
    "import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n"
    "        self.values = {}\n\n    def load(self):\n        with open(self.path) as f:\n",  # > 32 tokens
]


@pytest.fixture(scope="module")
def wide_path(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return widen("demo-target", tmp_path_factory.mktemp("wide") / "wide", intermediate_size=1536)


def test_widened_folder_has_padded_mlps_and_the_heads(wide_path: Path) -> None:
    config = json.loads((wide_path / "config.json").read_text())
    assert config["intermediate_size"] == 1536
    for name in ("tokenizer.json", "medusa/model.safetensors", "eagle/model.safetensors"):
        assert (wide_path / name).is_file(), name
    wide, demo = load_model(wide_path, "float32"), load_model("demo-target", "float32")
    mlp, base = wide.module.model.layers[0].mlp, demo.module.model.layers[0].mlp
    assert mlp.down_proj.weight.shape == (256, 1536)
    assert torch.equal(mlp.down_proj.weight[:, :768], base.down_proj.weight)
    assert not mlp.down_proj.weight[:, 768:].any() and not mlp.up_proj.weight[768:].any()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_widened_target_decodes_token_for_token_like_its_source(wide_path: Path, prompt: str) -> None:
    outputs = []
    for folder in (wide_path, "demo-target"):
        generator = SpeculativeGenerator(load_model(folder, "float32"))
        outputs.append(generator.generate(prompt, max_new_tokens=40, ignore_eos=True).token_ids)
    assert len(outputs[0]) == 40 and outputs[0] == outputs[1]


@pytest.mark.parametrize("method", ["eagle", "medusa", "early-exit"])
def test_heads_copied_along_draft_as_on_the_source(wide_path: Path, method: str) -> None:
    outputs = []
    for folder in (wide_path, "demo-target"):
        target = load_model(folder, "float32")
        generator = SpeculativeGenerator(
            target, make_drafter(method, DrafterSpec(target, num_draft_tokens=3))
        )
        out = generator.generate(PROMPTS[1], max_new_tokens=24, ignore_eos=True)
        outputs.append((out.token_ids, out.stats.accepted_tokens))
    assert outputs[0] == outputs[1]


def test_widened_logits_match_the_source(wide_path: Path) -> None:
    wide, demo = load_model(wide_path, "float32"), load_model("demo-target", "float32")
    ids = torch.tensor([wide.tokenizer.encode(PROMPTS[1])])
    logits = [model.module(ids, torch.arange(ids.shape[1]), model.new_cache()) for model in (wide, demo)]
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)


def test_widen_refuses_a_smaller_size_and_missing_folders(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WidenError, match="below the source"):
        widen("demo-target", tmp_path / "small", intermediate_size=512)
    assert main(["--source", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
