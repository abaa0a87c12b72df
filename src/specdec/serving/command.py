"""``specdec serve``: the OpenAI-compatible server with batched speculative decoding."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from specdec.cli import UserError
from specdec.commands.common import add_model_arguments
from specdec.drafters.base import Drafter
from specdec.drafters.registry import DrafterSpec, make_drafter
from specdec.models import LoadedModel, load_model
from specdec.serving.batch_draft import BatchDraftModel


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, parallel=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--served-model-name", default=None, help="model id clients send (default: target folder name)"
    )
    p.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together (batch rows)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument(
        "--max-model-len", type=int, default=None, help="context per request (default: the model's)"
    )
    p.add_argument(
        "--fixed-draft-tokens",
        action="store_true",
        help="always draft --num-draft-tokens per row (no load-adaptive speculation)",
    )
    p.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to finish requests on shutdown")


def make_drafting(
    args: argparse.Namespace, target: LoadedModel
) -> BatchDraftModel | Callable[[], Drafter | None]:
    """The drafter ``--drafter`` names, built by :func:`make_drafter`: one draft model drafting
    for all rows at once where its capabilities say ``batchable`` (``draft``), else a factory of
    per-row instances (see :class:`~specdec.serving.batch_engine.BatchEngine`)."""
    spec = DrafterSpec(
        target, args.draft, args.num_draft_tokens, args.dtype, heads=args.heads, draft_vocab=args.draft_vocab
    )
    try:
        built = [make_drafter(args.drafter, spec)]  # built once up front: bad names fail here
    except ValueError as e:
        raise UserError(str(e)) from None
    if built[0] is not None and built[0].capabilities.batchable:
        return BatchDraftModel.from_drafter(built[0])
    return lambda: built.pop() if built else make_drafter(args.drafter, spec)


def build_app(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The ASGI app and its ServerConfig from parsed ``specdec serve`` options."""
    from specdec.serving.app import ServerConfig, create_app

    target = load_model(args.target, dtype=args.dtype, device=args.device)
    config = ServerConfig(
        model_name=args.served_model_name or target.path.name,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_seq_len=args.max_model_len,
        drain_timeout_s=args.drain_timeout,
        adaptive_draft_tokens=not args.fixed_draft_tokens,
    )
    return create_app(target, make_drafting(args, target), config), config


def run(args: argparse.Namespace) -> int:
    import uvicorn

    for name in ("max_batch_size", "max_queue", "num_draft_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    app, config = build_app(args)
    print(f"[specdec] serving '{config.model_name}' on http://{args.host}:{args.port}  (playground at /)")
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=int(args.drain_timeout) + 1,
    )
    return 0
