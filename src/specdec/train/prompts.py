"""Chat prompts for self-distillation, built offline and reproducibly from text on this machine.

A drafter learns best on the kind of text its target will generate (Medusa-2, EAGLE and
DistillSpec all train on the target's own answers). The prompts here need no data set: their
passages come from

* docstrings of the running interpreter's standard library (read with :mod:`ast`, nothing is
  imported) and the code of its short functions,
* the language reference topics shipped with Python (``pydoc_data.topics``, what ``help()``
  shows),
* READMEs and text files under ``/usr/share/doc`` and English man pages (``/usr/share/man/man1``),
  where the machine has them,
* arithmetic word problems drawn from a seeded generator,

and are wrapped in instruction templates for the tasks a chat model is asked to do (summarise,
rewrite, translate, answer, explain, continue, code, math), single-turn or with a follow-up
turn. Everything is sorted and seeded, so the same machine gives the same prompts. The bench's
prompts (:mod:`specdec.bench.prompts`) are never among them: a prompt sharing a run of
:data:`OVERLAP_WORDS` words with one of them is dropped.

Each prompt has a fixed split (``train`` / ``validation``) from a hash of its text.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import random
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

VALIDATION_PERCENT = 5
OVERLAP_WORDS = 8  # a prompt sharing this many consecutive words with a bench prompt is dropped
MIN_CHARS, MAX_CHARS = 160, 700  # passage length
DOC_ROOT = Path("/usr/share/doc")
MAN_ROOT = Path("/usr/share/man/man1")
BENCH_PROMPTS = Path(__file__).resolve().parent.parent / "bench" / "prompts"

TEMPLATES: dict[str, tuple[str, ...]] = {
    "summarise": (
        "Summarise the following text in two or three sentences:\n\n{text}",
        "Give a short summary of this passage:\n\n{text}",
        "What are the key points of the text below? Answer with a short list.\n\n{text}",
    ),
    "rewrite": (
        "Rewrite this paragraph in plain, simple English:\n\n{text}",
        "Rewrite the following text to be more concise, keeping its meaning:\n\n{text}",
        "Rewrite this in a friendly, informal tone:\n\n{text}",
    ),
    "translate": (
        "Translate the following text into French:\n\n{text}",
        "Translate this into Spanish:\n\n{text}",
        "Translate the following into German:\n\n{text}",
    ),
    "answer": (
        "Read the text and answer the question.\n\nText: {text}\n\nQuestion: What is the main idea of this text?",
        "Based on the following passage, who would find this useful and why?\n\n{text}",
        "Here is some documentation:\n\n{text}\n\nWhat problem does this solve?",
    ),
    "explain": (
        "Explain this to a beginner:\n\n{text}",
        "Can you explain what the following means, with an example?\n\n{text}",
    ),
    "continue": (
        "Continue the following text with one more paragraph:\n\n{text}",
        "Write the next few sentences of this text:\n\n{text}",
    ),
}
CODE_TEMPLATES = (
    "Explain what this Python code does:\n\n```python\n{code}\n```",
    "Add comments to this Python function:\n\n```python\n{code}\n```",
    "Is there a bug or anything to improve in this code?\n\n```python\n{code}\n```",
)
WRITE_TEMPLATES = (
    "Write a Python function `{name}` that does the following: {doc}",
    "In Python, how would I write a function that does this: {doc}",
)
TOPIC_TEMPLATES = (
    "What is '{topic}' in Python? Explain briefly.",
    "How does '{topic}' work in Python? Give a short example.",
)
FOLLOW_UPS = (
    "Can you make that shorter?",
    "Thanks! Can you give an example?",
    "Can you explain that as a list of steps?",
    "Please say that in one sentence.",
    "What is the most important part of that?",
)
MULTI_TURN_PERCENT = 25


@dataclass(frozen=True)
class Prompt:
    """One conversation to be answered: ``turns`` are user messages (the target answers each)."""

    key: str  # stable id: a hash of the turns
    task: str
    source: str
    turns: tuple[str, ...]
    split: str = field(default="train")


def split_of(text: str) -> str:
    """``validation`` for ``VALIDATION_PERCENT`` % of texts (by a hash of the text), else ``train``."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 100
    return "validation" if bucket < VALIDATION_PERCENT else "train"


