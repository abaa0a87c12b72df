"""Drafters for any target, as the README trains them: self-distillation data, then each of
``specdec train eagle | draft | medusa | early-exit --target T --data D``; each drafter loads
through ``make_drafter`` (``auto`` finds heads beside the target) and decodes exactly what plain
greedy decoding does; training lowers the loss; user mistakes are one line."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gguf_support import write_gguf_from_folder
from helpers import save_char_tokenizer, save_tiny_llama, write_tiny_data
from specdec import SpeculativeGenerator, load_model, make_drafter
from specdec.cli import main
from specdec.drafters.draft_model import DraftModelDrafter
from specdec.drafters.eagle import EagleDrafter
from specdec.drafters.early_exit import EarlyExitDrafter
from specdec.drafters.medusa import MedusaDrafter
from specdec.models.config import ModelLoadError
from specdec.models.loading import LoadedModel, check_compatible
from specdec.models.tokenizer import Tokenizer
from specdec.train.data import read_records
from specdec.train.draft_data import (
    distill_on_replies,
    evenly_spaced,
    init_draft,
    parse_layers,
    save_draft,
    target_weights,
)
from specdec.train.heads import HeadTrainConfig
from specdec.train.heads_data import train_on_replies
from specdec.train.replies import load_replies, sample_reply_windows, validation_windows
from specdec.train.trainer import TrainConfig

NAME = "tiny-chat"  # the data records its target's folder name: copies keep it


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random 4-layer chat Llama with a character tokenizer (end of sequence: id 0)."""
    folder = tmp_path_factory.mktemp("any-target") / NAME
    save_tiny_llama(folder, num_layers=4, init_std=0.15, seed=7, eos_token_id=0, max_position_embeddings=512)
    save_char_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def target(target_dir: Path) -> LoadedModel:
    return load_model(target_dir, dtype="float32")


