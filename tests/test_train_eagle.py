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


# ------------------------------------------------------------------ EAGLE-3's fused features
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_target_rows_with_feature_layers_keep_the_pass_bit_for_bit(
    chat_target: LoadedModel, dtype: str
) -> None:
    """Asking for layer outputs changes nothing else: the same logits, final states and cache."""
    target = load_model(chat_target.path, dtype=dtype)
    d = target.config.hidden_size
    ids = torch.randint(target.config.vocab_size, (1, 21))
    plain, fused = target.new_cache(1, 32), target.new_cache(1, 32)
    logits, h = target(ids, torch.arange(21), plain, return_hidden=True)
    logits2, rows = target(ids, torch.arange(21), fused, return_hidden=True, feature_layers=(0, 1))
    assert rows.shape == (1, 21, 3 * d)
    assert torch.equal(logits, logits2) and torch.equal(h, rows[..., 2 * d :])
    assert torch.equal(plain.k, fused.k) and torch.equal(plain.v, fused.v)
    # the first block is layer 0's output: what running layer 0 alone gives
    layer0 = target.module.run_layers(
        target.module.model.embed_tokens(ids),
        torch.arange(21)[None],
        target.new_cache(1, 32),
        layers=range(0, 1),
    )
    torch.testing.assert_close(rows[..., :d].float(), layer0.float(), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="increase"):
        target(ids, torch.arange(21), target.new_cache(1, 32), return_hidden=True, feature_layers=(1, 0))


def test_fused_head_trains_from_an_eagle1_head_and_drafts_losslessly(
    chat_target: LoadedModel, data_dir: Path, tmp_path: Path
) -> None:
    """--init with an EAGLE-1 head: the fused head starts as that head (same drafts), learns,
    saves and loads with its layers, and drafts with output identical to plain decoding."""
    from specdec.drafters.heads import load_head, save_head
    from specdec.train.eagle import default_feature_layers

    layers = default_feature_layers(chat_target.config.num_hidden_layers)
    assert layers == (0, 1) and default_feature_layers(30) == (2, 15)
    base_cfg = EagleTrainConfig(
        steps=20, batch_size=4, window=24, ttt_steps=2, kl_rows=64, lr=3e-3, eval_interval=10
    )
    train1 = load_conversations(data_dir, chat_target, "train")
    val1 = load_conversations(data_dir, chat_target, "validation")
    eagle1, _ = train_eagle(chat_target, train1, val1, base_cfg, progress=False)
    save_head(eagle1, tmp_path / "eagle1", chat_target.config)

    train = load_conversations(data_dir, chat_target, "train", layers)
    val = load_conversations(data_dir, chat_target, "validation", layers)
    d = chat_target.config.hidden_size
    assert all(c.features.shape == (c.tokens.shape[0] - 1, 3 * d) for c in train)
    assert list(data_dir.glob("features-0-1-*.safetensors"))  # kept for the next run
    for a, b in zip(train1, train, strict=True):  # the final states are the last block
        assert torch.equal(a.features, b.features[:, 2 * d :])
    cfg = EagleTrainConfig(
        steps=0, batch_size=4, window=24, ttt_steps=2, kl_rows=64, lr=3e-3, eval_interval=10,
        init=str(tmp_path / "eagle1"), feature_layers=layers,
    )  # fmt: skip
    start, log0 = train_eagle(chat_target, train, val, cfg, progress=False)
    assert start.feature_layers == layers
    _, log1 = train_eagle(chat_target, train1, val1, EagleTrainConfig(**{**base_cfg.__dict__, "steps": 0, "init": str(tmp_path / "eagle1")}), progress=False)  # fmt: skip
    assert log0.val_top1[-1] == pytest.approx(log1.val_top1[-1], abs=1e-6)  # the EAGLE-1 head's agreement

    trained, log = train_eagle(
        chat_target, train, val, EagleTrainConfig(**{**cfg.__dict__, "steps": 30}), progress=False
    )
    assert sum(log.train_loss[-5:]) < sum(log.train_loss[:5])
    save_head(trained, tmp_path / "eagle3", chat_target.config)
    loaded = load_head(tmp_path / "eagle3", chat_target.config, "eagle", torch.float32, "cpu")
    assert isinstance(loaded, type(trained)) and loaded.feature_layers == layers
    for width in (1, 2):
        drafter = EagleDrafter(
            chat_target, tmp_path / "eagle3", num_draft_tokens=3, tree_width=width, draft_vocab=0
        )
        assert drafter.capabilities.feature_layers == layers
        for conv in val[:2] + train[:2]:
            prompt = conv.tokens[: conv.reply_start].tolist()
            plain = SpeculativeGenerator(chat_target).generate(prompt, max_new_tokens=30)
            out = SpeculativeGenerator(chat_target, drafter).generate(prompt, max_new_tokens=30)
            assert out.token_ids == plain.token_ids
    assert out.stats.accepted_tokens > 0


def test_cli_feature_layers(
    chat_target: LoadedModel, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from specdec.cli import main

    base = ["train", "eagle", "--target", str(chat_target.path), "--data", str(data_dir), "--steps", "2",
            "--batch-size", "2", "--window", "12", "--eval-interval", "2"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "e1"), "--feature-layers", "none"]) == 0
    assert "feature_layers" not in json.loads((tmp_path / "e1" / "config.json").read_text())
    assert main([*base, "--out", str(tmp_path / "e3"), "--feature-layers", "1"]) == 0
    assert json.loads((tmp_path / "e3" / "config.json").read_text())["feature_layers"] == [1]
    capsys.readouterr()
    for bad in ("1,0", "5", "x"):
        assert main([*base, "--out", str(tmp_path / "bad"), "--feature-layers", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--feature-layers" in err[0]
    # an EAGLE-1 head continued with fusion; a fused head continued with other layers is refused
    assert (
        main([*base, "--out", str(tmp_path / "e3b"), "--init", str(tmp_path / "e1"), "--feature-layers", "0"])
        == 0
    )
    capsys.readouterr()
    assert (
        main([*base, "--out", str(tmp_path / "bad"), "--init", str(tmp_path / "e3"), "--feature-layers", "0"])
        == 2
    )
    assert "fuses layers [1]" in capsys.readouterr().err
    assert (
        main(
            [
                *base,
                "--out",
                str(tmp_path / "bad"),
                "--init",
                str(tmp_path / "e3"),
                "--feature-layers",
                "none",
            ]
        )
        == 2
    )
    assert "--feature-layers 1 continues it" in capsys.readouterr().err
