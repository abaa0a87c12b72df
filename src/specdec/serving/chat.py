"""The server's side of chat: the engine's chat templates (:mod:`specdec.engine.chat`), with
their errors turned into OpenAI-style 400 answers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from specdec.engine import GenerationError
from specdec.engine.chat import DEFAULT_CHAT_TEMPLATE, ChatPrompt, chat_prompt
from specdec.models.tokenizer import Tokenizer
from specdec.serving.protocol import APIError

__all__ = ["DEFAULT_CHAT_TEMPLATE", "chat_prompt_for_request", "render_chat"]


def chat_prompt_for_request(messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer | None) -> ChatPrompt:
    """The rendered and encoded prompt for a chat request; template errors answer 400."""
    try:
        return chat_prompt(messages, tokenizer)
    except GenerationError as e:
        raise APIError(400, str(e), param="messages") from None


def render_chat(messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer | None) -> str:
    """The prompt text for ``messages`` (``[{"role", "content"}]``), ending with the assistant cue."""
    return chat_prompt_for_request(messages, tokenizer).text
