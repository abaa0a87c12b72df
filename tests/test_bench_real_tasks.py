"""The real-model chat task suite of ``specdec bench``: the packaged prompts, their rendering,
the default task choice, and a run with the Hugging Face peers (prompt lookup included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specdec.bench.real_tasks import PROVENANCE, REAL_TASKS, load_records
from specdec.bench.tasks import TASKS, build_tasks, default_tasks
from specdec.cli import main
from specdec.engine.chat import validate_messages


@pytest.mark.parametrize("task", REAL_TASKS)
def test_each_task_has_eight_prompts_of_ours_ending_with_a_user_turn(task: str) -> None:
    records = load_records(task)
    assert len(records) >= 8
    assert len({r.id for r in records}) == len(records)
    for record in records:
        assert record.task == task and record.provenance == PROVENANCE == "written for specdec"
        messages = validate_messages(list(record.messages))  # roles and contents well formed
        assert messages[-1]["role"] == "user" and len(messages[-1]["content"]) > 20


def test_the_prompt_files_ship_with_the_package() -> None:
    import specdec.bench

    folder = Path(specdec.bench.__file__).parent / "prompts"
    assert sorted(p.stem for p in folder.glob("*.jsonl")) == sorted(REAL_TASKS)
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert '"bench/prompts/*.jsonl"' in pyproject


def test_conversation_and_rag_prompts_have_their_shape() -> None:
    for record in load_records("conversation"):
        roles = [m["role"] for m in record.messages if m["role"] != "system"]
        assert roles[:3] == ["user", "assistant", "user"]  # a history, then the follow-up
    for record in load_records("rag"):
        assert "Passage:" in record.messages[-1]["content"] and "Question:" in record.messages[-1]["content"]


def test_real_tasks_render_through_the_chat_template() -> None:
    from specdec import load_model

    demo = load_model("demo-target", dtype="float32")
    tok = demo.tokenizer
    [task] = build_tasks(["rewrite"], 2, tok, demo.config.vocab_size, demo.max_seq_len, max_new_tokens=16)
    assert task.sources == ("rewrite-1", "rewrite-2") and task.max_new_tokens == 16
    first = load_records("rewrite")[0].messages[-1]["content"]
    text = task.text(0)
    assert text is not None and first in text  # the user's message inside the template's rendering
    assert list(task.prompts[0]) == list(tok.encode(text, add_special_tokens=True))


def test_real_tasks_without_a_tokenizer_are_bytes_of_the_plain_transcript() -> None:
    tasks = build_tasks(["qa", "math"], None, None, 96, context=512, max_new_tokens=8)
    assert [t.name for t in tasks] == ["qa", "math"]
    for task in tasks:
        assert len(task.prompts) == 8  # every prompt unless told
        for i, prompt in enumerate(task.prompts):
            text = task.text(i)
            assert text is not None and text.startswith("<|user|>\n") and text.endswith("<|assistant|>\n")
            assert list(prompt) == [b % 96 for b in text.encode("utf-8")]


def test_a_long_chat_prompt_is_cut_and_loses_its_text() -> None:
    [task] = build_tasks(["summarisation"], 1, None, 96, context=256, max_new_tokens=16)
    assert len(task.prompts[0]) == 256 - 16 - 64 and task.text(0) is None
    assert task.cut and task.cut[0].startswith("summarisation-1 (its last 176 of ")


def test_default_tasks_are_the_code_tasks_on_the_demo_pair_and_the_suite_elsewhere(tmp_path: Path) -> None:
    from specdec import load_model
    from specdec.models.loading import ASSETS

    demo = load_model("demo-target", dtype="float32")
    assert default_tasks(ASSETS / "demo-target", demo.tokenizer) == TASKS  # it has a template, still code

    class Chatty:
        chat_template = "{{ messages }}"

    assert default_tasks(tmp_path, Chatty()) == REAL_TASKS
    assert default_tasks(tmp_path, None) == TASKS


@pytest.fixture(scope="module")
def real_bench(target_path: Path, good_draft_path: Path, tmp_path_factory) -> dict:  # type: ignore[no-untyped-def,type-arg]
    out = tmp_path_factory.mktemp("bench-real")
    argv = ["bench", "--tasks", "rewrite,math", "--num-prompts", "1", "--max-new-tokens", "8", "--runs", "1"]
    argv += ["--threads", "1", "--no-progress", "--out", str(out), "--target", str(target_path)]
    argv += ["--draft", str(good_draft_path), "--methods", "plain,ngram,draft,hf,hf-lookup,hf-assisted"]
    assert main(argv) == 0
    return json.loads((out / "bench.json").read_text()) | {"out": str(out)}


def test_every_speculative_row_is_checked_against_plain_greedy(real_bench: dict) -> None:  # type: ignore[type-arg]
    rows = {(r["task"], r["method"]): r for r in real_bench["rows"]}
    assert {t for t, _ in rows} == {"rewrite", "math", "overall"}
    assert real_bench["meta"]["tasks"] == ["rewrite", "math"]
    assert real_bench["sources"] == {"rewrite": ["rewrite-1"], "math": ["math-1"]}
    for (task, method), row in rows.items():
        assert row["error"] is None, (task, method)
        assert row["new_tokens"] == 8 * row["prompts"] and row["tokens_per_s"] > 0
        # ours are exact; HF's float32 greedy search (plain, prompt lookup, assisted) agrees here too
        assert row["identical"] is True and row["identical_fraction"] == 1.0, (task, method)
    markdown = Path(real_bench["out"], "bench.md").read_text()
    assert "| rewrite | hf-lookup |" in markdown and "1 prompts/task" in markdown


def test_sampled_rows_are_not_compared_token_by_token(target_path: Path, tmp_path: Path) -> None:
    argv = ["bench", "--tasks", "translation", "--num-prompts", "1", "--max-new-tokens", "6", "--runs", "1"]
    argv += ["--threads", "1", "--no-progress", "--out", str(tmp_path), "--target", str(target_path)]
    argv += ["--methods", "plain,ngram", "--temperature", "0.7"]
    assert main(argv) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert all(r["identical"] is None and r["new_tokens"] == 6 for r in data["rows"] if r["task"] != "overall")
    assert "sampled at temperature 0.7" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "conversation,chess"], "unknown task 'chess'; choose from all, code, edit, long, conversation"),
        (["--methods", "plain,llama.cpp-lookup"], "llama.cpp-lookup needs a llama.cpp build: --llama-cpp DIR"),
        (["--llama-cpp", "/nonexistent/llama"], "--llama-cpp /nonexistent/llama: not a folder"),
    ],
)
def test_bad_task_or_peer_options_are_one_line_user_errors(argv: list[str], message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_tasks_all_means_the_chat_suite() -> None:
    import argparse

    from specdec.bench.command import add_arguments, bench_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = bench_config(parser.parse_args(["--tasks", "all", "--methods", "plain"]))
    assert config.tasks == REAL_TASKS and config.num_prompts is None
    assert bench_config(parser.parse_args(["--methods", "plain"])).tasks == ()  # chosen by the target


def test_chat_prompts_decode_as_many_tokens_as_plain_takes_to_end_its_reply(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Greedy chat rows decode plain's reply length (end-of-turn token included) for every method,
    # not max_new_tokens past the end of the reply; other tasks keep their fixed count.
    import specdec.engine.chat
    from specdec import SpeculativeGenerator, load_model
    from specdec.bench.methods import SpecdecMethod
    from specdec.bench.runner import _reply_length
    from specdec.bench.tasks import Task

    demo = load_model("demo-target", dtype="float32")
    plain = SpecdecMethod("plain", SpeculativeGenerator(demo))
    prompt = tuple(demo.tokenizer.encode("def add(a, b):\n    return a + b\n"))
    free = plain.generator.generate(list(prompt), max_new_tokens=64, ignore_eos=True).token_ids
    end = free[10]  # stands in for the end-of-turn token: plain first emits it at index free.index(end)
    monkeypatch.setattr(specdec.engine.chat, "end_of_turn_ids", lambda tokenizer: frozenset([end]))
    fixed = Task("code", (prompt,), 64, ("x",))
    chat = Task("qa", (prompt,), 64, ("x",), ends_with_reply=True)
    assert _reply_length(plain, fixed, prompt) == 64
    assert _reply_length(plain, chat, prompt) == free.index(end) + 1 <= 11
