"""EAGLE training on self-distilled data: the training-time test sees what drafting sees, a
short run learns, the saved head drafts losslessly and is found beside its target."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import random_head, save_char_tokenizer, save_tiny_llama, write_tiny_data
from specdec import SpeculativeGenerator, load_model
from specdec.drafters.eagle import EagleDrafter
from specdec.drafters.locate import ASSETS, heads_folder
from specdec.models.loading import LoadedModel
from specdec.train.eagle import (
    EagleTrainConfig,
    load_conversations,
    sample_windows,
    train_eagle,
    ttt_mask,
    unrolled_features,
)


@pytest.fixture(scope="module")
def chat_target(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = tmp_path_factory.mktemp("eagle-target")
    save_tiny_llama(folder, init_std=0.15, seed=5, eos_token_id=0, max_position_embeddings=512)
    save_char_tokenizer(folder)
    return load_model(folder, dtype="float32")


def test_ttt_mask_is_the_drafting_chain() -> None:
    m0 = ttt_mask(6, 0)
    assert torch.equal(m0, torch.ones(6, 6, dtype=torch.bool).tril())
    m2 = ttt_mask(6, 2)  # (W, 3W): step 0 | step 1 | step 2
    row = m2[5]
    assert row[:6].nonzero().flatten().tolist() == [0, 1, 2, 3]  # target entries <= t - 2
    assert row[6:12].nonzero().flatten().tolist() == [4]  # step 1 at t - 1
    assert row[12:].nonzero().flatten().tolist() == [5]  # step 2 at t
    assert bool(m2.any(-1).all())  # no row fully masked
    assert bool(m2[1, 12 + 1]) and not bool(m2[1, :6].any())  # no chain: its own key, no target entry


def test_unrolled_steps_equal_sequential_drafting(models: dict) -> None:  # type: ignore[type-arg]
    """Step j's output at t is what the drafter computes for its j-th draft after target
    features up to t - j: the same values, one pass per step instead of one per entry."""
    target = models["target"]
    head = random_head("eagle", target, seed=3).float()
    torch.manual_seed(0)
    B, W, d = 2, 9, target.config.hidden_size
    tokens = torch.randint(target.config.vocab_size, (B, W))
    embeds = target.module.model.embed_tokens(tokens).float()
    feats = torch.randn(B, W, d)
    with torch.no_grad():
        outputs = unrolled_features(head, embeds, feats, ttt_steps=3)
        for b in range(B):
            for j in range(3):
                for t in range(j, W):
                    cache = head.new_cache(1, W)
                    n = t - j + 1  # target-feature entries 0 .. t - j
                    pos = torch.arange(n)[None]
                    f = head(embeds[b : b + 1, :n], feats[b : b + 1, :n], pos, cache)[:, -1:]
                    for i in range(1, j + 1):
                        p = torch.tensor([[t - j + i]])
                        f = head(embeds[b : b + 1, t - j + i][:, None], f, p, cache)
                    torch.testing.assert_close(outputs[j][b, t], f[0, -1], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def data_dir(chat_target: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("eagle-data")
    return write_tiny_data(chat_target, folder)


def test_windows_end_in_replies(chat_target: LoadedModel, data_dir: Path) -> None:
    import random

    convs = load_conversations(data_dir, chat_target, "train")
    assert len(convs) == 8 and all(c.features.shape[0] == c.tokens.shape[0] - 1 for c in convs)
    tokens, feats, valid = sample_windows(convs, 6, 16, random.Random(0))
    assert tokens.shape == (6, 16) and feats.shape == (6, 17, chat_target.config.hidden_size)
    assert bool(valid.any(-1).all())


def test_training_learns_and_the_head_drafts_losslessly(chat_target: LoadedModel, data_dir: Path) -> None:
    train = load_conversations(data_dir, chat_target, "train")
    val = load_conversations(data_dir, chat_target, "validation")
    cfg = EagleTrainConfig(
        steps=60, batch_size=4, window=24, ttt_steps=2, kl_rows=64, lr=3e-3, eval_interval=30
    )
    head, log = train_eagle(chat_target, train, val, cfg, progress=False)
    assert len(log.train_loss) == 60 and len(log.val_top1) == 3 and len(log.val_top1[0]) == 2
    assert sum(log.train_loss[-10:]) < sum(log.train_loss[:10])
    assert log.val_top1[-1][0] > log.val_top1[0][0]
    drafter = EagleDrafter(chat_target, head, num_draft_tokens=3, draft_vocab=0)
    prompt = train[0].tokens[: train[0].reply_start].tolist()
    plain = SpeculativeGenerator(chat_target).generate(prompt, max_new_tokens=30)
    out = SpeculativeGenerator(chat_target, drafter).generate(prompt, max_new_tokens=30)
    assert out.token_ids == plain.token_ids
    assert out.stats.accepted_tokens > 0


def test_cli_trains_and_saves_beside_the_target(chat_target: LoadedModel, data_dir: Path) -> None:
    """Without --out the head goes into the target's folder, where make_drafter finds it."""
    from specdec import make_drafter
    from specdec.cli import main

    rc = main(
        ["train", "eagle", "--target", str(chat_target.path), "--data", str(data_dir),
         "--steps", "3", "--batch-size", "2", "--window", "12", "--eval-interval", "2"]
    )  # fmt: skip
    assert rc == 0
    out = chat_target.path / "eagle"
    meta = json.loads((out / "config.json").read_text())
    assert meta["method"] == "eagle" and meta["hidden_size"] == chat_target.config.hidden_size
    report = json.loads((out / "training.json").read_text())
    assert len(report["log"]["train_loss"]) == 3
    for name in ("eagle", "auto"):
        drafter = make_drafter(name, chat_target)
        assert isinstance(drafter, EagleDrafter) and drafter.head.fc.weight.dtype == torch.float32


def test_cli_user_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from specdec.cli import main

    assert main(["train", "eagle", "--data", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("specdec: error:") and "data.json" in err[0]


def test_heads_folder(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    assert heads_folder(SimpleNamespace(path=folder), "eagle") == folder / "eagle"  # type: ignore[arg-type]
    gguf = tmp_path / "Other-1B.Q4_0.gguf"
    assert heads_folder(SimpleNamespace(path=gguf), "eagle") == tmp_path / "Other-1B.Q4_0.eagle"  # type: ignore[arg-type]
    smol = tmp_path / "SmolLM2-135M-Instruct.Q8_0.gguf"
    shipped = ASSETS / "smollm2" / "eagle"
    want = shipped if (shipped / "config.json").is_file() else tmp_path / "SmolLM2-135M-Instruct.Q8_0.eagle"
    assert heads_folder(SimpleNamespace(path=smol), "eagle") == want  # type: ignore[arg-type]
    own = tmp_path / "SmolLM2-135M-Instruct.Q8_0.eagle"
    own.mkdir()
    (own / "config.json").write_text("{}")
    assert heads_folder(SimpleNamespace(path=smol), "eagle") == own  # type: ignore[arg-type]
    assert heads_folder(SimpleNamespace(path=smol), "eagle", for_writing=True) == own  # type: ignore[arg-type]
