"""OpenAI-compatible HTTP serving with continuously batched speculative decoding.

``app`` (wiring) -> ``openai_routes`` / ``server_routes`` (routes, bodies from ``protocol``,
errors from ``errors``) -> ``service`` (validation, SSE) -> ``scheduler`` (engine thread,
bounded queue) -> ``batch_engine`` (one batched target pass per step, ragged acceptance per
row) -> ``policy`` (draft length under load). ``metrics`` feeds ``prometheus_client``;
``ray_deploy`` runs replicas on Ray Serve.
"""

from specdec.serving.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
