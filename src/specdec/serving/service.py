"""One request's way through the server, shared by the completion and chat routes.

:class:`CompletionService` validates what the request models cannot check alone (the model id,
the prompt's token ids, the context length), hands an :class:`EngineRequest` to the
:class:`Scheduler`, and relays the engine's :class:`EngineEvent`s: collected into one answer, or
as server-sent events in OpenAI's chunk format through a :class:`StreamFormat`. A client that
disconnects cancels its request, which frees its batch row at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import Request
from pydantic import BaseModel

from specdec.models.loading import LoadedModel
from specdec.sampling import SamplingParams
from specdec.serving.batch_engine import EngineEvent, EngineRequest
from specdec.serving.metrics import ServerMetrics
from specdec.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    FinishReason,
    Usage,
)
from specdec.serving.scheduler import QueueFullError, Scheduler, ShuttingDownError

_FINISH_REASONS: dict[str, FinishReason] = {
    "eos": "stop",
    "stop": "stop",
    "length": "length",
    "cancelled": "abort",
}


def finish_reason(event: EngineEvent) -> FinishReason:
    """The OpenAI finish reason of the engine's last event."""
    return _FINISH_REASONS.get(event.finish_reason or "", "stop")


class _Channel:
    """Carries engine events from the engine thread to one handler's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[EngineEvent] = asyncio.Queue()

    def emit(self, event: EngineEvent) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


@dataclass(frozen=True)
class Prepared:
    """A validated request, its answer's id and the channel its events arrive on."""

    request: EngineRequest
    channel: _Channel
    prompt_tokens: int
    stream: bool
    include_usage: bool
    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)

    def usage(self, event: EngineEvent) -> Usage:
        """Token counts once ``event`` finished the request."""
        completion = event.stats.new_tokens if event.stats else 0
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )


class StreamFormat(Protocol):
    """How one route writes its stream's chunks (each chunk model has a ``specdec`` field)."""

    def opening(self) -> BaseModel | None: ...  # sent before any text (chat: the assistant role)
    def delta(self, text: str, finish: FinishReason | None) -> BaseModel: ...
    def closing(self, usage: Usage) -> BaseModel: ...  # the usage chunk (no choices)


class CompletionService:
    def __init__(
        self,
        target: LoadedModel,
        model_name: str,
        scheduler: Scheduler,
        metrics: ServerMetrics,
        context_len: int,
    ) -> None:
        self.target, self.model_name, self.scheduler = target, model_name, scheduler
        self.metrics, self.context_len = metrics, context_len
        self.tokenizer = target.tokenizer

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt; 400 when empty, out of the vocabulary, or text without a tokenizer."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(
                    400, "text prompts need a model with a tokenizer; send token ids", param="prompt"
                )
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
        vocab = self.target.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return ids

    def check(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        """Refuse unsupported options and other models' ids."""
        body.check_unsupported()
        if body.model != self.model_name:
            raise APIError(
                400,
                f"the model '{body.model}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def submit(
        self,
        body: CompletionRequest | ChatCompletionRequest,
        prompt_ids: list[int],
        max_tokens: int | None,
        id_prefix: str,
    ) -> Prepared:
        """Check the context length and queue the request (429 when the queue is full)."""
        n, context_len = len(prompt_ids), self.context_len
        if max_tokens is None:
            max_tokens = context_len - n
        if n >= context_len or n + max_tokens > context_len:
            raise APIError(
                400,
                f"this model's maximum context length is {context_len} tokens; the request "
                f"has {n} prompt tokens and asks for {max_tokens} more",
                param="max_tokens" if n < context_len else "prompt",
                code="context_length_exceeded",
            )
        stop = body.stop_list()
        if stop and self.tokenizer is None:
            raise APIError(400, "stop strings need a model with a tokenizer", param="stop")
        sampling = SamplingParams(body.temperature, body.top_k, body.top_p if body.top_p < 1.0 else None)
        channel = _Channel()
        request = EngineRequest(
            prompt_ids, max_tokens, sampling, channel.emit, body.seed, stop, body.ignore_eos
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        prepared = Prepared(
            request, channel, n, body.stream, include_usage, f"{id_prefix}-{uuid.uuid4().hex}"
        )
        try:
            self.scheduler.submit(request)
        except QueueFullError as e:
            raise APIError(429, f"{e}; retry later", type="rate_limit_error", code="queue_full") from None
        except ShuttingDownError as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        return prepared

    async def collect(self, http: Request, prepared: Prepared) -> tuple[EngineEvent, str]:
        """Wait for the whole output; cancel the request if the client goes away first."""
        cancelled = prepared.request.cancelled
        watcher = asyncio.create_task(_watch_disconnect(http, cancelled))
        text = []
        try:
            while True:
                event = await self._next(prepared)
                text.append(event.text)
                if event.finish_reason is not None:
                    break
        finally:
            watcher.cancel()
            cancelled.set()  # no-op when finished; frees the row when the handler was cancelled
        if _failed(event):
            raise APIError(
                500, event.error or "generation failed", type="server_error", code="generation_failed"
            )
        return event, "".join(text)

    async def stream(self, prepared: Prepared, fmt: StreamFormat) -> AsyncIterator[str]:
        """Server-sent events: the chunks of ``fmt``, each text chunk with its tokens' provenance."""
        try:
            opening = fmt.opening()
            if opening is not None:
                yield _sse(opening)
            while True:
                event = await self._next(prepared)
                if _failed(event):
                    yield _sse(APIError(500, event.error or "generation failed", type="server_error"))
                    break
                if event.token_ids or event.text:
                    chunk = fmt.delta(event.text, None)
                    chunk.specdec = {  # type: ignore[attr-defined]
                        "token_ids": event.token_ids,
                        "kinds": event.kinds,
                        "pieces": event.pieces,
                        "drafted": event.drafted,
                        "accepted": event.accepted,
                    }
                    yield _sse(chunk)
                if event.finish_reason is not None:
                    chunk = fmt.delta("", finish_reason(event))
                    if event.stats is not None:
                        chunk.specdec = {"stats": event.stats.to_dict()}  # type: ignore[attr-defined]
                    yield _sse(chunk)
                    if prepared.include_usage:
                        yield _sse(fmt.closing(prepared.usage(event)))
                    break
            yield "data: [DONE]\n\n"
        finally:
            prepared.request.cancelled.set()  # the client left mid-stream: free the row now

    async def _next(self, prepared: Prepared) -> EngineEvent:
        event = await prepared.channel.queue.get()
        if event.finish_reason is not None and not _failed(event):
            self.metrics.observe_request(time.perf_counter() - prepared.started)
        return event


def _failed(event: EngineEvent) -> bool:
    """The engine failed the request (an error, or a cancellation by shutdown)."""
    return event.finish_reason == "error" or (event.finish_reason == "cancelled" and event.error is not None)


def _sse(body: BaseModel | APIError) -> str:
    text = body.model_dump_json() if isinstance(body, BaseModel) else json.dumps(body.body())
    return f"data: {text}\n\n"


async def _watch_disconnect(http: Request, cancelled: threading.Event) -> None:
    while not await http.is_disconnected():
        await asyncio.sleep(0.1)
    cancelled.set()