@pytest.fixture(scope="module")
def data_dir(target: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``specdec train data`` on ten prompts (eight training conversations, two validation)."""
    folder = tmp_path_factory.mktemp("any-data")
    return write_tiny_data(target, folder)


def _own_target(target_dir: Path, tmp_path: Path) -> Path:
    """A fresh copy of the target (no drafter beside it yet), under the same folder name."""
    own = tmp_path / NAME
    shutil.copytree(target_dir, own)
    return own


def _assert_lossless(target: LoadedModel, drafter: object, data_dir: Path) -> None:
    rec = read_records(data_dir, "validation")[0]
    prompt = rec.token_ids[: rec.reply_start]
    plain = SpeculativeGenerator(target).generate(prompt, max_new_tokens=30)
    out = SpeculativeGenerator(target, drafter).generate(prompt, max_new_tokens=30)  # type: ignore[arg-type]
    assert out.token_ids == plain.token_ids
    assert out.stats.draft_tokens > 0


HEAD_RUNS = {
    "eagle": (EagleDrafter, ["--steps", "3", "--batch-size", "2", "--window", "12", "--eval-interval", "2"]),
    "medusa": (MedusaDrafter, ["--steps", "3", "--batch-size", "2", "--window", "16", "--num-heads", "3"]),
    "early-exit": (
        EarlyExitDrafter,
        ["--steps", "3", "--batch-size", "2", "--window", "16", "--exit-layer", "2"],
    ),
}


@pytest.mark.parametrize("method", list(HEAD_RUNS))
def test_heads_train_on_the_data_and_auto_finds_them(
    method: str, target_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    kind, flags = HEAD_RUNS[method]
    own = _own_target(target_dir, tmp_path)
    argv = ["train", method, "--target", str(own), "--data", str(data_dir), "--threads", "1", *flags]
    assert main(argv) == 0
    assert json.loads((own / method / "config.json").read_text())["method"] == method
    report = json.loads((own / method / "training.json").read_text())
    assert report["target"] == NAME
    target = load_model(own, dtype="float32")
    for name in (method, "auto"):
        drafter = make_drafter(name, target, num_draft_tokens=3)
        assert isinstance(drafter, kind)
    _assert_lossless(target, make_drafter("auto", target, num_draft_tokens=3), data_dir)


def test_draft_distils_on_the_data_and_drafts_losslessly(
    target_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """``train draft --target T --data D``: a model folder beside the target, initialised from
    the target's layers 0 and 3, sharing its tokenizer; make_drafter("draft") runs it."""
    own = _own_target(target_dir, tmp_path)
    argv = ["train", "draft", "--target", str(own), "--data", str(data_dir), "--num-layers", "2",
            "--max-steps", "4", "--batch-size", "2", "--seq-len", "32", "--warmup-steps", "1",
            "--eval-interval", "2", "--eval-batches", "1", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    folder = own / "draft"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 64
    report = json.loads((folder / "training.json").read_text())
    assert report["layers"] == [0, 3] and len(report["log"]["train_loss"]) == 4
    assert report["log"]["eval_steps"] == [0, 2, 4]
    assert cfg["specdec_embeddings"] == "target"  # the target's embeddings: frozen, not stored
    with safe_open(str(folder / "model.safetensors"), "pt") as stored:
        assert "model.embed_tokens.weight" not in stored.keys() and "model.norm.weight" in stored.keys()
    target = load_model(own, dtype="float32")
    with pytest.raises(ModelLoadError, match="target's embedding table"):
        load_model(folder)
    draft = load_model(folder, embeddings_from=target)
    torch.testing.assert_close(
        draft.module.model.embed_tokens.weight.float(),
        target.module.model.embed_tokens.weight,
        atol=0,
        rtol=0,
    )
    check_compatible(target, draft)
    assert draft.tokenizer is not None and draft.tokenizer.fingerprint() == target.tokenizer.fingerprint()  # type: ignore[union-attr]
    drafter = make_drafter("draft", target, draft=str(folder), num_draft_tokens=3)
    assert isinstance(drafter, DraftModelDrafter)
    _assert_lossless(target, drafter, data_dir)
    assert isinstance(make_drafter("auto", target, draft=str(folder)), DraftModelDrafter)
    again = tmp_path / "again"  # --init continues from the saved draft; --own-embeddings stores them
    argv = ["train", "draft", "--target", str(own), "--data", str(data_dir), "--init", str(folder),
            "--out", str(again), "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1",
            "--own-embeddings"]  # fmt: skip
    assert main(argv) == 0
    standalone = load_model(again)  # no target needed
    assert "specdec_embeddings" not in json.loads((again / "config.json").read_text())
    assert standalone.config.vocab_size == target.config.vocab_size
    report = json.loads((again / "training.json").read_text())
    assert report["init"] == str(folder) and report["log"]["val_kl"][0] == pytest.approx(
        json.loads((folder / "training.json").read_text())["log"]["val_kl"][-1], rel=0.05
    )


def test_draft_trains_over_its_draft_vocabulary(target_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """``train draft --draft-vocab N`` distils over the N most frequent reply tokens of the
    target's draft_vocab.json (refused without one); the draft then drafts with that subset and
    the output is plain greedy decoding's."""
    own = _own_target(target_dir, tmp_path)
    argv = ["train", "draft", "--target", str(own), "--data", str(data_dir), "--num-layers", "2",
            "--max-steps", "3", "--batch-size", "2", "--seq-len", "32", "--warmup-steps", "1",
            "--eval-interval", "3", "--eval-batches", "1", "--threads", "1", "--draft-vocab", "24"]  # fmt: skip
    assert main(argv) == 2  # no ranking yet
    assert main(["train", "draft-vocab", "--target", str(own), "--data", str(data_dir)]) == 0
    assert main(argv) == 0
    report = json.loads((own / "draft" / "training.json").read_text())
    assert report["draft_vocab"] == 24 and all(0 <= t <= 1 for t in report["log"]["val_top1"])
    assert all(math.isfinite(k) for k in report["log"]["val_kl"] + report["log"]["train_loss"])
    target = load_model(own, dtype="float32")
    drafter = make_drafter("draft", target, draft=str(own / "draft"), num_draft_tokens=3, draft_vocab=24)
    assert isinstance(drafter, DraftModelDrafter) and drafter.draft_vocab is not None
    assert len(drafter.draft_vocab) == 24
    _assert_lossless(target, drafter, data_dir)


def test_draft_borrowing_embeddings_runs_in_transformers_too(
    target: LoadedModel, target_dir: Path, tmp_path: Path
) -> None:
    """A draft saved without its embeddings computes the same logits in specdec and, given the
    target's transformers model (the bench's HF assisted rows), in transformers; alone, neither
    loads it silently with other embeddings."""
    from specdec.bench.methods import load_hf

    draft = init_draft(target, [0, 3])
    save_draft(draft, target, tmp_path / "d", "float32", borrow_embeddings=True)
    assert not (tmp_path / "d" / "tokenizer.json").exists()  # the target's tokenizer too
    ours = load_model(tmp_path / "d", dtype="float32", embeddings_from=target)
    assert ours.tokenizer is target.tokenizer
    hf = load_hf(str(tmp_path / "d"), torch.float32, torch.device("cpu"), embeddings_from=load_hf(
        str(target_dir), torch.float32, torch.device("cpu")))  # fmt: skip
    tokens = torch.tensor([[5, 17, 40, 3, 66]])
    with torch.no_grad():
        want = draft(tokens).logits[0]  # (T, V)
        got = ours(tokens, torch.arange(5), ours.new_cache(1, 8))[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(hf(tokens).logits[0], want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="target's embedding table"):
        load_hf(str(tmp_path / "d"), torch.float32, torch.device("cpu"))


def test_draft_from_all_layers_is_the_target(target: LoadedModel) -> None:
    """Initialised with every layer, the draft computes the target's logits (the weights are
    copied under the right names); with fewer, its layers are the chosen ones of the target."""
    tokens = torch.tensor([[5, 17, 40, 3, 66, 2, 9]])
    with torch.no_grad():
        full = init_draft(target, [0, 1, 2, 3]).eval()
        want = target(tokens, torch.arange(tokens.shape[1]), target.new_cache(1, 16))[0]  # (T, V)
        torch.testing.assert_close(full(tokens).logits[0], want, atol=1e-4, rtol=1e-4)
    part = init_draft(target, [0, 3])
    weights = target_weights(target)
    torch.testing.assert_close(
        part.state_dict()["model.layers.1.mlp.down_proj.weight"],
        weights["model.layers.3.mlp.down_proj.weight"],
    )
    assert evenly_spaced(30, 3) == [0, 14, 29] and evenly_spaced(4, 9) == [0, 1, 2, 3]
    assert parse_layers("0,2", 4) == [0, 2]
    for bad in ("0,4", "2,1", "x"):
        with pytest.raises(ValueError, match="--layers"):
            parse_layers(bad, 4)


def test_windows_score_the_replies(target: LoadedModel, data_dir: Path) -> None:
    """The positions scored are exactly those whose next token is the target's reply."""
    convs = load_replies(data_dir, target, "train")
    assert len(convs) == 8 and all(c.final.shape[0] == c.tokens.shape[0] - 1 for c in convs)
    for conv, batch in zip(convs, validation_windows(convs, 1, 200), strict=True):
        reply = conv.tokens[conv.reply_start :].tolist()
        assert batch.next_tokens[0][batch.mask[0]].tolist() == reply
        assert batch.tokens[0][batch.mask[0]].tolist() == conv.tokens[conv.reply_start - 1 : -1].tolist()
    short = sample_reply_windows(convs, 6, 8, random.Random(0))  # windows inside long replies
    assert short.tokens.shape == (6, 8) and bool(short.mask.any(-1).all())
    exits = load_replies(data_dir, target, "train", exit_layer=2)
    assert exits[0].exit is not None and exits[0].exit.shape == exits[0].final.shape
    torch.testing.assert_close(exits[0].final, convs[0].final, atol=2e-2, rtol=2e-2)  # stored in bfloat16


def test_training_lowers_the_loss(target: LoadedModel, data_dir: Path) -> None:
    train, val = load_replies(data_dir, target, "train"), load_replies(data_dir, target, "validation")
    medusa = train_on_replies(
        target,
        train,
        val,
        HeadTrainConfig("medusa", steps=30, batch_size=4, window=24, lr=1e-2),
        progress=False,
    )
    assert medusa.val_loss_after < medusa.val_loss_before
    train2, val2 = (load_replies(data_dir, target, s, exit_layer=2) for s in ("train", "validation"))
    exit_cfg = HeadTrainConfig("early-exit", steps=30, batch_size=4, window=24, lr=1e-2, exit_layer=2)
    early = train_on_replies(target, train2, val2, exit_cfg, progress=False)
    assert early.val_loss_after < early.val_loss_before
    draft = init_draft(target, [0, 3])
    cfg = TrainConfig(seq_len=48, batch_size=4, lr=3e-3, warmup_steps=2, max_steps=30, eval_interval=30)
    log = distill_on_replies(draft, target, train, val, cfg, progress=False)
    assert log.val_kl[-1] < 0.8 * log.val_kl[0]
    assert log.val_top1[-1] >= log.val_top1[0]
    assert sum(log.train_loss[-5:]) < sum(log.train_loss[:5])


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("specdec: error:"), err
    return err[0]


def test_user_errors(
    target_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = str(target_dir)
    for method in ("medusa", "early-exit"):
        assert main(["train", method, "--target", t]) == 2
        assert "--data" in _error_line(capsys)
        assert main(["train", method, "--target", t, "--data", str(tmp_path / "none")]) == 2
        assert "data.json" in _error_line(capsys)
    assert main(["train", "draft", "--target", t]) == 2
    assert "--data" in _error_line(capsys)
    other = tmp_path / "other-chat"
    save_tiny_llama(other, hidden_size=32, seed=1, eos_token_id=0)
    save_char_tokenizer(other)
    capsys.readouterr()  # (transformers' progress bar while saving it)
    for method in ("eagle", "medusa", "early-exit", "draft"):  # data another target made
        assert main(["train", method, "--target", str(other), "--data", str(data_dir)]) == 2
        assert "was made by target" in _error_line(capsys)
    d = ["train", "draft", "--target", t, "--data", str(data_dir)]
    assert main([*d, "--layers", "0,7"]) == 2
    assert "--layers" in _error_line(capsys)
    assert main([*d, "--hidden-size", "32"]) == 2
    assert "--hidden-size" in _error_line(capsys)
    assert main(["train", "medusa", "--target", t, "--data", str(data_dir), "--num-heads", "0"]) == 2
    assert "--num-heads" in _error_line(capsys)
    assert not (target_dir / "draft").exists() and not (target_dir / "medusa").exists()


def test_draft_of_a_gguf_target(target_dir: Path, target: LoadedModel, tmp_path: Path) -> None:
    """A GGUF target's weights (dequantized, Hugging Face names) initialise the draft the same
    way; a saved tokenizer reads back with the same token ids."""
    gguf_target = load_model(write_gguf_from_folder(target_dir, tmp_path / "tiny.gguf"), dtype="float32")
    ours, theirs = target_weights(gguf_target), target_weights(target)
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value)
    out = tmp_path / "tiny.draft"
    save_draft(init_draft(gguf_target, [1, 2]), gguf_target, out, "float32")
    check_compatible(gguf_target, load_model(out))
    again = target.tokenizer
    assert again is not None
    again.save(tmp_path / "tok")
    saved = Tokenizer.from_folder(tmp_path / "tok")
    assert saved is not None
    assert saved.fingerprint() == again.fingerprint() and saved.eos_token == "<eos>"
    assert saved.encode("Say cat.") == again.encode("Say cat.")
