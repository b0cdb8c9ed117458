"""schemathesis against the server's own OpenAPI schema, on a live uvicorn with a tiny model: valid and
invalid generated requests, none may get a 5xx, and responses must match the documented statuses and
content types. Bounded: a few examples per operation, max_tokens kept small."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, negative_data_rejection, status_code_conformance

from hemat.serve.app import ServeSettings
from test_serve import API_KEY, MODEL_NAME, LiveServer, build_checkpoint

MAX_TOKENS = 4


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    checkpoint = build_checkpoint(tmp_path_factory.mktemp("schema") / "model")
    with LiveServer(checkpoint, ServeSettings(served_model_name=MODEL_NAME, api_key=API_KEY)) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(live):
    document = httpx.get(f"{live.url}/openapi.json", headers=live.headers()).json()
    return schemathesis.openapi.from_dict(document)


OPERATIONS = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models/{model_id}"),
              ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics")]
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"]  # the others take no invalid input


def _bounded(body):
    """Generated requests may ask for the whole context n times over; a few tokens say as much."""
    if isinstance(body, dict):
        if body.get("max_tokens") is None or isinstance(body["max_tokens"], int) and body["max_tokens"] > MAX_TOKENS:
            body["max_tokens"] = MAX_TOKENS
        body.pop("max_completion_tokens", None)
        if isinstance(body.get("model"), str):
            body["model"] = MODEL_NAME  # otherwise almost every case stops at the 404 for an unknown model
    return body


# schemathesis' own pytest plugin (schema.parametrize) does not run under pytest 9, so the cases are drawn
# with its Hypothesis strategies directly.
@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_no_server_errors_and_documented_responses(live, api_schema, method, path, mode):
    operation = api_schema[path][method]
    checks = [not_a_server_error, status_code_conformance, content_type_conformance]
    if mode == GenerationMode.NEGATIVE:
        checks.append(negative_data_rejection)

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def run(case):
        if mode == GenerationMode.POSITIVE:
            case.body = _bounded(case.body)
        case.call_and_validate(base_url=live.url, headers=live.headers(), timeout=30, checks=checks)

    run()


def test_schema_lists_every_operation(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


def test_schema_documents_openai_errors(live):
    document = httpx.get(f"{live.url}/openapi.json", headers=live.headers()).json()
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert "422" not in chat["responses"] and {"400", "401", "404", "413", "429"} <= set(chat["responses"])
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "messages" in document["components"]["schemas"]["ChatCompletionRequest"]["properties"]
