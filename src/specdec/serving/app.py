"""The OpenAI-compatible ASGI app: /v1/completions, /v1/chat/completions, /v1/models,
/health, /metrics and the playground page at /.

Handlers validate and tokenize on the event loop, hand an :class:`EngineRequest` to the
:class:`Scheduler` and relay its :class:`EngineEvent`s, as one JSON body or as server-sent
events in OpenAI's chunk format. Each streamed chunk carries an extra ``specdec`` field
(``token_ids``, ``kinds``, ``pieces``: the provenance of every token, for the playground);
OpenAI clients ignore it. A client that disconnects cancels its request, which frees its
batch row at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse

from specdec.drafters.base import Drafter
from specdec.models.loading import LoadedModel
from specdec.sampling import SamplingParams
from specdec.serving.batch_draft import BatchDraftModel
from specdec.serving.batch_engine import BatchEngine, EngineEvent, EngineRequest
from specdec.serving.chat import chat_prompt_for_request
from specdec.serving.metrics import ServerMetrics
from specdec.serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request
from specdec.serving.scheduler import QueueFullError, Scheduler, ShuttingDownError

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    max_batch_size: int = 8
    max_queue: int = 64
    max_seq_len: int | None = None  # context per request; default: the model's
    drain_timeout_s: float = 10.0
    adaptive_draft_tokens: bool = True  # False: always draft K (see policy.py)


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
class _Prepared:
    request: EngineRequest
    channel: _Channel
    prompt_tokens: int
    stream: bool
    include_usage: bool


def create_app(
    target: LoadedModel,
    drafting: BatchDraftModel | Callable[[], Drafter | None],
    config: ServerConfig,
) -> FastAPI:
    """Build the app; the engine thread starts with the app's lifespan and drains on shutdown.

    ``drafting``: a :class:`BatchDraftModel` (draft model batched over rows), or a factory of
    per-row drafters (one instance per batch row; returning None means plain decoding).
    """
    metrics = ServerMetrics(config.model_name)
    engine = BatchEngine(
        target,
        drafting,
        config.max_batch_size,
        metrics,
        config.max_seq_len,
        config.adaptive_draft_tokens,
    )
    scheduler = Scheduler(engine, metrics, config.max_queue)
    context_len = engine.context_len
    tokenizer = target.tokenizer

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop, config.drain_timeout_s)

    app = FastAPI(title="specdec", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            APIError(500, f"internal error: {exc}", type="server_error").body(), status_code=500
        )

    # ----------------------------------------------------------------- helpers
    def encode(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise APIError(
                    400, "text prompts need a model with a tokenizer; send token ids", param="prompt"
                )
            ids = tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
        vocab = target.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return ids

    def check_model(body: CompletionRequest | ChatCompletionRequest) -> None:
        if body.model != config.model_name:
            raise APIError(
                400,
                f"the model '{body.model}' does not exist; this server serves '{config.model_name}'",
                param="model",
                code="model_not_found",
            )

    def prepare(
        body: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int], max_tokens: int | None
    ) -> _Prepared:
        n = len(prompt_ids)
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
        if stop and tokenizer is None:
            raise APIError(400, "stop strings need a model with a tokenizer", param="stop")
        sampling = SamplingParams(body.temperature, body.top_k, body.top_p if body.top_p < 1.0 else None)
        channel = _Channel()
        request = EngineRequest(
            prompt_ids, max_tokens, sampling, channel.emit, body.seed, stop, body.ignore_eos
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _Prepared(request, channel, n, body.stream, include_usage)

    def submit(prepared: _Prepared) -> None:
        try:
            scheduler.submit(prepared.request)
        except QueueFullError as e:
            raise APIError(429, f"{e}; retry later", type="rate_limit_error", code="queue_full") from None
        except ShuttingDownError as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None

    async def collect(http: Request, prepared: _Prepared) -> tuple[EngineEvent, str]:
        """Wait for the whole output; cancel the request if the client goes away first."""
        cancelled = prepared.request.cancelled
        watcher = asyncio.create_task(_watch_disconnect(http, cancelled))
        text = []
        try:
            while True:
                event = await prepared.channel.queue.get()
                text.append(event.text)
                if event.finish_reason is not None:
                    return event, "".join(text)
        finally:
            watcher.cancel()
            cancelled.set()  # no-op when finished; frees the row when the handler was cancelled

    def usage(prepared: _Prepared, event: EngineEvent) -> dict[str, int]:
        completion = event.stats.new_tokens if event.stats else 0
        return {
            "prompt_tokens": prepared.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prepared.prompt_tokens + completion,
        }

    def check_failed(event: EngineEvent) -> None:
        if _failed(event):
            raise APIError(
                500, event.error or "generation failed", type="server_error", code="generation_failed"
            )

    async def sse(prepared: _Prepared, chunk: Callable[..., dict[str, Any]]) -> AsyncIterator[str]:
        try:
            first = chunk(None, "", role=True)
            if first:
                yield _sse(first)
            while True:
                event = await prepared.channel.queue.get()
                if _failed(event):
                    yield _sse(APIError(500, event.error or "generation failed", type="server_error").body())
                    break
                if event.token_ids or event.text:
                    body = chunk(None, event.text)
                    body["specdec"] = {
                        "token_ids": event.token_ids,
                        "kinds": event.kinds,
                        "pieces": event.pieces,
                        "drafted": event.drafted,
                        "accepted": event.accepted,
                    }
                    yield _sse(body)
                if event.finish_reason is not None:
                    body = chunk(FINISH_REASONS.get(event.finish_reason, event.finish_reason), "")
                    if event.stats is not None:
                        body["specdec"] = {"stats": event.stats.to_dict()}
                    yield _sse(body)
                    if prepared.include_usage:
                        yield _sse({**chunk(None, "", empty=True), "usage": usage(prepared, event)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            prepared.request.cancelled.set()  # the client left mid-stream: free the row now

    def finish_reason(event: EngineEvent) -> str:
        return FINISH_REASONS.get(event.finish_reason or "", "stop")

    async def respond(
        http: Request,
        prepared: _Prepared,
        chunk: Callable[..., dict[str, Any]],
        final: Callable[[EngineEvent, str], dict[str, Any]],
    ) -> Response:
        """Stream ``chunk``s by server-sent events, or wait for the whole completion and answer
        ``final(event, text)`` (the one tail both routes share)."""
        if prepared.stream:
            return StreamingResponse(sse(prepared, chunk), media_type="text/event-stream")
        event, text = await collect(http, prepared)
        check_failed(event)
        return JSONResponse(final(event, text))

    # ----------------------------------------------------------------- routes
    @app.post("/v1/completions", response_model=None)
    async def completions(http: Request) -> Response:
        body: CompletionRequest = parse_request(await http.body(), CompletionRequest)
        check_model(body)
        prompt = (
            body.prompt[0]
            if isinstance(body.prompt, list) and isinstance(body.prompt[0], str)
            else body.prompt
        )
        prepared = prepare(body, encode(prompt), body.max_tokens)  # type: ignore[arg-type]
        submit(prepared)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(finish: str | None, text: str, role: bool = False, empty: bool = False) -> dict[str, Any]:
            if role:
                return {}
            choices = [] if empty else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": config.model_name,
                "choices": choices,
            }

        def final(event: EngineEvent, text: str) -> dict[str, Any]:
            return {**chunk(finish_reason(event), text), "usage": usage(prepared, event)}

        return await respond(http, prepared, chunk, final)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(http: Request) -> Response:
        body: ChatCompletionRequest = parse_request(await http.body(), ChatCompletionRequest)
        check_model(body)
        if tokenizer is None:
            raise APIError(400, "chat needs a model with a tokenizer", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt_ids = chat_prompt_for_request(messages, tokenizer).token_ids
        max_tokens = body.max_completion_tokens or body.max_tokens
        prepared = prepare(body, encode(prompt_ids), max_tokens)
        submit(prepared)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(finish: str | None, text: str, role: bool = False, empty: bool = False) -> dict[str, Any]:
            delta: dict[str, str] = (
                {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            )
            choices = (
                [] if empty else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            )
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": config.model_name,
                "choices": choices,
            }

        def final(event: EngineEvent, text: str) -> dict[str, Any]:
            message = {"role": "assistant", "content": text}
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": config.model_name,
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(event)}
                ],
                "usage": usage(prepared, event),
            }

        return await respond(http, prepared, chunk, final)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": config.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "specdec",
                    "max_model_len": context_len,
                }
            ],
        }

    @app.get("/health")
    async def health() -> dict[str, Any]:
        waiting, active = scheduler.load()
        return {
            "status": "ok",
            "pid": os.getpid(),
            "model": config.model_name,
            "active": active,
            "waiting": waiting,
            "max_batch_size": config.max_batch_size,
            "max_queue": config.max_queue,
        }

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        waiting, active = scheduler.load()
        metrics.set_load(waiting, active)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        page = files("specdec.serving").joinpath("static/index.html").read_text()
        return page.replace("{{MODEL}}", config.model_name)

    return app


def _failed(event: EngineEvent) -> bool:
    """The engine failed the request (an error, or a cancellation by shutdown)."""
    return event.finish_reason == "error" or (event.finish_reason == "cancelled" and event.error is not None)


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def _watch_disconnect(http: Request, cancelled: threading.Event) -> None:
    while not await http.is_disconnected():
        await asyncio.sleep(0.1)
    cancelled.set()
