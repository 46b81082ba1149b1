"""The OpenAPI document: served, and every documented request field accepted by the server."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest
from jsonschema import Draft202012Validator

from test_e2e_api import sse_events
from test_e2e_tools import WEATHER

pytestmark = pytest.mark.e2e

DOC = json.loads(files("demesne.gateway").joinpath("openapi.json").read_text())


async def fetch_doc(server, http) -> dict:
    async with http.get(f"{server.url}/openapi.json") as r:
        assert r.status == 200
        return await r.json()


def cases() -> list[tuple[str, str]]:
    out = []
    for schema, path in (("ChatCompletionRequest", "chat/completions"), ("CompletionRequest", "completions")):
        for field in DOC["components"]["schemas"][schema]["properties"]:
            out.append((path, field))
    return out


BASE = {
    "chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    "completions": {"prompt": "Hi", "max_tokens": 4},
}
TOOL = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
NEEDS = {
    "top_logprobs": {"logprobs": True},
    "stream_options": {"stream": True},
    "tool_choice": {"tools": TOOL},
    "function_call": {"functions": [TOOL[0]["function"]]},
}


async def test_document_is_served_and_lists_the_endpoints(server, http):
    doc = await fetch_doc(server, http)
    assert doc["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(doc["paths"])


@pytest.mark.parametrize("path, field", cases())
async def test_every_documented_field_is_accepted(server, http, model_id, path, field):
    doc = await fetch_doc(server, http)
    schema = doc["components"]["schemas"]["ChatCompletionRequest" if path.startswith("chat") else "CompletionRequest"]
    example = schema["properties"][field]["example"]
    body = {"model": model_id, **BASE[path], **NEEDS.get(field, {}), field: model_id if example == "$MODEL" else example}
    async with http.post(f"{server.v1}/{path}", json=body) as r:
        text = await r.text()
        assert r.status == 200, text
    if body.get("stream"):
        assert text.rstrip().endswith("data: [DONE]")


def validator(name: str):
    """A JSON-schema validator for one of the document's component schemas (OpenAPI 3.1's
    schemas are JSON Schema 2020-12; their $refs resolve inside the document)."""
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": DOC["components"]})


async def post(http, url: str, body: dict) -> tuple[dict | None, list[dict]]:
    """(the JSON body, or None) and (the SSE events, for a stream)."""
    async with http.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        if not body.get("stream"):
            return await r.json(), []
        return None, await sse_events(r)

RESPONSES = {
    "chat": ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "logprobs": True, "top_logprobs": 2, "n": 2}),
    "chat-tools": ("chat/completions", {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [WEATHER], "tool_choice": "required", "max_tokens": 40}),
    "chat-legacy": ("chat/completions", {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}, "max_tokens": 40}),
    "completion": ("completions", {"prompt": "1, 2, 3,", "max_tokens": 6, "logprobs": 3, "stop": [", 6"]}),
}


@pytest.mark.parametrize("case", sorted(RESPONSES))
@pytest.mark.parametrize("stream", [False, True])
async def test_responses_match_the_documented_schemas(server, http, model_id, case, stream):
    path, body = RESPONSES[case]
    body = {"model": model_id, "temperature": 0, **body}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    whole, events = await post(http, f"{server.v1}/{path}", body)
    if path == "completions":
        name = "Completion"
    else:
        name = "ChatCompletionChunk" if stream else "ChatCompletion"
    check = validator(name)
    for obj in events or [whole]:
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in check.iter_errors(obj)]
        assert not errors, (obj, errors)
    if case == "chat-tools":
        calls = whole["choices"][0]["message"]["tool_calls"] if whole else [d for e in events for c in e["choices"] for d in c["delta"].get("tool_calls", [])]
        assert calls  # the tool-call shapes were exercised


async def test_model_listing_matches_the_documented_schemas(server, http, model_id):
    async with http.get(f"{server.v1}/models") as r:
        listing = await r.json()
    async with http.get(f"{server.v1}/models/{model_id}") as r:
        card = await r.json()
    assert not list(validator("ModelList").iter_errors(listing))
    assert not list(validator("Model").iter_errors(card))
