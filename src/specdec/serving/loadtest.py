"""A small closed-loop load generator for ``specdec serve`` on 127.0.0.1.

``C`` clients each send ``--requests-per-client`` streaming completions one after another
(bounded: nothing runs forever); the report gives throughput (completion tokens/s over the
wall time), request latency and time-to-first-token percentiles, and the server's acceptance
rate, mean batch size and draft tokens per row and pass over the run (from ``/metrics``
deltas). The machine's speed drifts by 10 % or more from minute to minute, so every level runs
``--rounds`` times on each server, the servers taking turns, and the report gives each server's
median run and the per-round throughput ratios of each server to the first one.

    python -m specdec.serving.loadtest --target demo-target --draft demo-draft \\
        --drafters none draft --concurrency 1 4 16 --rounds 3

starts one ``specdec serve`` subprocess per drafter on a free local port; ``--url`` measures a
server that is already running (loopback addresses only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

import httpx

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
    "def read_lines(path):\n    with open(path) as f:\n",
    "def is_prime(n):\n",
    "    def __repr__(self):\n        return ",
    "for i in range(len(items)):\n",
    "def merge(left, right):\n    result = []\n",
    "import json\n\n\ndef load_config(path):\n",
    "class Node:\n    def __init__(self, value, next=None):\n",
    "def flatten(items):\n",
    "    try:\n        value = int(text)\n    except ValueError:\n",
    "def count_words(text):\n    counts = {}\n",
    'if __name__ == "__main__":\n',
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n",
]


@dataclass(frozen=True)
class LoadResult:
    server: str
    concurrency: int
    requests: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    requests_per_s: float
    latency_p50_s: float
    latency_p90_s: float
    latency_p99_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    acceptance_rate: float
    mean_batch_size: float
    drafts_per_row_step: float  # mean K actually drafted per sequence and pass (0: plain)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = q / 100 * (len(ordered) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float, int]:  # type: ignore[type-arg]
    """``(latency, time to first token, completion tokens)`` of one streamed completion."""
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and event.get("choices") and event["choices"][0].get("text"):
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return latency, first if first is not None else latency, tokens


async def run_level(
    url: str, model: str, concurrency: int, per_client: int, max_tokens: int, temperature: float
) -> tuple[list, float]:  # type: ignore[type-arg]
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(300.0), limits=httpx.Limits(max_connections=concurrency + 4)
    ) as client:

        async def worker(index: int) -> list[tuple[float, float, int]]:
            out = []
            for i in range(per_client):
                prompt = PROMPTS[(index * per_client + i) % len(PROMPTS)]
                body = {
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "temperature": temperature,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "ignore_eos": True,
                }
                out.append(await one_request(client, url, body))
            return out

        start = time.perf_counter()
        results = await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return [r for rs in results for r in rs], time.perf_counter() - start


def warm_up(url: str) -> str:
    """The served model id, after one short request (first-call costs stay out of the figures)."""
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    asyncio.run(run_level(url, model, 1, 1, 8, 0.0))
    return str(model)


def measure_level(url: str, model: str, label: str, concurrency: int, args: argparse.Namespace) -> LoadResult:
    """One closed-loop run of ``concurrency`` clients against one server."""
    before = scrape(url)
    samples, wall = asyncio.run(
        run_level(url, model, concurrency, args.requests_per_client, args.max_tokens, args.temperature)
    )
    after = scrape(url)
    delta = {name: after[name] - before.get(name, 0.0) for name in after}
    drafted, passes = delta["specdec_draft_tokens_total"], delta["specdec_verify_passes_total"]
    row_steps = delta["specdec_sequence_steps_total"]
    tokens = sum(s[2] for s in samples)
    latencies, ttfts = [s[0] for s in samples], [s[1] for s in samples]
    return LoadResult(
        label,
        concurrency,
        len(samples),
        tokens,
        wall,
        tokens / wall,
        len(samples) / wall,
        percentile(latencies, 50),
        percentile(latencies, 90),
        percentile(latencies, 99),
        percentile(ttfts, 50),
        percentile(ttfts, 90),
        delta["specdec_accepted_tokens_total"] / drafted if drafted else 0.0,
        row_steps / passes if passes else 0.0,
        drafted / row_steps if row_steps else 0.0,
    )


def measure_rounds(servers: dict[str, str], args: argparse.Namespace) -> dict[tuple[str, int], list[LoadResult]]:
    """``args.rounds`` rounds; in each, every level runs on every server back to back (the
    server order rotating by round), so a pair of servers is compared over the same minute of a
    noisy machine rather than minutes apart."""
    models = {label: warm_up(url) for label, url in servers.items()}
    labels = list(servers)
    runs: dict[tuple[str, int], list[LoadResult]] = {}
    for r in range(args.rounds):
        order = labels[r % len(labels) :] + labels[: r % len(labels)]
        for concurrency in args.concurrency:
            for label in order:
                result = measure_level(servers[label], models[label], label, concurrency, args)
                runs.setdefault((label, concurrency), []).append(result)
    return runs


def lower_median(values: list[float]) -> float:
    """The median (the lower middle value for an even count: always one that was measured)."""
    return sorted(values)[(len(values) - 1) // 2]


def median_run(results: list[LoadResult]) -> LoadResult:
    """The run with the median throughput (see :func:`lower_median`)."""
    middle = lower_median([r.tokens_per_s for r in results])
    return next(r for r in results if r.tokens_per_s == middle)


def paired_ratios(runs: dict[tuple[str, int], list[LoadResult]], label: str, base: str, concurrency: int) -> list[float]:
    """Throughput of ``label`` over ``base`` at one level, per round (measured side by side)."""
    pairs = zip(runs[(label, concurrency)], runs[(base, concurrency)], strict=True)
    return [a.tokens_per_s / b.tokens_per_s for a, b in pairs]


HEADER = (
    "| server | clients | requests | tokens | tok/s | req/s | latency p50 / p90 / p99 (s) "
    "| TTFT p50 / p90 (s) | acceptance | mean batch | drafts/row/pass |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(r: LoadResult) -> str:
    return (
        f"| {r.server} | {r.concurrency} | {r.requests} | {r.completion_tokens} | {r.tokens_per_s:.1f} | "
        f"{r.requests_per_s:.2f} | {r.latency_p50_s:.2f} / {r.latency_p90_s:.2f} / {r.latency_p99_s:.2f} | "
        f"{r.ttft_p50_s:.2f} / {r.ttft_p90_s:.2f} | {r.acceptance_rate:.1%} | {r.mean_batch_size:.1f} | "
        f"{r.drafts_per_row_step:.2f} |"
    )


def launch(drafter: str, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-c",
        "import sys; from specdec.cli import main; sys.exit(main())",
        "serve",
        "--target",
        args.target,
        "--draft",
        args.draft,
        "--drafter",
        drafter,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *shlex.split(args.server_args),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"specdec serve exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("specdec serve did not start within 300 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m specdec.serving.loadtest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default=None, help="measure this running server (127.0.0.1 only)")
    p.add_argument("--target", default="demo-target")
    p.add_argument("--draft", default="demo-draft")
    p.add_argument("--drafters", nargs="+", default=["none", "draft"], help="one server per drafter (ratios are to the first)")
    p.add_argument("--server-args", default="", help="extra 'specdec serve' arguments")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=3, help="rounds over every level and server (median reported)")
    p.add_argument("--json", default=None, help="also write every run to this JSON file")
    args = p.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    servers: dict[str, str] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if args.url:
            if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
                raise SystemExit("--url must point at a loopback address (127.0.0.1)")
            servers["running"] = args.url.rstrip("/")
        else:
            for drafter in args.drafters:
                proc, url = launch(drafter, args)
                procs.append(proc)
                servers[f"{drafter} {args.server_args}".strip()] = url
        runs = measure_rounds(servers, args)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)
    rows = [median_run(runs[(label, c)]) for label in servers for c in args.concurrency]
    print(HEADER)
    print("\n".join(format_row(r) for r in rows))
    labels = list(servers)
    if len(labels) > 1:
        print(f"\nthroughput ratios, per round ({args.rounds} rounds, servers measured side by side):")
    for label in labels[1:]:
        for c in args.concurrency:
            ratios = paired_ratios(runs, label, labels[0], c)
            print(
                f"  {c:3d} clients: {label.split()[0]} / {labels[0].split()[0]} = {lower_median(ratios):.2f} "
                f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for results in runs.values() for r in results], f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
