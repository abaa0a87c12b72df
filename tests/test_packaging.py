"""Packaging: the core dependencies are what decoding needs, every import is declared, and a
subcommand whose extra is not installed says so in one line, whatever options were given."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from scipy.stats import chisquare

from specdec import cli
from specdec.losslessness import _chisquare_pvalue

ROOT = Path(__file__).resolve().parents[1]
EXTRA_PACKAGES = ("transformers", "scipy", "matplotlib", "fastapi", "uvicorn", "prometheus_client", "httpx")
# Modules whose distribution has another name, or that come with a declared distribution.
DISTRIBUTION = {"starlette": "fastapi", "yaml": "pyyaml"}


def project() -> dict:  # type: ignore[type-arg]
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]  # type: ignore[no-any-return]


def names(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings (``"fastapi>=0.110"`` -> ``fastapi``)."""
    out = set()
    for requirement in requirements:
        name = requirement.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        out.add(name.strip().lower().replace("-", "_"))
    return out


def imported_packages() -> set[str]:
    """Top-level third-party packages imported anywhere in ``src/specdec``."""
    stdlib = set(sys.stdlib_module_names)
    found = set()
    for path in (ROOT / "src" / "specdec").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.partition(".")[0])
    return {name for name in found if name not in stdlib and name not in ("specdec", "__future__")}


def test_core_dependencies_leave_the_extras_out() -> None:
    core = names(project()["dependencies"])
    assert {"torch", "safetensors", "tokenizers", "numpy", "gguf", "jinja2"} <= core
    assert not core & {"transformers", "scipy", "matplotlib", "fastapi", "httpx", "prometheus_client"}
    extras = {name: names(reqs) for name, reqs in project()["optional-dependencies"].items()}
    assert {"bench", "train", "serve", "test"} <= set(extras)
    assert {"fastapi", "uvicorn", "pydantic", "prometheus_client"} <= extras["serve"]
    assert {"transformers", "matplotlib", "httpx"} <= extras["bench"]
    assert "transformers" in extras["train"]
    assert {"pytest", "openai", "httpx", "scipy", "schemathesis"} <= extras["test"]
    assert any(req.startswith("specdec[") for req in project()["optional-dependencies"]["test"])
    assert '-e ".[test,serve,bench,train]"' in (ROOT / "Makefile").read_text()


def test_every_imported_package_is_declared() -> None:
    declared = names(project()["dependencies"])
    for requirements in project()["optional-dependencies"].values():
        declared |= names(requirements)
    undeclared = {DISTRIBUTION.get(name, name) for name in imported_packages()} - declared
    assert not undeclared, f"imported by src/specdec but not in pyproject.toml: {sorted(undeclared)}"


def test_decoding_runs_without_the_extras() -> None:
    """Load, draft, generate and chat with every extra's packages made unimportable."""
    blocked = ", ".join(repr(name) for name in EXTRA_PACKAGES)
    script = f"""
import sys
for name in ({blocked},):
    sys.modules[name] = None  # `import name` now raises ModuleNotFoundError
import specdec
target = specdec.load_model("demo-target")
gen = specdec.SpeculativeGenerator(target, specdec.make_drafter("auto", target))
out = gen.generate("def fib(n):", max_new_tokens=8, temperature=0.0)
reply = gen.chat([{{"role": "user", "content": "hi"}}], max_new_tokens=4)
assert len(out.token_ids) == 8 and out.stats.target_forwards > 0, out
print("ok", len(reply.token_ids))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")


@pytest.mark.parametrize(
    ("argv", "package", "extra"),
    [
        (["serve", "--port", "8000"], "fastapi", "serve"),
        (
            ["serve", "--target", "demo-target", "--max-batch-size", "4", "--bogus"],
            "prometheus_client",
            "serve",
        ),
        (["bench", "--quick"], "transformers", "bench"),
        (["bench"], "matplotlib", "bench"),
        (["train", "draft", "--steps", "3"], "transformers", "train"),
    ],
)
def test_missing_extra_is_named_in_one_line(
    argv: list[str],
    package: str,
    extra: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # as if the package were not installed
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0] == (
        f"specdec: error: 'specdec {argv[0]}' needs the Python package '{package}', which is not installed "
        f"(pip install 'specdec[{extra}]')"
    )


def test_other_subcommands_work_without_an_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert cli.main(["generate", "--help"]) == 0
    assert "usage: specdec generate" in capsys.readouterr().out


def test_a_missing_module_found_on_import_is_named_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A package the command imports that no extra lists: the error names it."""
    serve_module, real_import_module = cli.COMMANDS["serve"][0], importlib.import_module

    def import_module(name: str) -> ModuleType:
        if name == serve_module:
            raise ModuleNotFoundError("No module named 'some_missing_package'", name="some_missing_package")
        return real_import_module(name)

    monkeypatch.setattr(importlib, "import_module", import_module)
    assert cli.main(["serve", "--port", "8000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "specdec: error: 'specdec serve' needs the Python package 'some_missing_package', which is not "
        "installed (pip install 'specdec[serve]')"
    )


def test_unknown_options_are_still_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "hi", "--no-such-option"]) == 2
    assert capsys.readouterr().err.strip() == "specdec: error: unrecognized arguments: --no-such-option"


def test_chisquare_pvalue_equals_scipy() -> None:
    rng = np.random.default_rng(0)
    for bins in (2, 7, 60):
        observed = rng.integers(3, 80, bins).astype(float)
        expected = rng.uniform(0.5, 1.5, bins)
        expected *= observed.sum() / expected.sum()
        assert _chisquare_pvalue(observed, expected) == pytest.approx(
            chisquare(observed, expected).pvalue, rel=1e-9, abs=1e-300
        )


def test_a_tokenizer_that_needs_transformers_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from specdec.models import ModelLoadError
    from specdec.models.tokenizer import Tokenizer

    (tmp_path / "tokenizer_config.json").write_text("{}")  # no tokenizer.json: AutoTokenizer's job
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelLoadError, match=r"needs transformers \(pip install transformers"):
        Tokenizer.from_folder(tmp_path)
