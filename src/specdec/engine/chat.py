"""Chat messages -> prompt token ids, with the model tokenizer's own Jinja chat template.

Rendering follows Hugging Face's ``apply_chat_template``: the template runs in Jinja's immutable
sandbox with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension and the
``generation`` tag, a ``tojson`` filter, and the globals ``raise_exception`` and ``strftime_now``; it sees ``messages``,
``add_generation_prompt``, ``bos_token`` and ``eos_token``. A tokenizer without a
``chat_template`` gets :data:`DEFAULT_CHAT_TEMPLATE`, a plain transcript::

    <|system|>
    You are terse.
    <|user|>
    Hello
    <|assistant|>

The reply ends at the tokenizer's EOS token or at the template's *end-of-turn* token, the special
token a rendered assistant turn closes with (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``).
The plain transcript has no such token: its replies end where the model starts a new turn.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import Template, TemplateError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from specdec.engine.generator import GenerationError
from specdec.models.tokenizer import Tokenizer

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Where a reply under the plain transcript ends: the model opening the next turn.
DEFAULT_TEMPLATE_STOPS = ("<|user|>", "<|system|>")

ROLES = ("system", "developer", "user", "assistant", "tool")

# A probe turn: what the template writes right after an assistant's content is its end of turn.
_PROBE_REPLY = "specdec-probe-reply"


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation: ``text`` (ending with the assistant cue), its ``token_ids``, and
    where the reply ends: ``stop_token_ids`` (end-of-turn tokens) and ``stop`` strings."""

    text: str
    token_ids: list[int]
    stop_token_ids: frozenset[int]
    stop: tuple[str, ...]


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks in
    Hugging Face): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


@lru_cache(maxsize=8)
def compile_template(source: str) -> Template:
    """The sandboxed Jinja template, set up as Hugging Face sets up chat templates."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise GenerationError(f"the model's chat template does not parse: {e}") from None


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """``messages`` as plain ``{"role", "content"}`` dicts; a :class:`GenerationError` if malformed."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise GenerationError('messages must be a list of {"role": ..., "content": ...} objects')
    if not messages:
        raise GenerationError("messages is empty: a chat needs at least one message")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise GenerationError(f'messages[{i}] must be an object with "role" and "content"')
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise GenerationError(f"messages[{i}] has the role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise GenerationError(f"messages[{i}].content must be a string")
        checked.append({"role": str(role), "content": content})
    return checked


def template_of(tokenizer: Tokenizer | None) -> str:
    """The tokenizer's chat template, or :data:`DEFAULT_CHAT_TEMPLATE`."""
    return (tokenizer.chat_template if tokenizer is not None else None) or DEFAULT_CHAT_TEMPLATE


def render_chat(
    messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer | None, add_generation_prompt: bool = True
) -> str:
    """The prompt text for ``messages``, ending with the assistant cue (``add_generation_prompt``)."""
    checked = validate_messages(messages)
    return _render(template_of(tokenizer), checked, tokenizer, add_generation_prompt)


def _render(
    template: str, messages: list[dict[str, str]], tokenizer: Tokenizer | None, add_generation_prompt: bool
) -> str:
    try:
        return str(
            compile_template(template).render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                bos_token=(tokenizer.bos_token if tokenizer else None) or "",
                eos_token=(tokenizer.eos_token if tokenizer else None) or "",
            )
        )
    except TemplateError as e:
        raise GenerationError(f"the chat template rejected the messages: {e}") from None


def end_of_turn_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The special token a rendered assistant turn ends with (empty when the template has none).

    A probe conversation with a known assistant reply is rendered; the first token after the
    reply is the end of turn if it is a special token (one that decoding with
    ``skip_special_tokens`` drops)."""
    template = template_of(tokenizer)
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    try:
        text = _render(template, probe, tokenizer, add_generation_prompt=False)
    except GenerationError:  # a template that wants another conversation shape
        return frozenset()
    at = text.rfind(_PROBE_REPLY)
    if at < 0:
        return frozenset()
    after = tokenizer.encode(text[at + len(_PROBE_REPLY) :], add_special_tokens=False)
    if not after:
        return frozenset()
    first = after[0]
    dropped = tokenizer.decode([first], skip_special_tokens=True) == ""
    special = dropped and tokenizer.decode([first], skip_special_tokens=False) != ""
    return frozenset([first]) if special else frozenset()


def chat_prompt(messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer | None) -> ChatPrompt:
    """Render and encode ``messages``; say where the reply ends."""
    if tokenizer is None:
        raise GenerationError("chat needs a model with a tokenizer")
    text = render_chat(messages, tokenizer)
    # The template writes the BOS token itself where the model wants one: encoding must not add
    # a second. Otherwise the tokenizer adds what it adds to any prompt.
    bos = tokenizer.bos_token
    ids = tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))
    if not ids:
        raise GenerationError("the chat template rendered an empty prompt")
    stops = DEFAULT_TEMPLATE_STOPS if tokenizer.chat_template is None else ()
    return ChatPrompt(text, ids, end_of_turn_ids(tokenizer), stops)
