"""The ``specdec`` CLI: streaming generation, JSON output, the check command, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from helpers import save_char_tokenizer, save_tiny_llama
from specdec.cli import main


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    target = save_tiny_llama(d / "target", init_std=0.15, seed=0, eos_token_id=0)
    draft = save_tiny_llama(d / "draft", seed=1, base=target, noise=0.05)
    for folder in (target, draft):
        save_char_tokenizer(folder)
    other = save_tiny_llama(d / "other-vocab", vocab_size=120)
    return {"target": str(target), "draft": str(draft), "other": str(other), "dir": d}


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_text_and_stats(pair, capsys):
    code, out, err = run_cli(
        capsys,
        "generate",
        "def f(x):",
        "--target",
        pair["target"],
        "--draft",
        pair["draft"],
        "--max-new-tokens",
        "20",
        "-k",
        "3",
    )
    assert code == 0
    assert len(out.strip("\n")) > 0
    assert "mean accepted length" in err and "acceptance" in err


def test_generate_json_matches_plain(pair, capsys):
    common = ["--target", pair["target"], "--max-new-tokens", "24", "--json", "--dtype", "float32"]
    _, spec, _ = run_cli(capsys, "generate", "abc", "--draft", pair["draft"], *common)
    _, plain, _ = run_cli(capsys, "generate", "abc", "--drafter", "none", *common)
    spec, plain = json.loads(spec), json.loads(plain)
    assert spec["token_ids"] == plain["token_ids"] and spec["text"] == plain["text"]
    assert set(spec["stats"]) >= {
        "target_forwards",
        "acceptance_rate",
        "mean_accepted_length",
        "per_position_acceptance",
    }
    assert plain["stats"]["draft_tokens"] == 0


def test_check_passes_for_a_correct_pair(pair, capsys):
    code, out, _ = run_cli(
        capsys,
        "check",
        "--target",
        pair["target"],
        "--draft",
        pair["draft"],
        "--samples",
        "600",
        "--max-new-tokens",
        "16",
        "--first-tokens",
        "8",
        "--prompt",
        "x = ",
    )
    assert code == 0, out
    assert out.strip().endswith("PASS") and "greedy equality: 1/1" in out and "chi-square p" in out


BAD_INPUTS = [
    (["--target", "/nonexistent/model"], "no such model folder"),
    (["--target", "{dir}"], "not a Hugging Face model folder"),
    (["--draft", "{other}"], "vocabulary mismatch"),
    (["-k", "0"], "--num-draft-tokens must be >= 1"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--drafter", "telepathy"], "invalid choice"),
    (["--device", "nonsense"], "unknown device 'nonsense'"),
    (["--device", "cuda:99"], "device 'cuda:99' is not available here"),  # (no GPU, or not 100 of them)
]


@pytest.mark.parametrize("extra,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_one_clear_line(pair, capsys, extra, message):
    argv = ["generate", "hello", "--target", pair["target"], "--draft", pair["draft"]]
    argv += [a.format(**pair) for a in extra]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_prompt_longer_than_context(pair, capsys):
    code, _, err = run_cli(capsys, "generate", "y" * 300, "--target", pair["target"], "--drafter", "none")
    assert code == 2 and "context" in err and err.count("\n") == 1


def test_real_process_exit_code_and_no_traceback(pair):
    exe = shutil.which("specdec") or f"{sys.executable} -m specdec.cli"
    cmd = exe.split() + ["generate", "hi", "--target", pair["target"], "--draft", pair["other"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().startswith("specdec: error: vocabulary mismatch")
        and "Traceback" not in proc.stderr
    )


def test_generate_starts_without_transformers_or_dynamo(pair):
    """A ``generate`` call needs neither: importing transformers (~1.5 s, the train command's
    parser used to) or torch._dynamo (~1 s, ops on the meta device load_model builds on used to)
    would more than double the CLI's start-up time."""
    code = (
        "import sys; from specdec.cli import main; "
        f"main(['generate', 'hi', '--target', {pair['target']!r}, '--draft', {pair['draft']!r}, '--max-new-tokens', '4']); "
        "print(sorted(m for m in ('transformers', 'torch._dynamo') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_a_reader_that_goes_away_is_no_error(pair):
    """``specdec generate ... | head``: the pipe closes before the output is written."""
    exe = shutil.which("specdec") or f"{sys.executable} -m specdec.cli"
    cmd = exe.split() + ["generate", "hi", "--target", pair["target"], "--draft", pair["draft"], "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # type: ignore[union-attr]  # (before the models have loaded)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and "Traceback" not in err, err


def test_small_models_use_one_thread_only_without_the_one_call_forward(pair, monkeypatch):
    import argparse

    import torch

    from specdec import kernels
    from specdec.commands.common import set_threads
    from specdec.models import load_model

    target = load_model(pair["target"], dtype="float32")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(kernels, "load", lambda verbose=False: None)  # no kernels: Python op path
        set_threads(argparse.Namespace(threads=None), target)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setattr(kernels, "load", lambda verbose=False: object())  # kernels built
        set_threads(argparse.Namespace(threads=None), target)
        assert torch.get_num_threads() == 2
        set_threads(argparse.Namespace(threads=1), target)  # an explicit --threads always wins
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_missing_optional_package_disables_only_its_subcommand():
    """Without fastapi (the 'serve' extra) 'specdec serve' says what to install and the other
    subcommands still work; this once failed every subcommand on a machine without fastapi."""
    code = "import sys; sys.modules['fastapi'] = None; from specdec.cli import main; sys.exit(main(sys.argv[1:]))"
    serve = subprocess.run([sys.executable, "-c", code, "serve"], capture_output=True, text=True)
    assert serve.returncode == 2
    assert serve.stderr.strip().splitlines() == [
        "specdec: error: 'specdec serve' needs the Python package 'fastapi', which is not installed "
        "(pip install 'specdec[serve]')"
    ]
    bench = subprocess.run([sys.executable, "-c", code, "bench", "--help"], capture_output=True, text=True)
    assert bench.returncode == 0 and "--cost-curve" in bench.stdout and not bench.stderr
