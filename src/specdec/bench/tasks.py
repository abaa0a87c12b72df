"""Benchmark tasks built from local real text: held-out standard-library Python files.

Three tasks, chosen like Spec-Bench's categories (Xia et al. 2024) for what they stress:

* ``code`` — code completion: the opening of a held-out file, continue it;
* ``edit`` — input-grounded rewriting: a function without its docstring, then the same
  function's header and docstring; the continuation re-types the body already in the prompt
  (what retrieval / n-gram drafting exploits, cf. Saxena 2023 "prompt lookup decoding");
* ``long`` — long generation: a short prompt and many new tokens (512 by default).

They are the default on the demo pair. The real-model suite (conversation, translation,
summarisation, ...; :mod:`specdec.bench.real_tasks`) is built by the same :func:`build_tasks`.
``--prompts FILE`` replaces them with prompts of your own (see :func:`read_prompt_file`).

Prompts are token ids. With a tokenizer they are the encoded text; without one (tiny random
test models) each UTF-8 byte maps to ``byte % vocab_size``. A prompt that does not fit the
context next to its new tokens keeps its last tokens.
"""

from __future__ import annotations

import ast
import json
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from specdec.bench.real_tasks import REAL_NEW_TOKENS, REAL_TASKS, load_records, render

TASKS = ("code", "edit", "long")
ALL_TASKS = (*TASKS, *REAL_TASKS)
DEFAULT_NUM_PROMPTS = 4  # code tasks; the real tasks take all their prompts unless told
DEFAULT_NEW_TOKENS = {"code": 128, "edit": 128, "long": 512}
CODE_PROMPT_CHARS = 1500
LONG_PROMPT_CHARS = 400
MIN_FILE_CHARS = 3000
EDIT_BODY_LINES = (6, 40)  # body length of a function usable for the edit task


@dataclass(frozen=True)
class Task:
    name: str
    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    sources: tuple[str, ...]  # where each prompt comes from (file / function)
    cut: tuple[str, ...] = ()  # the sources of prompts cut to fit the context, with how much
    texts: tuple[str | None, ...] = ()  # each prompt as text where known (peers that tokenize themselves)
    # Chat prompts: greedy runs decode as many tokens as plain decoding takes to end its reply (the
    # end-of-turn token), not max_new_tokens regardless: text past the end of a reply degenerates
    # into repetition, which would flatter drafters that copy.
    ends_with_reply: bool = False

    def text(self, i: int) -> str | None:
        """Prompt ``i`` as text, or None where only its token ids are known."""
        return self.texts[i] if i < len(self.texts) else None


