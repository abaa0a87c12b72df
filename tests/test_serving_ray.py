"""Two specdec replicas behind Ray Serve's HTTP proxy on 127.0.0.1 (runs only where ``ray`` is
installed: ``pip install "ray[serve]"``)."""

from __future__ import annotations

import argparse
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

import specdec
from serving_support import make_pair

if os.environ.get("CI"):  # `make test` installs the ray extra: in CI a missing ray is a failure
    import ray.serve  # noqa: F401
ray = pytest.importorskip("ray", reason='needs ray: pip install "ray[serve]"')
serve = pytest.importorskip("ray.serve", reason='needs ray: pip install "ray[serve]"')


def test_two_replicas_behind_ray_serve(tmp_path: Path) -> None:
    from specdec.serving.ray_deploy import add_arguments, build_application

    target_path, draft_path = make_pair(tmp_path)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--target",
            str(target_path),
            "--draft",
            str(draft_path),
            "--dtype",
            "float32",
            "--served-model-name",
            "tiny",
            "--replicas",
            "2",
            "--cpus-per-replica",
            "0.5",
            "--max-batch-size",
            "2",
        ]
    )
    prompts = [f"the {word} model" for word in ("fast", "slow", "small", "large", "red", "blue")]
    target = specdec.load_model(target_path, dtype="float32")
    torch.manual_seed(0)
    expected = [specdec.SpeculativeGenerator(target).generate(p, max_new_tokens=12).text for p in prompts]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(args), name="specdec", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(prompt: str) -> str:
            out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
            return out.choices[0].text

        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(ask, prompts, timeout=120)) == expected
        pids = {httpx.get(f"{url}/health", timeout=30).json()["pid"] for _ in range(24)}
        assert len(pids) == 2  # both replicas answer
        error = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "n": 2}, timeout=30)
        assert error.status_code == 400 and error.json()["error"]["param"] == "n"
    finally:
        serve.shutdown()
        ray.shutdown()
