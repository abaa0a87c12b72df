"""``specdec serve`` as a user runs it: a subprocess on 127.0.0.1, stopped with Ctrl-C."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from serving_support import make_pair


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(*args: str) -> subprocess.Popen[str]:
    main = "import sys; from specdec.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", main, "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_serve_command_answers_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    target, draft = make_pair(tmp_path)
    port = free_port()
    proc = serve(
        "--target",
        str(target),
        "--draft",
        str(draft),
        "--dtype",
        "float32",
        "--port",
        str(port),
        "--served-model-name",
        "tiny",
        "--max-batch-size",
        "2",
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the server did not come up within 60 s"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model="tiny", prompt="the model", max_tokens=8, temperature=0)
        assert out.usage is not None and out.usage.completion_tokens == 8
        # Ctrl-C while a stream is in flight: the server drains it before exiting.
        stream = client.completions.create(
            model="tiny",
            prompt="the cache",
            max_tokens=240,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        first = next(iter(stream))
        proc.send_signal(signal.SIGINT)
        rest = list(stream)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0
    text = "".join(c.choices[0].text for c in [first, *rest] if c.choices)
    assert rest[-1].choices[0].finish_reason == "length" and len(text) > 0
    assert f"serving 'tiny' on http://127.0.0.1:{port}" in output


def test_serve_command_user_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from specdec.cli import main

    assert main(["serve", "--target", "/no/such/folder", "--max-batch-size", "0"]) == 2
    assert capsys.readouterr().err == "specdec: error: --max-batch-size must be >= 1, got 0\n"
    assert main(["serve", "--target", "/no/such/folder"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
