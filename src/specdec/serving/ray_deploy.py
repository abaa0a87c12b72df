"""Scale-out: several ``specdec serve`` replicas behind Ray Serve's HTTP proxy.

Each replica is a Ray actor that loads the target and drafter and runs the same FastAPI app
(engine thread, continuous batching) as ``specdec serve``; Ray Serve's proxy spreads requests
over the replicas (Moritz et al. 2018, "Ray"). Requires ``pip install "ray[serve]"``.

    python -m specdec.serving.ray_deploy --replicas 2 --target demo-target --port 8000

takes the options of ``specdec serve`` plus ``--replicas`` and ``--cpus-per-replica``.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any

from ray import serve
from ray.serve import Application


@serve.ingress()
class SpecdecReplica:
    """One replica: ``options`` are the parsed ``specdec serve`` arguments, as a dict."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = argparse.Namespace(**options)

    def __serve_build_asgi_app__(self):  # type: ignore[no-untyped-def]
        import torch

        from specdec.serving.command import build_app

        torch.set_num_threads(max(1, int(self.options.cpus_per_replica)))
        app, _ = build_app(self.options)
        return app


def build_application(args: argparse.Namespace) -> Application:
    """A Ray Serve application of ``args.replicas`` specdec replicas."""
    deployment = serve.deployment(
        SpecdecReplica,
        name="specdec",
        num_replicas=args.replicas,
        ray_actor_options={"num_cpus": args.cpus_per_replica},
        max_ongoing_requests=args.max_batch_size + args.max_queue,
    )
    return deployment.bind(vars(args))  # type: ignore[attr-defined]  # serve.deployment(cls) is a Deployment


def add_arguments(p: argparse.ArgumentParser) -> None:
    from specdec.serving.command import add_arguments as add_serve_arguments

    add_serve_arguments(p)
    p.add_argument("--replicas", type=int, default=2, help="server replicas")
    p.add_argument(
        "--cpus-per-replica", type=float, default=1.0, help="Ray CPUs (and torch threads) per replica"
    )


def main(argv: list[str] | None = None) -> int:
    import ray

    parser = argparse.ArgumentParser(prog="python -m specdec.serving.ray_deploy", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.target = _absolute(args.target)
    args.draft = _absolute(args.draft) if args.draft else None
    ray.init(include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_application(args), name="specdec", route_prefix="/")
    print(f"[specdec] {args.replicas} replicas behind http://{args.host}:{args.port}")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


def _absolute(name: str) -> str:
    """Replicas may run in another working directory: pass folders as absolute paths."""
    return os.path.abspath(name) if os.path.exists(name) else name


if __name__ == "__main__":
    raise SystemExit(main())
