"""The OpenAI-compatible API through the real ``openai`` client: completions, chat, streaming,
stop strings, usage, metrics, and OpenAI-style errors for every kind of bad input."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

import specdec
from serving_support import make_pair, metric, run_server
from specdec.drafters.draft_model import DraftModelDrafter
from specdec.serving import ServerConfig, create_app
from specdec.serving.chat import DEFAULT_CHAT_TEMPLATE, render_chat

MODEL = "tiny"
PROMPT = "the model is"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[specdec.LoadedModel, specdec.LoadedModel]:
    target_path, draft_path = make_pair(tmp_path_factory.mktemp("serve"))
    return specdec.load_model(target_path, dtype="float32"), specdec.load_model(draft_path, dtype="float32")


@pytest.fixture(scope="module")
def server(pair):  # type: ignore[no-untyped-def]
    target, draft = pair
    app = create_app(target, lambda: DraftModelDrafter(draft, 3), ServerConfig(MODEL, max_batch_size=4))
    with run_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=30)


def reference(pair, prompt: str, **kwargs) -> specdec.GenerationOutput:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return specdec.SpeculativeGenerator(pair[0]).generate(prompt, temperature=0.0, **kwargs)


def test_models_and_health(server: str, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["active"] == 0 and health["waiting"] == 0


def test_completion_equals_plain_greedy_decoding(pair, client: openai.OpenAI) -> None:  # type: ignore[no-untyped-def]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0)
    ref = reference(pair, PROMPT, max_new_tokens=40)
    assert out.choices[0].text == ref.text
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(pair[0].tokenizer.encode(PROMPT))
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.choices[0].finish_reason == {"length": "length", "eos": "stop"}[ref.finish_reason]


def test_token_id_prompt(pair, client: openai.OpenAI) -> None:  # type: ignore[no-untyped-def]
    ids = pair[0].tokenizer.encode(PROMPT)
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert out.choices[0].text == reference(pair, PROMPT, max_new_tokens=12).text


def test_chat_uses_template_and_matches_engine(pair, client: openai.OpenAI) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "system", "content": "be fast"}, {"role": "user", "content": "hello world"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    prompt = render_chat(messages, pair[0].tokenizer)
    assert prompt == "<|system|>\nbe fast\n<|user|>\nhello world\n<|assistant|>\n"
    ref = reference(pair, prompt, max_new_tokens=20)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.usage is not None and out.usage.prompt_tokens == len(pair[0].tokenizer.encode(prompt))


def test_chat_template_from_tokenizer(pair) -> None:  # type: ignore[no-untyped-def]
    tok = pair[0].tokenizer
    saved = tok.chat_template
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    )
    try:
        assert render_chat([{"role": "user", "content": "hi"}], tok) == "[user]hi"
    finally:
        tok.chat_template = saved
    assert "add_generation_prompt" in DEFAULT_CHAT_TEMPLATE


def test_streaming_completion(pair, server: str, client: openai.OpenAI) -> None:  # type: ignore[no-untyped-def]
    stream = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=40,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference(pair, PROMPT, max_new_tokens=40).text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 40
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    # The raw events: several tokens may arrive per event, each with its provenance.
    with httpx.stream(
        "POST",
        f"{server}/v1/completions",
        json={
            "model": MODEL,
            "prompt": PROMPT,
            "max_tokens": 40,
            "temperature": 0,
            "stream": True,
        },
    ) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"

    events = [json.loads(line[6:]) for line in lines[:-1]]
    token_events = [e["specdec"] for e in events if "token_ids" in e.get("specdec", {})]
    assert sum(len(e["token_ids"]) for e in token_events) == 40
    for e in token_events:
        assert len(e["kinds"]) == len(e["token_ids"]) == len(e["pieces"])
        assert set(e["kinds"]) <= {"accepted", "recovered", "bonus", "target"}
    assert "".join(p for e in token_events for p in e["pieces"]) == text
    assert "stats" in events[-1]["specdec"]


def test_streaming_chat(pair, client: openai.OpenAI) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": "the cache"}]
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == reference(pair, render_chat(messages, pair[0].tokenizer), max_new_tokens=16).text


def test_stop_string(pair, client: openai.OpenAI) -> None:  # type: ignore[no-untyped-def]
    full = reference(pair, PROMPT, max_new_tokens=40).text
    stop = full[10:14]
    expected = full[: full.index(stop)]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop])
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_seeded_sampling_is_reproducible_with_fixed_draft_length(pair) -> None:  # type: ignore[no-untyped-def]
    target, draft = pair
    config = ServerConfig(MODEL, max_batch_size=2, adaptive_draft_tokens=False)
    with run_server(create_app(target, lambda: DraftModelDrafter(draft, 3), config)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)

        def once(seed: int) -> str:
            return (
                client.completions.create(
                    model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0.9, top_p=0.95, seed=seed
                )
                .choices[0]
                .text
            )

        first = once(7)
        assert len(first) > 0 and once(7) == first
        assert once(8) != first


def _error(response: httpx.Response, status: int, param: str | None = None) -> dict:  # type: ignore[type-arg]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error  # type: ignore[no-any-return]


BAD_BODIES = [
    ({"model": "gpt-4", "prompt": "x"}, "model"),
    ({"model": MODEL, "prompt": ""}, "prompt"),
    ({"model": MODEL, "prompt": []}, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "16"}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": "x", "seed": 1.5}, "seed"),
    ({"model": MODEL, "prompt": "x", "stop": 3}, "stop"),
    ({"model": MODEL, "prompt": "x", "n": 2}, "n"),
    ({"model": MODEL, "prompt": [1, 10**6]}, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    ({"model": MODEL, "prompt": "the model " * 200}, "prompt"),
    ({"prompt": "x"}, "model"),
]


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
def test_bad_completion_requests(server: str, body: dict, param: str) -> None:  # type: ignore[type-arg]
    _error(httpx.post(f"{server}/v1/completions", json=body), 400, param)


def test_bad_chat_requests_and_malformed_json(server: str) -> None:
    url = f"{server}/v1/chat/completions"
    _error(httpx.post(url, json={"model": MODEL, "messages": []}), 400, "messages")
    _error(httpx.post(url, json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}), 400)
    _error(
        httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3}),
        400,
        "n",
    )
    for raw in (b'{"model": "tiny", "prompt": ', b"[1, 2]", b"\xff\xfe"):
        error = _error(
            httpx.post(f"{server}/v1/completions", content=raw, headers={"content-type": "application/json"}),
            400,
        )
        assert error["code"] == "invalid_json"


def test_openai_client_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        client.completions.create(model=MODEL, prompt=PROMPT, n=2)
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_metrics_scrape(server: str, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    response = httpx.get(f"{server}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, f'specdec_requests_total{{model="{MODEL}",status="length"}}') >= 1
    assert metric(text, "specdec_generation_tokens_total") >= 20
    assert metric(text, "specdec_draft_tokens_total") > 0
    rate = metric(text, "specdec_acceptance_rate")
    assert 0.0 <= rate <= 1.0
    accepted, drafted = (
        metric(text, "specdec_accepted_tokens_total"),
        metric(text, "specdec_draft_tokens_total"),
    )
    assert rate == pytest.approx(accepted / drafted, rel=1e-4)
    assert metric(text, "specdec_mean_accepted_length") >= 1.0
    assert 0.0 <= metric(text, 'specdec_position_acceptance_rate{position="0"}') <= 1.0
    assert metric(text, "specdec_queue_depth") == 0
    assert metric(text, 'specdec_phase_seconds_total{phase="verify"}') > 0
    by_k = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("specdec_passes_by_draft")]
    assert by_k and sum(by_k) == metric(text, "specdec_verify_passes_total")
    assert "# TYPE specdec_requests_total counter" in text
