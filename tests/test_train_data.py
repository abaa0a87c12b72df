"""Self-distillation data: offline prompts (reproducible, split, never the bench's), batched
answers equal to the target's own decoding, resumable shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import save_char_tokenizer, save_tiny_llama
from specdec import SpeculativeGenerator, load_model
from specdec.models.loading import LoadedModel
from specdec.sampling import SamplingParams
from specdec.train import data as data_module
from specdec.train.data import DataConfig, answer_batch, build_data, read_hidden, read_records
from specdec.train.prompts import (
    TEMPLATES,
    Prompt,
    bench_texts,
    build_prompts,
    math_problems,
    overlaps_bench,
    split_of,
)


@pytest.fixture(scope="module")
def prompts() -> list[Prompt]:
    return build_prompts(120, seed=0)


@pytest.fixture(scope="module")
def chat_target(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny random Llama with a character tokenizer (end of sequence: id 0)."""
    folder = tmp_path_factory.mktemp("chat-target")
    save_tiny_llama(folder, init_std=0.15, seed=3, eos_token_id=0, max_position_embeddings=1024)
    save_char_tokenizer(folder)
    return load_model(folder, dtype="float32")


def test_prompts_are_reproducible_and_cover_every_task(prompts: list[Prompt]) -> None:
    again = build_prompts(120, seed=0)
    assert [p.key for p in again] == [p.key for p in prompts]
    assert build_prompts(40, seed=0) == prompts[:40]  # a longer run extends a shorter one
    tasks = {p.task for p in prompts}
    assert set(TEMPLATES) | {"code", "math"} <= tasks
    assert any(len(p.turns) == 2 for p in prompts) and any(len(p.turns) == 1 for p in prompts)
    assert len({p.key for p in prompts}) == len(prompts)
    assert {p.split for p in prompts} == {"train", "validation"}
    assert all(p.split == split_of(p.turns[0]) for p in prompts)
    assert build_prompts(40, seed=1) != prompts[:40]


def test_no_prompt_overlaps_the_bench(prompts: list[Prompt]) -> None:
    bench = bench_texts()
    assert len(bench) >= 64
    assert all(overlaps_bench(text) for text in bench[:8])  # the check finds a bench prompt
    assert overlaps_bench("Please " + bench[0][:200] + " thanks")  # and a bench prompt inside another
    texts = [turn for p in prompts for turn in p.turns]
    assert not any(overlaps_bench(t) for t in texts)
    assert not set(texts) & set(bench)


def test_math_problems_are_seeded() -> None:
    assert math_problems(5, seed=2) == math_problems(5, seed=2) != math_problems(5, seed=3)


def test_batched_greedy_answers_equal_plain_decoding(chat_target: LoadedModel) -> None:
    """Rows of different lengths decoded in one cache give each prompt's own greedy reply, and
    the hidden states the target computed on the way are its forward's."""
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40, 41, 42, 43, 44]]
    stop = frozenset([0])
    replies, hidden = answer_batch(
        chat_target, prompts, stop, 12, [False] * 3, SamplingParams(), torch.Generator().manual_seed(0)
    )
    plain = SpeculativeGenerator(chat_target)
    for p, reply, h in zip(prompts, replies, hidden, strict=True):
        want = plain.generate(p, max_new_tokens=12).token_ids
        assert reply[: len(want)] == want and (len(reply) == 12 or reply[-1] == 0)
        ids = torch.tensor(p + reply)[:-1]
        cache = chat_target.new_cache(1, ids.shape[0])
        _, ref = chat_target(ids[None], torch.arange(ids.shape[0]), cache, num_logits=0, return_hidden=True)
        assert h.shape == (len(p) + len(reply) - 1, chat_target.config.hidden_size)
        torch.testing.assert_close(h, ref[0], atol=1e-4, rtol=1e-4)


def test_sampled_rows_differ_from_greedy(chat_target: LoadedModel) -> None:
    prompts = [[5, 6, 7]] * 4
    gen = torch.Generator().manual_seed(0)
    replies, _ = answer_batch(
        chat_target, prompts, frozenset(), 16, [False, False, True, True], SamplingParams(1.0), gen
    )
    assert replies[0] == replies[1]
    assert replies[2] != replies[0] or replies[3] != replies[0]


def _fake_prompts(count: int, seed: int = 0) -> list[Prompt]:
    out = []
    for i in range(count):
        turns = (f"Say something about {i}.",) if i % 3 else (f"Tell me about {i}.", "Shorter please.")
        out.append(Prompt(f"{i:016x}", "answer", "test", turns, "validation" if i % 4 == 0 else "train"))
    return out


def test_build_data_writes_shards_and_resumes(
    chat_target: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data_module, "build_prompts", _fake_prompts)
    cfg = DataConfig(num_prompts=4, max_new_tokens=6, batch_size=3, sampled_percent=50)
    assert list(build_data(chat_target, tmp_path, cfg, progress=False)) == [3, 4]
    first = read_records(tmp_path)
    assert [r.key for r in first] == [p.key for p in _fake_prompts(4)]
    # the multi-turn conversation holds both turns and both replies; token ids end with the last reply
    two = first[0]
    assert [m["role"] for m in two.messages] == ["user", "assistant", "user", "assistant"]
    assert "Tell me about 0." in chat_target.tokenizer.decode(two.token_ids)  # type: ignore[union-attr]
    assert 0 < two.reply_start < len(two.token_ids)
    assert {r.mode for r in first} <= {"greedy", "sampled"}
    hidden = read_hidden(tmp_path)
    assert all(hidden[r.key].shape[0] == len(r.token_ids) - 1 for r in first)
    # a rerun with more prompts answers only the new ones
    more = DataConfig(num_prompts=6, max_new_tokens=6, batch_size=3, sampled_percent=50)
    assert list(build_data(chat_target, tmp_path, more, progress=False)) == [2]
    records = read_records(tmp_path)
    assert [r.key for r in records] == [p.key for p in _fake_prompts(6)]
    assert records[:4] == first
    assert {r.key for r in read_records(tmp_path, "validation")} == {f"{0:016x}", f"{4:016x}"}
    assert json.loads((tmp_path / "data.json").read_text())["vocab_size"] == chat_target.config.vocab_size


def test_data_of_another_target_is_refused(chat_target: LoadedModel, tmp_path: Path) -> None:
    from specdec.train.data import check_manifest

    (tmp_path / "data.json").write_text(json.dumps({"target": "x", "vocab_size": 7}))
    with pytest.raises(ValueError, match="was made by target"):
        check_manifest(tmp_path, chat_target)
    with pytest.raises(ValueError, match="no data.json"):
        check_manifest(tmp_path / "nothing", chat_target)
