"""Chat messages -> prompt text, with the tokenizer's own Jinja chat template when it has one.

Templates run in Jinja's immutable sandbox with the variables Hugging Face templates expect
(``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``). A tokenizer without
``chat_template`` gets :data:`DEFAULT_CHAT_TEMPLATE`, a plain transcript::

    <|system|>
    You are terse.
    <|user|>
    Hello
    <|assistant|>
"""

from __future__ import annotations

from functools import lru_cache

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from specdec.models.tokenizer import Tokenizer
from specdec.serving.protocol import APIError

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@lru_cache(maxsize=8)
def _compile(source: str):  # type: ignore[no-untyped-def]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def render_chat(messages: list[dict[str, str]], tokenizer: Tokenizer | None) -> str:
    """The prompt text for ``messages`` (``[{"role", "content"}]``), ending with the assistant cue."""
    template = (tokenizer.chat_template if tokenizer is not None else None) or DEFAULT_CHAT_TEMPLATE
    try:
        return str(
            _compile(template).render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=(tokenizer.bos_token if tokenizer else None) or "",
                eos_token=(tokenizer.eos_token if tokenizer else None) or "",
            )
        )
    except TemplateError as e:
        raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
