"""The training corpus: Python source of the running interpreter's standard library.

Every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` except test suites (a path part
named ``test``, ``tests`` or ``idle_test``, or a ``test_*.py`` file), ``site-packages``,
``__pycache__`` and generated files (``pydoc_data/topics.py``, ``_sysconfigdata*``, and files
whose first lines say they are generated or must not be edited). Files that are not UTF-8 are
left out too.

Files are split, not lines: a file's split depends only on a hash of its path relative to the
stdlib root (90 % train, 5 % validation, 5 % test), so the split is the same on every machine
with the same Python version and adding a file never moves another one.
"""

from __future__ import annotations

import hashlib
import sysconfig
from functools import lru_cache
from pathlib import Path

SPLITS = ("train", "validation", "test")
SPLIT_PERCENT = {"train": 90, "validation": 5, "test": 5}
EXCLUDED_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
GENERATED_FILES = {"pydoc_data/topics.py"}
GENERATED_MARKERS = ("generated", "do not edit")
HEADER_LINES = 5


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """The split of a file, from a hash of its path relative to the stdlib root (posix form)."""
    bucket = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") % 100
    if bucket < SPLIT_PERCENT["train"]:
        return "train"
    if bucket < SPLIT_PERCENT["train"] + SPLIT_PERCENT["validation"]:
        return "validation"
    return "test"


def is_excluded(relative: Path) -> bool:
    """True for test suites, site-packages, caches and known generated files."""
    if any(part in EXCLUDED_PARTS for part in relative.parts):
        return True
    name = relative.name
    return (
        name.startswith("test_")
        or name.startswith("_sysconfigdata")
        or relative.as_posix() in GENERATED_FILES
    )


def looks_generated(text: str) -> bool:
    """True when the first lines of a file say it was generated or must not be edited."""
    header = "\n".join(text.splitlines()[:HEADER_LINES]).lower()
    return any(marker in header for marker in GENERATED_MARKERS)


@lru_cache(maxsize=1)
def _all_files() -> dict[str, tuple[Path, ...]]:
    root = stdlib_root()
    files: dict[str, list[Path]] = {split: [] for split in SPLITS}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if is_excluded(relative) or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or looks_generated(text):
            continue
        files[split_of(relative.as_posix())].append(path)
    return {split: tuple(paths) for split, paths in files.items()}


def corpus_files(split: str) -> list[Path]:
    """The sorted source files of one split (``train``, ``validation`` or ``test``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return list(_all_files()[split])


def read_split(split: str) -> list[str]:
    """The texts of one split's files, in :func:`corpus_files` order."""
    return [path.read_text(encoding="utf-8") for path in corpus_files(split)]
