"""The OpenAI-compatible ASGI app: /v1/completions, /v1/chat/completions, /v1/models,
/health, /metrics and the playground page at /.

:func:`create_app` wires the parts: the :class:`BatchEngine` and its :class:`Scheduler` (the
engine thread, started and drained with the app's lifespan), the :class:`CompletionService`
that the routes share (``service.py``), the routes (``openai_routes.py``, ``server_routes.py``)
and the error handlers (``errors.py``). Request and response bodies are the models of
``protocol.py``, so ``/openapi.json`` and ``/docs`` describe the whole API.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from specdec.drafters.base import Drafter
from specdec.models.loading import LoadedModel
from specdec.serving import openai_routes, server_routes
from specdec.serving.batch_draft import BatchDraftModel
from specdec.serving.batch_engine import BatchEngine
from specdec.serving.errors import install_error_handlers
from specdec.serving.metrics import ServerMetrics
from specdec.serving.scheduler import Scheduler
from specdec.serving.service import CompletionService


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    max_batch_size: int = 8
    max_queue: int = 64
    max_seq_len: int | None = None  # context per request; default: the model's
    drain_timeout_s: float = 10.0
    adaptive_draft_tokens: bool = True  # False: always draft K (see policy.py)


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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop, config.drain_timeout_s)

    app = FastAPI(
        title="specdec",
        summary="Lossless speculative decoding behind an OpenAI-compatible API",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.service = CompletionService(target, config.model_name, scheduler, metrics, engine.context_len)
    install_error_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(server_routes.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document without its 422 answers: invalid fields answer 400 (see errors.py)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def _version() -> str:
    from specdec import __version__

    return str(__version__)
