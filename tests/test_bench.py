"""``specdec bench`` end to end on tiny random models, plus the task builders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specdec.bench.methods import parse_method
from specdec.bench.tasks import build_tasks, edit_prompts
from specdec.cli import main

METHODS = ["hf", "hf-assisted", "plain", "draft", "draft@2x2", "adaptive"]
OURS = {"plain", "draft", "draft@2x2", "adaptive"}

SOURCE = '''
def area(width, height):
    """The area of a rectangle."""
    if width < 0 or height < 0:
        raise ValueError("negative size")
    result = width * height
    print("computed", result)
    print("done")
    return result
'''


@pytest.fixture(scope="module")
def bench_out(target_path: Path, good_draft_path: Path, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--quick", "--threads", "1", "--no-progress", "--out", str(out)]
    argv += ["--target", str(target_path), "--draft", str(good_draft_path), "--methods", ",".join(METHODS)]
    assert main(argv) == 0
    return out


def test_bench_writes_json_markdown_and_plot(bench_out: Path) -> None:
    data = json.loads((bench_out / "bench.json").read_text())
    rows = {(r["task"], r["method"]): r for r in data["rows"]}
    assert {task for task, _ in rows} == {"code", "edit", "long", "overall"}
    assert {method for _, method in rows} == set(METHODS)
    for key in ("date_utc", "cpu", "cpu_count", "torch_threads", "dtype", "target", "draft"):
        assert key in data["meta"]
    for (task, method), row in rows.items():
        assert row["error"] is None, (task, method, row["error"])
        assert row["new_tokens"] == 12 * row["prompts"] and row["tokens_per_s"] > 0
        assert row["speedup_vs_plain"] > 0 and row["speedup_vs_hf"] > 0
        assert row["cpu_s"] > 0 and row["cpu_speedup_vs_plain"] > 0 and row["cpu_speedup_vs_hf"] > 0
        if task != "overall" and method in OURS - {"plain"}:
            assert 1.0 <= row["tau"] <= 1 + row["mean_draft_len"] + 1e-9
            assert set(row["time_split"]) == {"prefill", "draft", "verify", "overhead"}
            assert sum(row["time_split"].values()) == pytest.approx(1.0, abs=1e-6)
    assert all(rows[(t, "plain")]["speedup_vs_plain"] == 1.0 for t in ("code", "edit", "long"))
    assert all(rows[(t, "plain")]["tau"] == 1.0 for t in ("code", "edit", "long"))
    markdown = (bench_out / "bench.md").read_text()
    assert "| task | method | tok/s" in markdown and "hf-assisted" in markdown
    assert (bench_out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_our_methods_reproduce_plain_greedy(bench_out: Path) -> None:
    data = json.loads((bench_out / "bench.json").read_text())
    for row in data["rows"]:
        if row["method"] in OURS:
            assert row["identical"] is True and row["identical_fraction"] == 1.0, row
    # float32 HF generate runs the same greedy algorithm on the same weights
    hf = [r for r in data["rows"] if r["method"] == "hf"]
    assert all(r["identical"] for r in hf)


def test_unknown_method_is_a_one_line_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--methods", "plain,nonsense", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nonsense'" in err and err.count("\n") == 1


def test_parse_method_reads_k_suffix() -> None:
    assert parse_method("draft@8", 4) == ("draft", 8, 1, False)
    assert parse_method("plain", 4) == ("plain", 4, 1, False)
    assert parse_method("medusa@3x2", 4) == ("medusa", 3, 2, False)
    for bad in ("draft@0", "draft@4x", "draft@4x0", "draft@x2"):
        with pytest.raises(ValueError):
            parse_method(bad, 4)


def test_edit_prompt_repeats_the_function_and_stops_after_the_docstring() -> None:
    [(label, prompt)] = edit_prompts([("shapes.py", SOURCE)], 1)
    assert label == "shapes.py:area"
    first, second = prompt.split("\n\n\n")
    assert '"""' not in first and "return result" in first
    assert second == 'def area(width, height):\n    """The area of a rectangle."""\n'


def test_tasks_fit_the_context_and_keep_the_prompt_end() -> None:
    files = [("shapes.py", SOURCE * 40)]
    tasks = build_tasks(["code", "edit", "long"], 2, None, 96, context=256, max_new_tokens=32, files=files)
    assert [t.name for t in tasks] == ["code", "edit", "long"]
    for task in tasks:
        assert task.max_new_tokens == 32
        for prompt in task.prompts:
            assert 0 < len(prompt) <= 256 - 32 - 64 and max(prompt) < 96
    with pytest.raises(ValueError, match="do not fit"):
        build_tasks(["long"], 1, None, 96, context=256, max_new_tokens=512, files=files)


