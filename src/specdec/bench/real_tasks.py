"""The real-model task suite: chat prompts in Spec-Bench's categories (Xia et al. 2024, §3).

Eight tasks, each at least eight prompts written for specdec (no data set is downloaded; every
record carries ``"provenance": "written for specdec"``), kept as JSON lines in
``specdec/bench/prompts/<task>.jsonl``:

* ``conversation`` — multi-turn: a written history, then a follow-up question (MT-Bench's shape);
* ``translation`` — short sentences between English and French, German, Spanish, ...;
* ``summarisation`` — a passage of 100-150 words and a summary request;
* ``qa`` — open questions of general knowledge;
* ``math`` — word problems asking for step-by-step reasoning (GSM8K's shape);
* ``rag`` — a passage and a question answered from it (retrieval-augmented generation);
* ``coding`` — write, explain or fix a short program;
* ``rewrite`` — rewrite a given paragraph (more formal, corrected, active voice): the answer
  re-uses much of the prompt, where prompt lookup and n-gram drafting pay (Saxena 2023).

Each record is ``{"id", "task", "messages": [{"role", "content"}], "provenance"}``; a prompt is
its messages rendered through the target's chat template (:func:`specdec.engine.chat.chat_prompt`),
ending with the assistant cue. Models without a tokenizer (tiny test models) get the plain
transcript template encoded byte by byte, like the code tasks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

REAL_TASKS = ("conversation", "translation", "summarisation", "qa", "math", "rag", "coding", "rewrite")
REAL_NEW_TOKENS = 128
PROVENANCE = "written for specdec"


@dataclass(frozen=True)
class ChatRecord:
    """One prompt of the suite."""

    id: str
    task: str
    messages: tuple[dict[str, str], ...]
    provenance: str


@cache
def load_records(task: str) -> tuple[ChatRecord, ...]:
    """The records of ``task`` from the package's ``prompts/<task>.jsonl``."""
    if task not in REAL_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(REAL_TASKS)}")
    text = resources.files("specdec.bench").joinpath("prompts", f"{task}.jsonl").read_text(encoding="utf-8")
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            records.append(_record(json.loads(line), f"{task}.jsonl:{n}"))
    return tuple(records)


def _record(item: dict[str, Any], where: str) -> ChatRecord:
    messages = item.get("messages")
    if not isinstance(messages, list) or not messages or messages[-1].get("role") != "user":
        raise ValueError(f"{where}: messages must be a non-empty list ending with a user turn")
    return ChatRecord(str(item["id"]), str(item["task"]), tuple(messages), str(item["provenance"]))


def render(messages: tuple[dict[str, str], ...], tokenizer, vocab_size: int) -> tuple[str, list[int]]:  # type: ignore[no-untyped-def]
    """The prompt text (the chat template's rendering) and its token ids."""
    from specdec.engine.chat import chat_prompt, render_chat

    if tokenizer is None:
        text = render_chat(list(messages), None)
        return text, [b % vocab_size for b in text.encode("utf-8")]
    prompt = chat_prompt(list(messages), tokenizer)
    return prompt.text, list(prompt.token_ids)
