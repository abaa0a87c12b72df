"""OpenAI-compatible HTTP serving with continuously batched speculative decoding.

``app`` (routes, SSE) -> ``scheduler`` (engine thread, bounded queue) -> ``batch_engine``
(one batched target pass per step, ragged acceptance per row) -> ``policy`` (draft length
under load). ``metrics`` renders Prometheus text; ``ray_deploy`` runs replicas on Ray Serve.
"""

from specdec.serving.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
