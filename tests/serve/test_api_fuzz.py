"""Schema-driven fuzzing of the API with schemathesis: no request may cause a 5xx.

Schemathesis reads the server's own OpenAPI document and sends both valid and deliberately
invalid requests (wrong types, missing fields, out-of-range numbers, odd strings) to every
operation, authenticated and not. The run is bounded: a fixed number of examples per
operation, a tiny model, and small per-request limits so a valid request finishes quickly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from finqlora.serve.batching import BatchLimits
from finqlora.serve.server import ServingEngine, create_app

API_KEY = "fuzz-key-0123456789"
EXAMPLES_PER_OPERATION = int(os.environ.get("FINQLORA_FUZZ_EXAMPLES", "60"))
# Reproducible in CI; set FINQLORA_FUZZ_RANDOM=1 to explore new inputs on every run.
DERANDOMIZE = os.environ.get("FINQLORA_FUZZ_RANDOM", "0") != "1"


@pytest.fixture(scope="module")
def fuzz_app(tiny_model_dir: Path):
    limits = BatchLimits(max_batch_size=4, max_queue=16, max_prompt_tokens=512, max_new_tokens=8, default_max_new_tokens=4, request_timeout_s=30)
    engine = ServingEngine.load(str(tiny_model_dir), limits=limits, device="cpu")
    # Schemathesis calls the app in-process as Starlette's test client does, as host "testserver".
    app = create_app(engine, api_key=API_KEY, shutdown_engine=False, allowed_hosts=["testserver"])
    yield app
    engine.shutdown()


@pytest.fixture(scope="module")
def operations(fuzz_app) -> list:
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    found = [result.ok() for result in schema.get_all_operations()]
    paths = {(op.method.upper(), op.path) for op in found}
    assert {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/health")} <= paths
    return found


def check_no_server_error(case, headers: dict[str, str] | None):
    response = case.call(headers=headers)
    case.validate_response(response, checks=[not_a_server_error])
    assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text}"
    if response.status_code >= 400:
        error = response.json()["error"]  # every refusal has an OpenAI-style body
        assert error["message"] and error["type"]
    return response


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_causes_a_server_error(operations, mode: GenerationMode) -> None:
    """Authenticated, so generated bodies reach validation and generation, not just the 401."""
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # the GET operations take no parameters, or a free string: nothing can be invalid

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=DERANDOMIZE, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode), served_model=st.booleans())
        def fuzz(case, served_model: bool) -> None:
            # A random `model` is (rightly) a 404 and most random max_tokens exceed the limit
            # (a 400); often make them acceptable so that generation itself is fuzzed too.
            if served_model and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                case.body["model"] = "base"
                for field in ("max_tokens", "max_completion_tokens"):
                    if isinstance(case.body.get(field), int) and case.body[field] >= 1:
                        case.body[field] = 1 + case.body[field] % 8
            response = check_no_server_error(case, {"Authorization": f"Bearer {API_KEY}"})
            statuses.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

        fuzz()
    # The fuzz really reached the model (valid requests answered) and the validation (4xx).
    if mode is GenerationMode.POSITIVE:
        assert 200 in statuses["POST /v1/chat/completions"] and 200 in statuses["POST /v1/completions"], statuses
    else:
        assert 400 in statuses["POST /v1/chat/completions"] and 400 in statuses["POST /v1/completions"], statuses


def test_unauthenticated_requests_are_refused_cleanly(operations) -> None:
    for operation in operations:

        @settings(max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case) -> None:
            response = check_no_server_error(case, None)
            if case.path.startswith("/v1/"):
                assert response.status_code == 401

        fuzz()