def _clean(text: str) -> str:
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _is_prose(text: str) -> bool:
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return MIN_CHARS <= len(text) <= MAX_CHARS and letters / len(text) > 0.8 and len(text.split()) >= 25


def _paragraphs(text: str) -> Iterator[str]:
    """Paragraphs of prose, joined up to :data:`MAX_CHARS`."""
    chunk = ""
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para:
            continue
        if chunk and len(chunk) + len(para) + 1 > MAX_CHARS:
            if _is_prose(chunk):
                yield chunk
            chunk = ""
        chunk = f"{chunk} {para}".strip() if len(para) < MAX_CHARS else ""
    if chunk and _is_prose(chunk):
        yield chunk


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__", "pydoc_data"}
    return [p for p in sorted(root.rglob("*.py")) if not skip & set(p.relative_to(root).parts)]


def stdlib_sources() -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """``(docstring passages, (function name, one-line summary), (source name, short function code))``."""
    passages, summaries, codes = [], [], []
    for path in _stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        name = path.stem
        doc = ast.get_docstring(tree)
        if doc:
            passages += [(f"stdlib:{name}", p) for p in _paragraphs(doc)]
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.ClassDef):
                continue
            doc = ast.get_docstring(node)
            if doc:
                passages += [(f"stdlib:{name}.{node.name}", p) for p in _paragraphs(doc)]
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and doc:
                first = " ".join(doc.split("\n\n")[0].split())
                if 30 <= len(first) <= 200:
                    summaries.append((node.name, first))
                end = node.end_lineno or node.lineno
                if 5 <= end - node.lineno <= 20:
                    code = "\n".join(text.splitlines()[node.lineno - 1 : end])
                    codes.append((f"stdlib:{name}.{node.name}", code))
    return passages, summaries, codes


def topic_sources() -> list[tuple[str, str]]:
    """Paragraphs of the language reference topics, ``(source, passage)``."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [(f"pydoc:{k}", p) for k in sorted(topics) for p in _paragraphs(topics[k])]


def _read_text(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def doc_sources(root: Path = DOC_ROOT) -> list[tuple[str, str]]:
    """Prose paragraphs of READMEs and text files under ``/usr/share/doc``."""
    if not root.is_dir():
        return []
    wanted = re.compile(r"^(README|NEWS|TODO|BUGS|FAQ|USAGE)|\.(md|txt|rst)(\.gz)?$", re.IGNORECASE)
    out = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and wanted.search(path.name) and path.stat().st_size < 200_000:
            try:
                out += [(f"doc:{path.parent.name}", p) for p in _paragraphs(_read_text(path))]
            except (OSError, EOFError, gzip.BadGzipFile):
                continue
    return out


def man_sources(root: Path = MAN_ROOT, limit: int = 400) -> list[tuple[str, str]]:
    """Prose of the first ``limit`` man pages in section 1: roff requests and escapes removed."""
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.glob("*.gz"))[:limit]:
        try:
            text = _read_text(path)
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        lines = [ln for ln in text.splitlines() if not ln.startswith((".", "'", '\\"'))]
        plain = re.sub(
            r"\\f[BIRP]|\\\(..|\\-|\\&|\\e", lambda m: "-" if m.group() == "\\-" else "", "\n".join(lines)
        )
        out += [(f"man:{path.name.split('.')[0]}", p) for p in _paragraphs(plain)]
    return out


def math_problems(count: int, seed: int) -> list[str]:
    """Arithmetic word problems with seeded numbers."""
    rng = random.Random(seed)
    items = ["apples", "notebooks", "tickets", "bottles of water", "pencils", "plants", "boxes of tea"]
    names = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana"]
    out = []
    for _ in range(count):
        name, item = rng.choice(names), rng.choice(items)
        a, b, price = rng.randint(3, 40), rng.randint(2, 9), rng.randint(2, 25)
        out.append(
            rng.choice(
                (
                    f"{name} buys {a} {item} at {price} dollars each and pays with a {a * price + rng.randint(1, 50)}"
                    f" dollar note. How much change does {name} get? Explain step by step.",
                    f"{name} has {a * b} {item} and shares them equally among {b} friends. How many does each "
                    f"friend get, and how many would be left if {name} kept {price % a} first? Show your working.",
                    f"A shop sells {item} in packs of {b}. {name} needs {a} of them. How many packs must "
                    f"{name} buy, and how many {item} will be left over?",
                )
            )
        )
    return out


@lru_cache(maxsize=1)
def bench_texts() -> tuple[str, ...]:
    """Every message content of the bench's prompt files."""
    texts = []
    for path in sorted(BENCH_PROMPTS.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts += [m["content"] for m in json.loads(line).get("messages", [])]
    return tuple(texts)


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + OVERLAP_WORDS]) for i in range(len(words) - OVERLAP_WORDS + 1)}


