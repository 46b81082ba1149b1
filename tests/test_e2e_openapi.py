"""The OpenAPI document: served, and every documented request field accepted by the server."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


async def fetch_doc(server, http) -> dict:
    async with http.get(f"{server.url}/openapi.json") as r:
        assert r.status == 200
        return await r.json()


def cases() -> list[tuple[str, str]]:
    import json
    from importlib.resources import files

    doc = json.loads(files("demesne.gateway").joinpath("openapi.json").read_text())
    out = []
    for schema, path in (("ChatCompletionRequest", "chat/completions"), ("CompletionRequest", "completions")):
        for field in doc["components"]["schemas"][schema]["properties"]:
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
