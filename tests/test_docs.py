"""The docs are a user's guide that stays true: every link and figure resolves, every figure kept
is shown, no page reads like a lab notebook, and the commands they show exist.

Covers README.md and docs/*.md. Commands are read from code (fenced blocks and inline code
spans): ``specdec <subcommand>`` must be a subcommand of :data:`specdec.cli.COMMANDS` and its
``--flags`` options of that subcommand's parser; ``make <target>`` a Makefile target;
``python -m <module>`` an importable module.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

from specdec.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FIGURES = ROOT / "docs" / "figures"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
DOC_IDS = [str(p.relative_to(ROOT)) for p in DOCS]

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
# Paths into the repository named in the text, e.g. `scripts/gpu_check.sh`, tests/test_x.py.
REPO_PATH = re.compile(r"(?<![\w./-])((?:docs|scripts|src|tests)/[\w./-]*\w)")
DIARY = [
    re.compile(r"\b(?:\w+th|first|second|third) sessions?\b", re.I),  # "the eleventh session"
    re.compile(r"\bthis session\b", re.I),
    re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b"),  # a dated run: 2026-11-30
    re.compile(r"\b[0-2]\d:[0-5]\d\b(?:\s*[–-]\s*[0-2]\d:[0-5]\d)?\s*UTC\b"),  # 08:47-08:51 UTC
]
COMMAND = re.compile(r"(?:^|[\s$(|;&`])specdec ([a-z][\w-]*)((?:[ \t]+[^\s#`]+)*)")
MAKE = re.compile(r"(?:^|[\s$(|;&])make ([a-z][\w.-]*)")
PYTHON_M = re.compile(r"python3? -m ([\w.]+)")
README_MAX_LINES = 220


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The text without its fenced code blocks (links there are code, not links)."""
    return FENCE.sub("", text)


def _code(text: str) -> list[str]:
    """Lines of code: every line of a fenced block, and every inline code span."""
    lines: list[str] = []
    for block in FENCE.findall(text):
        lines.extend(block.splitlines()[1:-1])
    lines.extend(INLINE_CODE.findall(_prose(text)))
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, duplicates numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    anchors: set[str] = set()
    for line in _prose(_text(path)).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(path: Path) -> list[tuple[str, Path | None, str]]:
    """(link as written, resolved local file or None for a pure anchor, anchor) of one page."""
    out: list[tuple[str, Path | None, str]] = []
    for target in LINK.findall(_prose(_text(path))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else None
        out.append((target, resolved, anchor))
    return out


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_links_resolve(path: Path) -> None:
    """Every relative link and image points at a file that exists (and a heading that exists)."""
    broken = []
    for target, resolved, anchor in _links(path):
        page = resolved if resolved is not None else path
        if not page.exists():
            broken.append(target)
        elif anchor and page.suffix == ".md" and anchor not in _anchors(page):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{path.name}: broken links {broken}"


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_named_repo_paths_exist(path: Path) -> None:
    """Files named in the text (`scripts/...`, `tests/...`, `docs/...`, `src/...`) exist."""
    missing = sorted({p for p in REPO_PATH.findall(_text(path)) if not (ROOT / p).exists()})
    assert not missing, f"{path.name} names files that do not exist: {missing}"


def test_every_figure_is_shown() -> None:
    """docs/figures holds only what the docs link, so it cannot fill up with old runs again."""
    linked = {resolved for path in DOCS for _, resolved, _ in _links(path) if resolved is not None}
    unlinked = sorted(f.name for f in FIGURES.iterdir() if f.resolve() not in linked)
    assert not unlinked, f"docs/figures has files no page links: {unlinked}"


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_no_diary(path: Path) -> None:
    """A user's guide: no "the Nth session", no dated runs (git keeps the history)."""
    hits = [
        f"{n}: {line.strip()}"
        for n, line in enumerate(_text(path).splitlines(), 1)
        if any(p.search(line) for p in DIARY)
    ]
    assert not hits, f"{path.name} reads like a run diary:\n" + "\n".join(hits)


def test_diary_patterns_catch_diary_lines() -> None:
    """The patterns above find what they are meant to, and leave ordinary prose alone."""
    diary = [
        "On the eleventh session's code",
        "measured in the fourth session",
        "as this session found",
        "### 2026-11-30, 08:47–08:52 UTC — a run",
        "(at 10:51 UTC, before the change)",
    ]
    prose = ["the server keeps one session per client", "K = 4 on 20 prompts", "127.0.0.1:8000"]
    assert all(any(p.search(line) for p in DIARY) for line in diary)
    assert not any(p.search(line) for p in DIARY for line in prose)


def test_readme_is_short() -> None:
    lines = len(_text(README).splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@pytest.fixture(scope="module")
def cli_parsers() -> dict[str, argparse.ArgumentParser]:
    return _subparsers(build_parser())


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_shown_specdec_commands_exist(path: Path, cli_parsers: dict[str, argparse.ArgumentParser]) -> None:
    """`specdec X --flag` in a page's code: X is a subcommand and --flag one of its options."""
    problems = []
    for line in _code(_text(path)):
        if line.lstrip().startswith("specdec:"):  # a line the CLI printed, not a command
            continue
        for sub, rest in COMMAND.findall(line):
            if sub not in COMMANDS:
                problems.append(f"`specdec {sub}` is not a subcommand ({', '.join(COMMANDS)})")
                continue
            parser = cli_parsers[sub]
            if parser.get_default("_missing"):  # its optional dependencies are not installed here
                continue
            words = rest.split()
            nested = _subparsers(parser)
            if nested and words and words[0] in nested:
                parser = nested[words[0]]
            elif nested and words and "|" in words[0]:  # `specdec train a|b|c ...`: a synopsis
                unknown = [w for w in words[0].split("|") if w not in nested]
                problems.extend(f"`specdec {sub} {w}` is not a subcommand" for w in unknown)
                continue
            flags = [w.split("=")[0] for w in words if w.startswith("--")]
            problems.extend(
                f"`specdec {sub}` has no option {flag}" for flag in flags if flag not in _options(parser)
            )
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_readme_shows_real_subcommands() -> None:
    """The README shows the main subcommands, each real (read from COMMANDS, so new ones count)."""
    shown = {sub for line in _code(_text(README)) for sub, _ in COMMAND.findall(line)}
    assert {"demo", "generate", "bench", "serve", "train", "check"} <= shown
    assert shown <= set(COMMANDS)


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_shown_make_targets_and_modules_exist(path: Path) -> None:
    """`make X` is a Makefile target; `python -m M` names a module that exists."""
    targets = set(re.findall(r"^([\w.-]+)\s*:", _text(ROOT / "Makefile"), re.M))
    problems = []
    for line in _code(_text(path)):
        problems.extend(f"no Makefile target {t!r}" for t in MAKE.findall(line) if t not in targets)
        problems.extend(
            f"no module {m!r}" for m in PYTHON_M.findall(line) if importlib.util.find_spec(m) is None
        )
    assert not problems, f"{path.name}: {problems}"
