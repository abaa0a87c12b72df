"""The server's API: OpenAI-compatible request and response bodies, and the OpenAI error format.

The routes declare these models, so ``/openapi.json`` (and ``/docs``) describe every body, bound
and default. Requests are validated strictly (pydantic strict mode): ``"max_tokens": "16"`` is a
type error, not a silent conversion. Every failure becomes :class:`APIError`, answered as
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status, as OpenAI does (invalid
fields included: 400, never FastAPI's 422). Only ``n = 1`` is served; ``logprobs``, ``echo`` and
``best_of`` are refused with a clear 400. ``top_k`` and ``ignore_eos`` are vLLM-style extensions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# torch generators take seeds in the int64 / uint64 range.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
FinishReason = Literal["stop", "length", "abort"]


class APIError(Exception):
    """An error answered to the client as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return ErrorResponse(
            error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        ).model_dump()


# ------------------------------------------------------------------------------------ requests
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="send a last chunk with the token usage")


class _SamplingFields(_Strict):
    model: str = Field(description="the served model's id (see /v1/models)")
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = Field(1.0, description="0: greedy decoding")
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = Field(
        None, description="extension: sample among the k most likely tokens"
    )
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = Field(
        None, description="the same seed, prompt and parameters give the same output"
    )
    stop: str | Annotated[list[str], Field(max_length=4)] | None = Field(
        None, description="up to 4 strings that end the output (not included in it)"
    )
    n: int = Field(1, description="choices per request; only 1 is supported")
    stream: bool = Field(False, description="send server-sent events of chunks, ending with [DONE]")
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-sequence")
    logprobs: bool | int | None = Field(None, description="not supported")
    best_of: int | None = Field(None, description="only 1 is supported")

    def stop_list(self) -> list[str]:
        """``stop`` as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check_unsupported(self) -> None:
        """Refuse the OpenAI options this server does not implement."""
        if self.n != 1:
            raise APIError(
                400, f"n={self.n} is not supported: this server returns exactly one choice (n=1)", param="n"
            )
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported (only best_of=1)", param="best_of")
        if self.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported by this server", param="logprobs")


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``."""

    prompt: (
        str
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1, max_length=1)]
    ) = Field(description="text, token ids, or a list of one text")
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        16, description="tokens to generate; null: up to the context length"
    )
    echo: bool = Field(False, description="not supported")

    def check_unsupported(self) -> None:
        """Refuse the OpenAI options this server does not implement."""
        super().check_unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported by this server", param="echo")

    def prompt_input(self) -> str | list[int]:
        """The prompt as text or token ids."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return str(self.prompt[0])
        return self.prompt  # type: ignore[return-value]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The message's text, its parts joined."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="tokens to generate (takes precedence over max_tokens)"
    )


# ----------------------------------------------------------------------------------- responses
def _omitted_if_none(description: str) -> Any:
    return Field(None, description=description, exclude_if=lambda value: value is None)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    """A completion, or (``object = "text_completion"`` too) one streamed chunk of one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = _omitted_if_none("token counts (streams: the last chunk, if asked for)")
    specdec: dict[str, Any] | None = _omitted_if_none(
        "extension, streams only: each chunk's token_ids, kinds (accepted / recovered / bonus / "
        "target), pieces, drafted and accepted; the final chunk's stats"
    )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    """``POST /v1/chat/completions`` without ``stream``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = _omitted_if_none("the first chunk only")
    content: str | None = _omitted_if_none("new text")


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = _omitted_if_none("the last chunk, if stream_options.include_usage")
    specdec: dict[str, Any] | None = _omitted_if_none("extension: as in completion chunks")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "specdec"
    max_model_len: int = Field(description="context length per request, in tokens")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    pid: int
    model: str
    active: int = Field(description="requests holding a batch row")
    waiting: int = Field(description="requests queued for a batch row")
    max_batch_size: int
    max_queue: int


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_error or server_error")
    param: str | None = Field(description="the request field at fault, if one is")
    code: str | None = Field(description="a machine-readable reason, if there is one")


class ErrorResponse(BaseModel):
    """Every 4xx / 5xx answer, as OpenAI writes it."""

    error: ErrorDetail
