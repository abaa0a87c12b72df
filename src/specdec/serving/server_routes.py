"""The server's own routes: ``/health``, ``/metrics`` (Prometheus) and the playground page at ``/``."""

from __future__ import annotations

import os
from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from specdec.serving.protocol import Health

router = APIRouter()


@router.get("/health", response_model=Health)
async def health(http: Request) -> Health:
    """Liveness and load: requests holding a batch row and requests waiting for one."""
    state = http.app.state
    waiting, active = state.scheduler.load()
    return Health(
        pid=os.getpid(),
        model=state.config.model_name,
        active=active,
        waiting=waiting,
        max_batch_size=state.config.max_batch_size,
        max_queue=state.config.max_queue,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(http: Request) -> Response:
    """Prometheus metrics in the text exposition format."""
    state = http.app.state
    state.metrics.set_load(*state.scheduler.load())
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground(http: Request) -> str:
    """A page that streams completions and colours each token by its provenance."""
    page = files("specdec.serving").joinpath("static/index.html").read_text()
    return page.replace("{{MODEL}}", http.app.state.config.model_name)
