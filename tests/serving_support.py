"""Helpers for the serving tests: a tiny target/draft pair with a real BPE tokenizer, and a
uvicorn server running on 127.0.0.1 (a free port) in a background thread."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from helpers import save_tiny_llama

WORDS = (
    "the a model token draft target verify accept reject server batch queue stream cache "
    "fast slow small large red green blue one two three four five code def return if else "
    "for while print value list dict hello world speculative decoding is lossless"
).split()


def train_tokenizer(folder: Path, vocab_size: int = 160) -> int:
    """Train a small BPE on a few hundred random lines; save tokenizer files; return its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(400)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<unk>"])
    tok.train_from_iterator(lines, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return int(tok.get_vocab_size())


def make_pair(root: Path, max_len: int = 256) -> tuple[Path, Path]:
    """A tiny target and a noisy copy of it as draft, sharing one trained tokenizer."""
    tok_dir = root / "tok"
    vocab = train_tokenizer(tok_dir)
    target = save_tiny_llama(
        root / "target", vocab_size=vocab, init_std=0.15, seed=0, max_position_embeddings=max_len
    )
    draft = save_tiny_llama(
        root / "draft", vocab_size=vocab, seed=1, base=target, noise=0.03, max_position_embeddings=max_len
    )
    for folder in (target, draft):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_bytes((tok_dir / name).read_bytes())
    return target, draft


@contextmanager
def run_server(app, timeout: float = 20.0) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """Serve ``app`` on 127.0.0.1:<free port> in a thread; yield its base URL; stop it after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout, "the server did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def wait_until(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.02)


def metric(text: str, name: str) -> float:
    """The value of the Prometheus sample ``name`` (with labels, exactly as rendered)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)
