"""Continuous batching under load: concurrent greedy outputs equal single-request decoding,
disconnects free rows, the bounded queue answers 429, a failing drafter fails only its own
request, and shutdown drains or cancels in-flight work."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

import specdec
from serving_support import WORDS, make_pair, metric, run_server, wait_until
from specdec.drafters.base import DraftContext, DraftProposal
from specdec.drafters.draft_model import DraftModelDrafter
from specdec.sampling import SamplingParams
from specdec.serving import ServerConfig, create_app
from specdec.serving.batch_draft import BatchDraftModel
from specdec.serving.batch_engine import BatchEngine, EngineEvent, EngineRequest
from specdec.serving.metrics import ServerMetrics
from specdec.serving.scheduler import Scheduler, ShuttingDownError

MODEL = "tiny"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[specdec.LoadedModel, specdec.LoadedModel]:
    target_path, draft_path = make_pair(tmp_path_factory.mktemp("batch"))
    return specdec.load_model(target_path, dtype="float32"), specdec.load_model(draft_path, dtype="float32")


def client_for(url: str, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def prompts(count: int) -> list[tuple[str, int]]:
    """Distinct prompts (2-6 words) with distinct lengths to decode (6..37 tokens)."""
    return [
        (" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(2 + i % 5)), 6 + (5 * i) % 32)
        for i in range(count)
    ]


class SlowDrafter(DraftModelDrafter):
    """A draft model that takes ``delay`` seconds per proposal (a long-running request)."""

    def __init__(self, model: specdec.LoadedModel, delay: float, gate: threading.Event | None = None) -> None:
        super().__init__(model, 3)
        self.delay, self.gate = delay, gate

    def propose(self, ctx: DraftContext) -> DraftProposal:
        if self.gate is not None:
            self.gate.wait(timeout=60)
        time.sleep(self.delay)
        return super().propose(ctx)


class PoisonedDrafter(DraftModelDrafter):
    """Raises while drafting for prompts that start with token ``poison``."""

    def __init__(self, model: specdec.LoadedModel, poison: int) -> None:
        super().__init__(model, 3)
        self.poison = poison

    def propose(self, ctx: DraftContext) -> DraftProposal:
        if ctx.token_ids[0] == self.poison:
            raise RuntimeError("boom")
        return super().propose(ctx)


@pytest.mark.parametrize(("batched_draft", "adaptive"), [(False, False), (True, False), (True, True)])
def test_concurrent_greedy_outputs_equal_single_requests(pair, batched_draft: bool, adaptive: bool) -> None:  # type: ignore[no-untyped-def]
    target, draft = pair
    work = prompts(16)
    torch.manual_seed(0)
    single = specdec.SpeculativeGenerator(target, DraftModelDrafter(draft, 3))
    expected = [single.generate(p, max_new_tokens=m, temperature=0.0).text for p, m in work]
    config = ServerConfig(MODEL, max_batch_size=8, adaptive_draft_tokens=adaptive)
    drafting = BatchDraftModel(draft, 3) if batched_draft else (lambda: DraftModelDrafter(draft, 3))
    with run_server(create_app(target, drafting, config)) as url:
        client = client_for(url)

        def ask(item: tuple[str, int]) -> str:
            out = client.completions.create(model=MODEL, prompt=item[0], max_tokens=item[1], temperature=0)
            return out.choices[0].text

        one_at_a_time = [ask(item) for item in work[:4]]
        with ThreadPoolExecutor(16) as pool:
            concurrent = list(pool.map(ask, work, timeout=120))
        text = httpx.get(f"{url}/metrics").text
    assert one_at_a_time == expected[:4]
    assert concurrent == expected
    assert metric(text, "specdec_mean_batch_size") > 1.2  # passes really were shared
    if not adaptive:
        assert metric(text, "specdec_draft_tokens_total") > 0


def test_stream_disconnect_frees_the_row(pair) -> None:  # type: ignore[no-untyped-def]
    target, draft = pair
    config = ServerConfig(MODEL, max_batch_size=2, adaptive_draft_tokens=False)
    with run_server(create_app(target, lambda: SlowDrafter(draft, 0.05), config)) as url:
        body = {"model": MODEL, "prompt": "the cache", "max_tokens": 200, "temperature": 0, "stream": True}
        start = time.monotonic()
        with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if '"token_ids"' in line:
                    break  # one token event arrived; now hang up mid-stream
        assert httpx.get(f"{url}/health").json()["active"] <= 1
        wait_until(lambda: httpx.get(f"{url}/health").json()["active"] == 0, 5, "the row was not freed")
        # 200 tokens take >= 50 steps of 0.05 s: the row was freed by the disconnect, not by finishing.
        assert time.monotonic() - start < 2.5
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, f'specdec_requests_total{{model="{MODEL}",status="cancelled"}}') == 1
        assert metric(text, "specdec_active_requests") == 0

        # A non-streaming client that times out is cancelled too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=0.5)
        wait_until(lambda: httpx.get(f"{url}/health").json()["active"] == 0, 5, "the row was not freed")
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, f'specdec_requests_total{{model="{MODEL}",status="cancelled"}}') == 2


def test_full_queue_answers_429(pair) -> None:  # type: ignore[no-untyped-def]
    target, draft = pair
    gate = threading.Event()
    config = ServerConfig(MODEL, max_batch_size=1, max_queue=1, adaptive_draft_tokens=False)
    with run_server(create_app(target, lambda: SlowDrafter(draft, 0.0, gate), config)) as url:
        client = client_for(url)

        def ask() -> str:
            return (
                client.completions.create(model=MODEL, prompt="the", max_tokens=6, temperature=0)
                .choices[0]
                .text
            )

        def ask_and_leave() -> None:
            body = {"model": MODEL, "prompt": "the", "max_tokens": 6}
            httpx.post(f"{url}/v1/completions", json=body, timeout=1.0)

        def health(key: str) -> int:
            return int(httpx.get(f"{url}/health").json()[key])

        with ThreadPoolExecutor(3) as pool:
            running = pool.submit(ask)
            wait_until(lambda: health("active") == 1, 10, "first request not admitted")
            leaving = pool.submit(ask_and_leave)
            wait_until(lambda: health("waiting") == 1, 10, "second request not queued")
            response = httpx.post(
                f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}
            )
            with pytest.raises(openai.RateLimitError):
                ask()
            with pytest.raises(httpx.ReadTimeout):
                leaving.result(timeout=30)
            time.sleep(0.3)  # the server notices the hang-up; the place in the queue is free again
            third = pool.submit(ask)
            wait_until(lambda: health("waiting") == 1, 10, "third request not queued")
            gate.set()
            assert running.result(timeout=30) == third.result(timeout=30)
        assert response.status_code == 429
        error = response.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        assert (
            metric(httpx.get(f"{url}/metrics").text, 'specdec_rejected_requests_total{reason="queue_full"}')
            == 2
        )


def test_failing_drafter_fails_only_its_request(pair) -> None:  # type: ignore[no-untyped-def]
    target, draft = pair
    poison_prompt = "hello world"
    poison = target.tokenizer.encode(poison_prompt)[0]
    work = [(p, m) for p, m in prompts(6) if target.tokenizer.encode(p)[0] != poison]
    torch.manual_seed(0)
    expected = [specdec.SpeculativeGenerator(target).generate(p, max_new_tokens=m).text for p, m in work]
    config = ServerConfig(MODEL, max_batch_size=4, adaptive_draft_tokens=False)
    with run_server(create_app(target, lambda: PoisonedDrafter(draft, poison), config)) as url:
        client = client_for(url)

        def ask(item: tuple[str, int]) -> str:
            try:
                out = client.completions.create(
                    model=MODEL, prompt=item[0], max_tokens=item[1], temperature=0
                )
            except openai.InternalServerError as e:
                return f"ERROR {e}"
            return out.choices[0].text

        mixed = [(poison_prompt, 30), *work[:3], (poison_prompt, 20), *work[3:]]
        with ThreadPoolExecutor(len(mixed)) as pool:
            results = list(pool.map(ask, mixed, timeout=120))
        again = ask(work[0])
    assert "drafter failed: boom" in results[0] and "drafter failed: boom" in results[4]
    assert results[1:4] + results[5:] == expected
    assert again == expected[0]


def _collect(engine_request: EngineRequest, events: list[EngineEvent]) -> EngineRequest:
    engine_request.emit = events.append
    return engine_request


def test_shutdown_drains_then_cancels(pair) -> None:  # type: ignore[no-untyped-def]
    target, draft = pair
    metrics = ServerMetrics(MODEL)
    greedy = SamplingParams()
    ids = target.tokenizer.encode("the model")

    engine = BatchEngine(target, lambda: DraftModelDrafter(draft, 3), 2, metrics)
    scheduler = Scheduler(engine, metrics, max_queue=8)
    scheduler.start()
    events: list[EngineEvent] = []
    for _ in range(3):
        scheduler.submit(_collect(EngineRequest(ids, 10, greedy, print), events))
    scheduler.stop(drain_timeout=30)  # short requests: all finish normally
    finished = [e for e in events if e.finish_reason]
    assert [e.finish_reason for e in finished] == ["length"] * 3
    assert all(e.stats is not None and e.stats.new_tokens == 10 for e in finished)

    # Fixed K: the adaptive policy would measure that plain steps beat the slow drafter and stop
    # drafting, and the requests could then finish before the drain timeout.
    engine = BatchEngine(target, lambda: SlowDrafter(draft, 0.05), 2, metrics, adaptive_draft_tokens=False)
    scheduler = Scheduler(engine, metrics, max_queue=8)
    scheduler.start()
    events = []
    for _ in range(3):  # two get rows, one waits
        scheduler.submit(_collect(EngineRequest(ids, 200, greedy, print), events))
    time.sleep(0.2)
    start = time.monotonic()
    scheduler.stop(drain_timeout=0.3)
    assert time.monotonic() - start < 5
    assert [e.finish_reason for e in events if e.finish_reason] == ["cancelled"] * 3
    with pytest.raises(ShuttingDownError):
        scheduler.submit(EngineRequest(ids, 5, greedy, events.append))
