"""The live server against its own OpenAPI document, fuzzed by schemathesis: for valid and invalid
requests to every operation, no 5xx, every status and media type documented, every JSON body
matching its schema. Bounded to 30 examples per operation on a tiny model and a 48-token context,
so every generated request finishes quickly."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

import specdec
from serving_support import make_pair, run_server
from specdec.drafters.draft_model import DraftModelDrafter
from specdec.serving import ServerConfig, create_app

MODEL = "tiny"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.schemas.BaseSchema]:
    target_path, draft_path = make_pair(tmp_path_factory.mktemp("schema"))
    target = specdec.load_model(target_path, dtype="float32")
    draft = specdec.load_model(draft_path, dtype="float32")
    config = ServerConfig(MODEL, max_batch_size=4, max_seq_len=48)
    with run_server(create_app(target, lambda: DraftModelDrafter(draft, 3), config)) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


OPERATIONS = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/health"),
    ("GET", "/metrics"),
]


def test_every_operation_is_fuzzed(api: schemathesis.schemas.BaseSchema) -> None:
    documented = {(op.ok().method.upper(), op.ok().path) for op in api.get_all_operations()}
    assert documented == set(OPERATIONS)


# Invalid data only where there is input to make invalid (the request bodies).
FUZZED = [(method, path, GenerationMode.POSITIVE) for method, path in OPERATIONS] + [
    (method, path, GenerationMode.NEGATIVE) for method, path in OPERATIONS if method == "POST"
]


@pytest.mark.parametrize(("method", "path", "mode"), FUZZED)
def test_api_conforms_to_its_schema(
    api: schemathesis.schemas.BaseSchema, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api[path][method]
    statuses: Counter[int] = Counter()

    @given(case=operation.as_strategy(mode))
    @settings(
        max_examples=30,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: schemathesis.Case) -> None:
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            case.body["model"] = MODEL  # any other id is refused before generation starts
            if sum(statuses.values()) % 2:  # every other request streams: its events are checked too
                case.body["stream"] = True
        statuses[case.call_and_validate(checks=CHECKS, timeout=30).status_code] += 1

    fuzz()
    if mode is GenerationMode.NEGATIVE:
        assert set(statuses) == {400}, statuses
    else:
        assert statuses[200] > 0, statuses  # some requests really generated


def test_schema_declares_request_and_response_bodies(api: schemathesis.schemas.BaseSchema) -> None:
    raw = api.raw_schema
    for path in ("/v1/completions", "/v1/chat/completions"):
        operation = raw["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].endswith("Request")
        ok = operation["responses"]["200"]["content"]
        assert set(ok) == {"application/json", "text/event-stream"}
        assert operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorResponse"
        )
        assert "422" not in operation["responses"]
    request = raw["components"]["schemas"]["CompletionRequest"]["properties"]
    assert request["max_tokens"]["default"] == 16
    temperature = request["temperature"]
    assert (temperature["minimum"], temperature["maximum"], temperature["default"]) == (0.0, 2.0, 1.0)
    assert {"model", "prompt"} <= set(raw["components"]["schemas"]["CompletionRequest"]["required"])
    error = raw["components"]["schemas"]["ErrorDetail"]
    assert set(error["properties"]) == {"message", "type", "param", "code"}
    assert "HTTPValidationError" not in raw["components"]["schemas"]
