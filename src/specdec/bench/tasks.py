"""Benchmark tasks built from local real text: held-out standard-library Python files.

Three tasks, chosen like Spec-Bench's categories (Xia et al. 2024) for what they stress:

* ``code`` — code completion: the opening of a held-out file, continue it;
* ``edit`` — input-grounded rewriting: a function without its docstring, then the same
  function's header and docstring; the continuation re-types the body already in the prompt
  (what retrieval / n-gram drafting exploits, cf. Saxena 2023 "prompt lookup decoding");
* ``long`` — long generation: a short prompt and many new tokens (512 by default).

Prompts are token ids. With a tokenizer they are the encoded text; without one (tiny random
test models) each UTF-8 byte maps to ``byte % vocab_size``. A prompt that does not fit the
context next to its new tokens keeps its last tokens.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass

TASKS = ("code", "edit", "long")
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


def build_tasks(
    names: list[str],
    num_prompts: int,
    tokenizer,  # type: ignore[no-untyped-def]
    vocab_size: int,
    context: int,
    max_new_tokens: int | None = None,
    files: list[tuple[str, str]] | None = None,
) -> list[Task]:
    """The named tasks with ``num_prompts`` prompts each, fitted into ``context`` tokens."""
    unknown = [n for n in names if n not in PROMPT_BUILDERS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    files = files if files is not None else held_out_files()
    tasks = []
    for name in names:
        new_tokens = max_new_tokens if max_new_tokens is not None else DEFAULT_NEW_TOKENS[name]
        room = context - new_tokens - 64  # leave room for the draft chain
        if room < 8:
            raise ValueError(f"{new_tokens} new tokens do not fit the model's context of {context}")
        sources, prompts = [], []
        for source, text in PROMPT_BUILDERS[name](files, num_prompts):
            ids = encode(text, tokenizer, vocab_size)
            prompts.append(tuple(ids[-room:]))
            sources.append(source)
        if not prompts:
            raise ValueError(f"the held-out files give no prompt for task {name!r}")
        tasks.append(Task(name, tuple(prompts), new_tokens, tuple(sources)))
    return tasks