@lru_cache(maxsize=1)
def _bench_shingles() -> frozenset[tuple[str, ...]]:
    return frozenset(s for text in bench_texts() for s in _shingles(text))


def overlaps_bench(text: str) -> bool:
    """True when ``text`` shares :data:`OVERLAP_WORDS` consecutive words with a bench prompt."""
    return not _shingles(text).isdisjoint(_bench_shingles())


def build_prompts(count: int, seed: int = 0, man_pages: int = 400) -> list[Prompt]:
    """``count`` prompts (fewer if the machine has too little text), the same on every run.

    Tasks take turns so any prefix of the list mixes them all."""
    rng = random.Random(seed)
    passages, summaries, codes = stdlib_sources()
    passages = passages + topic_sources() + doc_sources() + man_sources(limit=man_pages)
    topics: list[str] = []
    try:
        from pydoc_data.topics import topics as pydoc_topics

        topics = sorted(pydoc_topics)
    except ImportError:
        pass
    for pool in (passages, summaries, codes):
        rng.shuffle(pool)
    # Each task draws its templates from its own generator, so how far one task has gone never
    # changes another's prompts (a longer run extends a shorter one). The passage tasks share
    # the passages: each starts at its own offset so they differ.
    step = max(1, len(passages) // 16)
    makers: list[tuple[str, Iterator[tuple[str, str]]]] = [
        (task, _fill(random.Random(f"{seed}-{task}"), templates, passages[i * step :] + passages[: i * step]))
        for i, (task, templates) in enumerate(TEMPLATES.items())
    ]
    makers.append(("code", _fill(random.Random(f"{seed}-code"), CODE_TEMPLATES, codes)))
    makers.append(("code", _fill(random.Random(f"{seed}-write"), WRITE_TEMPLATES, summaries)))
    pydoc = [("pydoc", t) for t in topics]
    makers.append(("answer", _fill(random.Random(f"{seed}-topic"), TOPIC_TEMPLATES, pydoc)))
    maths = [("math", q) for q in math_problems(max(count, 1000), seed)]
    makers.append(("math", _fill(random.Random(f"{seed}-math"), ("{text}",), maths)))
    out: list[Prompt] = []
    seen: set[str] = set()
    while len(out) < count and makers:
        for task, gen in list(makers):
            item = next(gen, None)
            if item is None:
                makers.remove((task, gen))
                continue
            source, text = item
            if text in seen or overlaps_bench(text):
                continue
            seen.add(text)
            turns = (text, rng.choice(FOLLOW_UPS)) if rng.randrange(100) < MULTI_TURN_PERCENT else (text,)
            key = hashlib.sha256("\x00".join(turns).encode()).hexdigest()[:16]
            out.append(Prompt(key, task, source, turns, split_of(text)))
            if len(out) == count:
                break
    return out


def _fill(
    rng: random.Random, templates: tuple[str, ...], items: list[tuple[str, str]]
) -> Iterator[tuple[str, str]]:
    """``(source, prompt)`` per item: a template picked by ``rng`` filled with the item. A
    template's one field takes the item's text; ``{name}`` / ``{doc}`` take its two parts."""
    for source, text in items:
        template = rng.choice(templates)
        if "{doc}" in template:
            yield "stdlib", template.format(name=source, doc=text)
        else:
            yield source, template.format(text=text, code=text, topic=text)
