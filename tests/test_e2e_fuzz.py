"""Property-based fuzzing from demesne's own OpenAPI document (issue 9).

schemathesis reads /openapi.json from the running server and generates requests for the
completion, model and token utility endpoints: valid ones (every field within the document's bounds) and
invalid ones (at least one field outside them). Every answer must be a documented status
with a body of the documented shape, never a 5xx; invalid requests must be refused; and
the engine must still be running at the end.

Bounded for the suite: a fixed number of examples per operation, derandomized (the same
cases every run; DEMESNE_FUZZ_RANDOM=1 draws new ones, DEMESNE_FUZZ_EXAMPLES=N sets how
many), and every generation capped at two tokens and two choices, since the document
allows up to 2**31-1 tokens and 16 choices.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import API_KEY

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("DEMESNE_FUZZ_EXAMPLES", "40"))
MAX_TOKENS = 2
MAX_CHOICES = 2
OPERATIONS = [
    ("/v1/chat/completions", "POST"),
    ("/v1/completions", "POST"),
    ("/v1/models", "GET"),
    ("/v1/models/{model}", "GET"),
    ("/tokenize", "POST"),
    ("/detokenize", "POST"),
    ("/apply-template", "POST"),
    ("/props", "GET"),
]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def document(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def bounded(case, model_id: str) -> None:
    """Keep a valid request cheap to answer: the real model (a random name is only ever a
    404), two tokens, at most two choices and two prompts."""
    body = case.body
    if not isinstance(body, dict):
        return
    body["model"] = model_id
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int):
            body[key] = min(body[key], MAX_TOKENS)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS
    if isinstance(body.get("n"), int):
        body["n"] = min(body["n"], MAX_CHOICES)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        body["prompt"] = prompt[:MAX_CHOICES]


def cheap_if_accepted(case) -> None:
    """An invalid request is left as generated; only a missing max_tokens is added (valid in
    itself), so that one the server wrongly accepts does not generate a whole context."""
    body = case.body
    if isinstance(body, dict) and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
@pytest.mark.parametrize("path, method", OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_fuzz(server, document, model_id, path, method, mode):
    operation = document[path][method]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    checks = CHECKS + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])

    @settings(
        max_examples=EXAMPLES if mode == GenerationMode.POSITIVE else EXAMPLES // 2,
        deadline=None,
        derandomize=not os.environ.get("DEMESNE_FUZZ_RANDOM"),
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case):
        if mode == GenerationMode.POSITIVE:
            bounded(case, model_id)
        else:
            cheap_if_accepted(case)
        case.call_and_validate(base_url=server.url, headers=headers, checks=checks, timeout=60)

    try:
        fuzz()
    except schemathesis.errors.InvalidSchema:  # an operation with nothing invalid to generate
        pytest.skip("no invalid requests to generate")
    assert server.engine.popen.poll() is None, server.engine.tail()
    assert server.gateway.popen.poll() is None, server.gateway.tail()