def held_out_files() -> list[tuple[str, str]]:
    """``(name, text)`` of the held-out (test split) files of the training corpus."""
    from specdec.train.corpus import corpus_files, stdlib_root

    root = stdlib_root()
    return [(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8")) for p in corpus_files("test")]


def _spread(items: list, n: int) -> list:  # type: ignore[type-arg]
    """``n`` items evenly spread over ``items`` (deterministic)."""
    if n >= len(items):
        return items
    return [items[(i * len(items)) // n] for i in range(n)]


def _cut_at_line(text: str, chars: int) -> str:
    end = text.find("\n", chars)
    return text if end < 0 else text[: end + 1]


def _long_files(files: list[tuple[str, str]], parity: int) -> list[tuple[str, str]]:
    """Every other long file: ``code`` takes the even ones, ``long`` the odd ones."""
    long_files = [(name, text) for name, text in files if len(text) >= MIN_FILE_CHARS]
    return long_files[parity::2] or long_files


def code_prompts(files: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    chosen = _spread(_long_files(files, 0), n)
    return [(name, _cut_at_line(text, CODE_PROMPT_CHARS)) for name, text in chosen]


def long_prompts(files: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    chosen = _spread(_long_files(files, 1), n)
    return [(name, _cut_at_line(text, LONG_PROMPT_CHARS)) for name, text in chosen]


def _documented_functions(name: str, text: str) -> Iterator[tuple[str, str]]:
    """``(label, prompt)`` per function with a docstring and a body of a usable length."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return
    lines = text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or len(node.body) < 2:
            continue
        doc = node.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)):
            continue
        if not isinstance(doc.value.value, str) or doc.end_lineno is None or node.end_lineno is None:
            continue
        body_lines = node.end_lineno - doc.end_lineno
        if not EDIT_BODY_LINES[0] <= body_lines <= EDIT_BODY_LINES[1]:
            continue
        header = lines[node.lineno - 1 : doc.lineno - 1]
        docstring = lines[doc.lineno - 1 : doc.end_lineno]
        body = lines[doc.end_lineno : node.end_lineno]
        plain = textwrap.dedent("\n".join(header + body))
        documented_start = textwrap.dedent("\n".join(header + docstring + body)).splitlines()
        keep = len(header) + len(docstring)
        prompt = plain + "\n\n\n" + "\n".join(documented_start[:keep]) + "\n"
        yield f"{name}:{node.name}", prompt


def edit_prompts(files: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    candidates = [fn for name, text in files for fn in _documented_functions(name, text)]
    return _spread(candidates, n)


PROMPT_BUILDERS: dict[str, Callable[[list[tuple[str, str]], int], list[tuple[str, str]]]] = {
    "code": code_prompts,
    "edit": edit_prompts,
    "long": long_prompts,
}


def encode(text: str, tokenizer, vocab_size: int) -> list[int]:  # type: ignore[no-untyped-def]
    if tokenizer is not None:
        return list(tokenizer.encode(text))
    return [b % vocab_size for b in text.encode("utf-8")]


def prompt_room(context: int, new_tokens: int) -> int:
    """Prompt tokens kept (the last ones) so that the new tokens and a draft chain fit the context."""
    room = context - new_tokens - 64  # leave room for the draft chain
    if room < 8:
        raise ValueError(f"{new_tokens} new tokens do not fit the model's context of {context}")
    return room


def build_tasks(
    names: list[str],
    num_prompts: int | None,
    tokenizer,  # type: ignore[no-untyped-def]
    vocab_size: int,
    context: int,
    max_new_tokens: int | None = None,
    files: list[tuple[str, str]] | None = None,
) -> list[Task]:
    """The named tasks with ``num_prompts`` prompts each (None: 4 code prompts, every real-task
    prompt), fitted into ``context`` tokens."""
    unknown = [n for n in names if n not in PROMPT_BUILDERS and n not in REAL_TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; choose from {', '.join(ALL_TASKS)}")
    if files is None and any(n in PROMPT_BUILDERS for n in names):
        files = held_out_files()
    tasks = []
    for name in names:
        if name in REAL_TASKS:
            tasks.append(real_task(name, num_prompts, tokenizer, vocab_size, context, max_new_tokens))
            continue
        assert files is not None
        new_tokens = max_new_tokens if max_new_tokens is not None else DEFAULT_NEW_TOKENS[name]
        room = prompt_room(context, new_tokens)
        sources, prompts = [], []
        for source, text in PROMPT_BUILDERS[name](files, num_prompts or DEFAULT_NUM_PROMPTS):
            ids = encode(text, tokenizer, vocab_size)
            prompts.append(tuple(ids[-room:]))
            sources.append(source)
        if not prompts:
            raise ValueError(f"the held-out files give no prompt for task {name!r}")
        tasks.append(Task(name, tuple(prompts), new_tokens, tuple(sources)))
    return tasks


def real_task(
    name: str,
    num_prompts: int | None,
    tokenizer,  # type: ignore[no-untyped-def]
    vocab_size: int,
    context: int,
    max_new_tokens: int | None = None,
) -> Task:
    """A task of the real-model suite: its first ``num_prompts`` chat prompts, rendered."""
    records = load_records(name)[:num_prompts]
    new_tokens = max_new_tokens if max_new_tokens is not None else REAL_NEW_TOKENS
    room = prompt_room(context, new_tokens)
    prompts, texts, cut = [], [], []
    for record in records:
        text, ids = render(record.messages, tokenizer, vocab_size)
        prompts.append(tuple(ids[-room:]))
        texts.append(text if len(ids) <= room else None)  # a cut prompt has no exact text
        if len(ids) > room:
            cut.append(f"{record.id} (its last {room} of {len(ids)} tokens)")
    return Task(
        name, tuple(prompts), new_tokens, tuple(r.id for r in records), tuple(cut), tuple(texts), ends_with_reply=True
    )


def default_tasks(target_path: Path, tokenizer) -> tuple[str, ...]:  # type: ignore[no-untyped-def]
    """The code tasks for the demo pair and for models without a chat template, else the real suite."""
    from specdec.models.loading import ASSETS

    demo = target_path.resolve().is_relative_to(ASSETS.resolve())
    has_template = tokenizer is not None and getattr(tokenizer, "chat_template", None)
    return TASKS if demo or not has_template else REAL_TASKS


@dataclass(frozen=True)
class PromptRecord:
    task: str
    prompt: str | tuple[int, ...]  # text, or token ids
    max_new_tokens: int | None
    source: str


def read_prompt_file(path: str | Path) -> list[PromptRecord]:
    """Prompts of your own: JSON lines (or one JSON list) of objects
    ``{"prompt": "text" or [token ids], "task": "name", "max_new_tokens": 128}`` (``task`` and
    ``max_new_tokens`` are optional: ``custom`` and 128); a bare string is a prompt too.
    Raises ``ValueError`` naming the file and the line (or list entry) of the first bad entry."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompts from {path}: {e}") from None
    try:
        if text.lstrip().startswith("["):  # one JSON list: entries are named by their number
            entries = [(f"{path.name} entry {n}", item) for n, item in enumerate(json.loads(text), 1)]
        else:  # JSON lines: by their line
            lines = enumerate(text.splitlines(), 1)
            entries = [(f"{path.name}:{n}", json.loads(line)) for n, line in lines if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON lines or a JSON list ({e})") from None
    records = [_prompt_record(item, where) for where, item in entries]
    if not records:
        raise ValueError(f"{path} holds no prompt")
    return records


def _prompt_record(item: object, where: str) -> PromptRecord:
    if isinstance(item, str):
        item = {"prompt": item}
    if not isinstance(item, dict) or "prompt" not in item:
        raise ValueError(f'{where}: expected a string or an object with a "prompt" field')
    prompt, task = item["prompt"], item.get("task", "custom")
    new_tokens = item.get("max_new_tokens")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and t >= 0 for t in prompt):
        prompt = tuple(prompt)
    elif not isinstance(prompt, str) or not prompt:
        raise ValueError(f'{where}: "prompt" must be a non-empty string or a list of token ids')
    if not isinstance(task, str) or not task or task == "overall":
        raise ValueError(f"{where}: \"task\" must be a non-empty name other than 'overall'")
    if new_tokens is not None and (not isinstance(new_tokens, int) or new_tokens < 1):
        raise ValueError(f'{where}: "max_new_tokens" must be an integer >= 1')
    return PromptRecord(task, prompt, new_tokens, where)


def prompt_file_tasks(
    records: list[PromptRecord],
    tokenizer,  # type: ignore[no-untyped-def]
    vocab_size: int,
    context: int,
    max_new_tokens: int | None = None,
) -> list[Task]:
    """One task per ``task`` name in ``records`` (in order of appearance). ``max_new_tokens``
    (the command-line flag) overrides the records' own; a task takes its first record's."""
    tasks = []
    for name in dict.fromkeys(r.task for r in records):
        mine = [r for r in records if r.task == name]
        new_tokens = max_new_tokens or mine[0].max_new_tokens or DEFAULT_NEW_TOKENS["code"]
        room = prompt_room(context, new_tokens)
        prompts, cut, texts = [], [], []
        for r in mine:
            ids = list(r.prompt) if isinstance(r.prompt, tuple) else encode(r.prompt, tokenizer, vocab_size)
            if any(t >= vocab_size for t in ids):
                raise ValueError(f"{r.source}: token id {max(ids)} is outside the vocabulary of {vocab_size}")
            prompts.append(tuple(ids[-room:]))
            texts.append(r.prompt if isinstance(r.prompt, str) and len(ids) <= room else None)
            if len(ids) > room:  # kept: the last tokens, and said so (stderr, bench.md, bench.json)
                cut.append(f"{r.source} (its last {room} of {len(ids)} tokens)")
        sources = tuple(r.source for r in mine)
        tasks.append(Task(name, tuple(prompts), new_tokens, sources, tuple(cut), tuple(texts)))
    return tasks
