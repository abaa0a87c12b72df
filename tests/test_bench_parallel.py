"""``specdec bench`` rows that draft in parallel with verification (``draft+parallel``,
``draft@K+parallel``): the spelling, the thread split, and identical output on the demo pair."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from specdec.bench.methods import SpecdecMethod, parse_method
from specdec.cli import main


@pytest.fixture
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_parse_method_reads_the_parallel_suffix() -> None:
    assert parse_method("draft+parallel", 4) == ("draft", 4, 1, True)
    assert parse_method("draft@6+parallel", 4) == ("draft", 6, 1, True)
    assert parse_method("draft@6", 4).parallel is False


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("draft+paralel", "method 'draft+paralel': write NAME[@K]+parallel"),
        ("draft+parallel@4", "method 'draft+parallel@4': write NAME[@K]+parallel"),
        ("ngram+parallel", "method 'ngram+parallel': only a chain of a draft model drafts in parallel"),
        ("draft@4x2+parallel", "method 'draft@4x2+parallel': only a chain of a draft model drafts in parallel"),
        ("plain+parallel", "method 'plain+parallel': only a chain"),
        ("hf-assisted+parallel", "method 'hf-assisted+parallel': only a chain"),
        ("nonsense+parallel", "unknown method 'nonsense'"),
        ("draft@0+parallel", "write NAME@K or NAME@KxW"),
    ],
)
def test_bad_parallel_spellings_are_one_line_user_errors(
    method: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--quick", "--methods", f"plain,{method}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("specdec: error: ")


def test_a_row_runs_on_its_own_threads_and_restores_the_process_s(restore_threads: None) -> None:
    seen: list[int] = []

    def generate(prompt_ids: list[int], max_new_tokens: int, **kwargs: object) -> SimpleNamespace:
        seen.append(torch.get_num_threads())
        return SimpleNamespace(token_ids=[1] * max_new_tokens, stats=None)

    torch.set_num_threads(2)
    method = SpecdecMethod("draft+parallel", SimpleNamespace(generate=generate), target_threads=1)  # type: ignore[arg-type]
    assert method.generate([1, 2], 3).token_ids == [1, 1, 1]
    assert seen == [1] and torch.get_num_threads() == 2


def test_quick_bench_on_the_demo_pair_runs_the_parallel_row_with_plain_s_output(
    tmp_path: Path, restore_threads: None
) -> None:
    """``--threads 2``: the parallel rows verify on one thread and draft on the other, and
    every row's tokens equal plain greedy decoding's."""
    out = tmp_path / "bench"
    argv = ["bench", "--quick", "--threads", "2", "--no-progress", "--out", str(out), "--target", "demo-target"]
    argv += ["--draft", "demo-draft", "--methods", "plain,draft,draft+parallel,draft@2+parallel"]
    assert main(argv) == 0
    assert torch.get_num_threads() == 2  # the parallel rows gave the process its threads back
    data = json.loads((out / "bench.json").read_text())
    rows = {(r["task"], r["method"]): r for r in data["rows"]}
    assert {m for _, m in rows} == {"plain", "draft", "draft+parallel", "draft@2+parallel"}
    for (task, method), row in rows.items():
        assert row["error"] is None, (task, method, row["error"])
        assert row["identical"] is True and row["identical_fraction"] == 1.0, (task, method)
        assert row["new_tokens"] == 12 * row["prompts"] and row["tokens_per_s"] > 0
        if task != "overall" and method.endswith("+parallel"):
            assert 1.0 <= row["tau"] <= 1 + row["mean_draft_len"] + 1e-9
    assert rows[("code", "draft@2+parallel")]["mean_draft_len"] <= 2
    split = {"target": 1, "draft": 1}
    assert data["meta"]["parallel_threads"] == {"draft+parallel": split, "draft@2+parallel": split}
    footer = "torch threads, target + draft: draft+parallel 1 + 1, draft@2+parallel 1 + 1."
    assert footer in (out / "bench.md").read_text()
