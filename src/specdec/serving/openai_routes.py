"""The OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Each answers one JSON body, or with ``"stream": true`` server-sent events of chunks (the same
models, one per ``data:`` line, then ``data: [DONE]``). Each streamed chunk carries an extra
``specdec`` field (``token_ids``, ``kinds``, ``pieces``: the provenance of every token, for the
playground); OpenAI clients ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from specdec.serving.chat import chat_prompt_for_request
from specdec.serving.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorResponse,
    FinishReason,
    ModelCard,
    ModelList,
    Usage,
)
from specdec.serving.service import CompletionService, Prepared, finish_reason

router = APIRouter(prefix="/v1")

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid request"},
    429: {"model": ErrorResponse, "description": "the queue is full; retry later"},
    500: {"model": ErrorResponse, "description": "generation failed"},
    503: {"model": ErrorResponse, "description": "the server is shutting down"},
}


def _streamed(chunk: type[Completion | ChatCompletionChunk]) -> dict[int | str, dict[str, Any]]:
    """The 200 answer's two media types: JSON, or (``stream``) server-sent events of ``chunk``."""
    events = {
        # One server-sent event (OpenAPI before 3.2: the schema of a text/event-stream describes
        # each event): its data is a chunk's JSON, or [DONE] at the end.
        "schema": {
            "type": "object",
            "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
            "required": ["data"],
        },
        "example": f"data: {{...{chunk.__name__} JSON...}}\n\ndata: [DONE]\n\n",
    }
    return {200: {"content": {"text/event-stream": events}}, **_ERRORS}


def service(http: Request) -> CompletionService:
    """The app's :class:`CompletionService` (a route dependency)."""
    return http.app.state.service  # type: ignore[no-any-return]


Service = Annotated[CompletionService, Depends(service)]


@dataclass(frozen=True)
class _CompletionFormat:
    prepared: Prepared
    model: str

    def opening(self) -> None:
        return None

    def delta(self, text: str, finish: FinishReason | None) -> Completion:
        choice = CompletionChoice(text=text, finish_reason=finish)
        return Completion(
            id=self.prepared.id, created=self.prepared.created, model=self.model, choices=[choice]
        )

    def closing(self, usage: Usage) -> Completion:
        return Completion(
            id=self.prepared.id, created=self.prepared.created, model=self.model, choices=[], usage=usage
        )


@dataclass(frozen=True)
class _ChatFormat:
    prepared: Prepared
    model: str

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        p = self.prepared
        return ChatCompletionChunk(id=p.id, created=p.created, model=self.model, choices=choices, usage=usage)

    def opening(self) -> ChatCompletionChunk:
        return self._chunk(
            [ChatChunkChoice(delta=ChatDelta(role="assistant", content=""), finish_reason=None)]
        )

    def delta(self, text: str, finish: FinishReason | None) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta=ChatDelta(content=text or None), finish_reason=finish)])

    def closing(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], usage)


@router.post("/completions", response_model=Completion, responses=_streamed(Completion))
async def completions(body: CompletionRequest, http: Request, svc: Service) -> Completion | Response:
    """Complete a prompt (text or token ids)."""
    svc.check(body)
    prepared = svc.submit(body, svc.encode(body.prompt_input()), body.max_tokens, "cmpl")
    fmt = _CompletionFormat(prepared, svc.model_name)
    if prepared.stream:
        return StreamingResponse(svc.stream(prepared, fmt), media_type="text/event-stream")
    event, text = await svc.collect(http, prepared)
    answer = fmt.delta(text, finish_reason(event))
    answer.usage = prepared.usage(event)
    return answer


@router.post("/chat/completions", response_model=ChatCompletion, responses=_streamed(ChatCompletionChunk))
async def chat_completions(
    body: ChatCompletionRequest, http: Request, svc: Service
) -> ChatCompletion | Response:
    """Answer a conversation, formatted with the model's chat template."""
    svc.check(body)
    if svc.tokenizer is None:
        raise APIError(400, "chat needs a model with a tokenizer", param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt_ids = chat_prompt_for_request(messages, svc.tokenizer).token_ids
    max_tokens = body.max_completion_tokens or body.max_tokens
    prepared = svc.submit(body, svc.encode(prompt_ids), max_tokens, "chatcmpl")
    if prepared.stream:
        fmt = _ChatFormat(prepared, svc.model_name)
        return StreamingResponse(svc.stream(prepared, fmt), media_type="text/event-stream")
    event, text = await svc.collect(http, prepared)
    choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason(event))
    return ChatCompletion(
        id=prepared.id,
        created=prepared.created,
        model=svc.model_name,
        choices=[choice],
        usage=prepared.usage(event),
    )


@router.get("/models", response_model=ModelList)
async def models(svc: Service) -> ModelList:
    """The one model this server serves."""
    return ModelList(data=[ModelCard(id=svc.model_name, max_model_len=svc.context_len)])