def test_cost_curve_measures_resumes_and_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from specdec.bench import cost_curve

    tiny = cost_curve.llama_config(64, 2, 128, 4, 2)
    monkeypatch.setitem(cost_curve.SIZES, "tiny", tiny)
    monkeypatch.setattr(cost_curve, "copy_bandwidth", lambda clock, device: 1e9)
    monkeypatch.setattr(cost_curve, "read_bandwidth", lambda clock, device: 0.5e9)  # the floor takes the faster
    data = cost_curve.measure(
        tmp_path, ["tiny"], ["float32"], [1, 2, 3], repeats=1, new_tokens=4, progress=False
    )
    entry = data["entries"]["tiny/float32"]
    for clock in ("wall", "cpu"):
        times = entry[f"forward_{clock}_s"]
        assert sorted(times) == ["1", "2", "3"] and all(t > 0 for t in times.values())
        assert entry[f"plain_{clock}_s_per_token"] > 0
    assert data["clock"] == "cpu"  # the tests run one torch thread
    module = cost_curve.random_model(tiny, torch.float32)
    embedding = 32000 * 64 * 4
    assert entry["streamed_weight_bytes"] == tiny.num_parameters * 4 - embedding
    assert cost_curve.streamed_weight_bytes(module) == entry["streamed_weight_bytes"]
    assert entry["bandwidth_floor_s"] == pytest.approx(entry["streamed_weight_bytes"] / 1e9)

    def must_not_run(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a measured entry was measured again")

    monkeypatch.setattr(cost_curve, "forward_times", must_not_run)
    again = cost_curve.measure(tmp_path, ["tiny"], ["float32"], [1, 2, 3], progress=False)
    assert again["entries"] == data["entries"]
    cost_curve.plot(again, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert "| tiny | float32 |" in cost_curve.to_markdown(again)


def test_decode_efficiency_leaves_each_sides_prefill_out() -> None:
    from specdec.bench.runner import Row, _with_speedups

    split = {"draft": 0.0, "verify": 0.0, "overhead": 0.0}
    # plain: 1 s prefill + 4 s decoding 100 tokens; a drafter: the same 1 s prefill + 1 s decoding
    plain = Row("t", "plain", new_tokens=100, wall_s=5.0, tau=1.0, time_split={**split, "prefill": 0.2})
    fast = Row("t", "ngram", new_tokens=100, wall_s=2.0, tau=5.0, time_split={**split, "prefill": 0.5})
    rows = {r.method: r for r in _with_speedups([plain, fast])}
    assert rows["ngram"].speedup_vs_plain == pytest.approx(2.5)
    assert rows["ngram"].efficiency == pytest.approx(0.5)  # the prefill caps the wall-clock ratio
    assert rows["ngram"].decode_speedup_vs_plain == pytest.approx(4.0)
    assert rows["ngram"].decode_efficiency == pytest.approx(0.8)
    assert rows["plain"].decode_efficiency == pytest.approx(1.0)


def test_own_prompts_file_makes_its_tasks(target_path: Path, good_draft_path: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "mine.jsonl"
    lines = [
        {"prompt": "def add(a, b):\n    return", "task": "snippets"},
        {"prompt": [5, 9, 11, 3], "task": "snippets"},
        {"prompt": "x = [1, 2, 3]\n" * 4, "task": "lists", "max_new_tokens": 20},
        "import os\n" * 600,  # longer than the context: cut to its end, and said so
    ]
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    argv = ["bench", "--prompts", str(prompts), "--runs", "1", "--threads", "1", "--no-progress", "--out", str(out)]
    argv += ["--target", str(target_path), "--draft", str(good_draft_path), "--methods", "plain,draft"]
    argv += ["--max-new-tokens", "10"]
    assert main(argv) == 0
    data = json.loads((out / "bench.json").read_text())
    rows = {(r["task"], r["method"]): r for r in data["rows"]}
    assert {task for task, _ in rows} == {"snippets", "lists", "custom", "overall"}
    assert rows[("snippets", "draft")]["prompts"] == 2 and rows[("snippets", "draft")]["new_tokens"] == 20
    assert all(r["identical"] for r in data["rows"])
    assert "prompts of mine.jsonl" in (out / "bench.md").read_text()
    [cut] = data["meta"]["cut_prompts"]
    assert cut.startswith("mine.jsonl:4 (its last ") and cut.endswith(" of 6000 tokens)")
    assert f"Prompts cut to fit the context: {cut}." in (out / "bench.md").read_text()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "no prompt field"}\n', 'mine.jsonl:1: expected a string or an object with a "prompt" field'),
        ('"fine"\n{"prompt": ""}\n', 'mine.jsonl:2: "prompt" must be a non-empty string'),
        ('{"prompt": "a", "max_new_tokens": 0}\n', '"max_new_tokens" must be an integer >= 1'),
        ("{not json\n", "not JSON lines or a JSON list"),
        ("\n\n", "holds no prompt"),
        ('["fine", {"prompt": []}]', 'mine.jsonl entry 2: "prompt" must be a non-empty string'),
    ],
)
def test_bad_prompts_file_is_a_one_line_user_error(tmp_path: Path, capsys, content: str, message: str) -> None:  # type: ignore[no-untyped-def]
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text(content)
    assert main(["bench", "--prompts", str(prompts), "--quick"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_drafters_bench_with_a_reduced_draft_vocabulary(target_path: Path, good_draft_path: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from specdec import load_model
    from specdec.drafters.heads import new_head, save_head
    from specdec.drafters.vocab import write_draft_vocab

    folder = tmp_path / "target"
    shutil.copytree(target_path, folder)
    cfg = load_model(folder, dtype="float32").config
    save_head(new_head("eagle", cfg), folder / "eagle", cfg)
    write_draft_vocab(folder, list(range(cfg.vocab_size)), 1, "test")
    out = tmp_path / "out"
    argv = ["bench", "--quick", "--threads", "1", "--no-progress", "--out", str(out), "--target", str(folder),
            "--draft", str(good_draft_path)]  # fmt: skip
    assert main([*argv, "--methods", "plain,eagle,adaptive", "--draft-vocab", "16"]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["draft_vocab"] == {"eagle": 16, "adaptive": 16}
    assert all(r["identical"] and r["error"] is None for r in data["rows"])
    footer = "score the most frequent tokens only (draft_vocab.json): eagle 16, adaptive 16"
    assert footer in (out / "bench.md").read_text()
    capsys.readouterr()
    assert main([*argv, "--methods", "plain,eagle", "--draft-vocab", "-2"]) == 2
    assert "--draft-vocab must be >= 0" in capsys.readouterr().err


def test_sampled_bench_uses_the_same_seeds_and_claims_no_identity(
    target_path: Path, good_draft_path: Path, tmp_path: Path
) -> None:
    """``--temperature``: every method samples with the same seeds; outputs are not compared token
    for token (they follow the target's distribution), and plain decoding's own repeat runs with
    a prompt's seeds differ from each other (it really samples)."""
    from specdec.bench.methods import build_method
    from specdec.bench.runner import BenchConfig
    from specdec.models import load_model
    from specdec.sampling import SamplingParams

    out = tmp_path / "sampled"
    argv = ["bench", "--quick", "--threads", "1", "--no-progress", "--out", str(out), "--temperature", "0.9"]
    argv += ["--top-p", "0.95", "--target", str(target_path), "--draft", str(good_draft_path)]
    assert main(argv + ["--methods", "hf,plain,draft"]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["config"]["sampling"] == {"temperature": 0.9, "top_k": None, "top_p": 0.95}
    for row in data["rows"]:
        assert row["error"] is None and row["tokens_per_s"] > 0
        assert row["identical"] is None and row["identical_fraction"] is None
    assert "sampled at temperature 0.9, top-p 0.95" in (out / "bench.md").read_text()

    target = load_model(target_path, dtype="float32")
    plain = build_method("plain", target, str(good_draft_path), 4, {})
    sampling = SamplingParams(0.9, top_p=0.95)
    first = plain.generate([1, 2, 3], 24, sampling, seed=7).token_ids
    assert plain.generate([1, 2, 3], 24, sampling, seed=7).token_ids == first
    assert any(plain.generate([1, 2, 3], 24, sampling, seed=s).token_ids != first for s in range(8, 12))
    assert BenchConfig().greedy  # Spec-Bench's setting stays the default


def test_bad_sampling_options_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--temperature", "-1"]) == 2
    assert main(["bench", "--quick", "--temperature", "0.7", "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "temperature must be >= 0" in err[0] and "top_p must be in (0, 1]" in err[1]
