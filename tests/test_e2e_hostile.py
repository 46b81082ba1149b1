"""End to end: requests written as an attacker would (issue 9). Each one used to crash a
process, stall it, or answer 500; each must now be a clean 4xx (or harmless), and the
gateway and engine must still be serving afterwards.

The tests run their own gateway on the session's engine, so a regression that kills a
gateway shows here as this gateway's death, not as failures all over the suite."""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlparse

import aiohttp
import pytest

from conftest import API_KEY

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hostile(processes, server):
    """A gateway of its own on the shared engine: (its process, its URL)."""
    return processes.gateway([server.engine_endpoint], "--api-key", API_KEY)


async def post(http, url: str, path: str, body: dict) -> tuple[int, dict]:
    async with http.post(f"{url}/v1/{path}", json=body) as r:
        return r.status, await r.json(content_type=None)


async def assert_serving(http, hostile, server, model_id) -> None:
    """The gateway and the engine are alive and answer a real completion."""
    proc, url = hostile
    assert proc.popen.poll() is None, proc.tail()
    assert server.engine.popen.poll() is None, server.engine.tail()
    status, body = await post(http, url, "completions", {"model": model_id, "prompt": "Hello", "max_tokens": 2})
    assert status == 200, body


def refused(status: int, body: dict, param_prefix: str, status_wanted: int = 400) -> None:
    assert status == status_wanted, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and (err["param"] or "").startswith(param_prefix), err


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def chat(model_id: str, **extra) -> dict:
    return {"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}


# -- schemas that broke llama.cpp's grammar code ------------------------------------------------

_ENUM = {"type": "object", "properties": {"a": {"enum": [f"value-{i}" for i in range(5000)]}}, "required": ["a"]}
_REFS = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"$ref": f"#/$defs/d{i + 1}"}]} for i in range(40)} | {"d40": {"type": "string"}}
_TOOL_HUGE = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 10**9}}}

OLD_KILLERS = {
    # 20,000 nested groups overflowed llama.cpp's grammar parser (SIGSEGV, `demesne serve` down).
    "maxLength": {"response_format": json_schema({"type": "string", "maxLength": 20000})},
    "pattern": {"response_format": json_schema({"type": "string", "pattern": "^a{0,100000}$"})},
    "tool maxLength": {"tools": [{"type": "function", "function": {"name": "f", "parameters": _TOOL_HUGE}}], "tool_choice": "required"},
    # Each enum entry was a grammar stack advanced for every candidate token (4,096: 34 s a
    # token; 20,000 are past the 10,000 values a schema may hold).
    "enum of 5000": {"response_format": json_schema(_ENUM)},
    # anyOf [$ref, $ref] doubled the paths of llama.cpp's left-recursion check per level.
    "unions of refs": {"response_format": json_schema({"$defs": _REFS, "anyOf": [{"$ref": "#/$defs/d0"}]})},
    # A ']' or '}' that closes nothing: llama-cpp-python's converter looped forever on it.
    "stray closer": {"response_format": json_schema({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}}$"}}})},
}


@pytest.mark.parametrize("case", sorted(OLD_KILLERS))
async def test_schemas_that_broke_llama_cpps_grammar_code_are_served(hostile, server, http, model_id, case):
    """llguidance takes them in its stride: each is answered, and everything keeps serving."""
    status, body = await asyncio.wait_for(post(http, hostile[1], "chat/completions", chat(model_id, **OLD_KILLERS[case])), 120)
    assert status == 200, body
    await assert_serving(http, hostile, server, model_id)


async def test_deeply_nested_schema_is_a_400(hostile, server, http, model_id):
    """About 1,000 nested arrays: a RecursionError (500) before. Written by hand: no JSON
    encoder here nests that deep either."""
    schema = '{"type": "array", "items": ' * 1000 + '{"type": "integer"}' + "}" * 1000
    body = '{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}], "response_format": %s}'
    body %= (model_id, json.dumps(json_schema({})).replace("{}", schema))
    headers = {"Content-Type": "application/json"}
    async with http.post(f"{hostile[1]}/v1/chat/completions", data=body.encode(), headers=headers) as r:
        refused(r.status, await r.json(), "response_format")
    await assert_serving(http, hostile, server, model_id)


# -- 500s ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["²", "--5", "٣"])
async def test_logit_bias_keys_that_are_not_decimal_ids(hostile, server, http, model_id, key):
    refused(*await post(http, hostile[1], "chat/completions", chat(model_id, logit_bias={key: 1})), "logit_bias")


LISTS = {
    "tool_choice.function.name": {
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "function", "function": {"name": ["f"]}},
    },
    "messages[2].tool_call_id": {
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": ["a"], "content": "1"},
        ]
    },
    "messages[1].function_call.name": {
        "functions": [{"name": "f"}],
        "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "function_call": {"name": ["f"], "arguments": "{}"}}],
    },
}


@pytest.mark.parametrize("param", sorted(LISTS))
async def test_names_and_ids_given_as_lists(hostile, server, http, model_id, param):
    refused(*await post(http, hostile[1], "chat/completions", chat(model_id, **LISTS[param])), param)


async def test_100000_nested_brackets_in_call_arguments_pass_as_text(hostile, server, http, model_id):
    """A RecursionError parsing the history call's arguments (a 500) before: now JSON that
    nests that deep goes to the template as the text it is (100,000 brackets are then too
    many tokens for the context; 4,000 fit)."""

    def with_arguments(arguments: str) -> dict:
        messages = [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "a", "content": "1"},
        ]
        return chat(model_id, messages=messages, tools=[{"type": "function", "function": {"name": "f"}}])

    status, body = await post(http, hostile[1], "chat/completions", with_arguments("[" * 100_000))
    refused(status, body, "messages")
    assert body["error"]["code"] == "context_length_exceeded"
    status, body = await post(http, hostile[1], "chat/completions", with_arguments("[" * 4000))
    assert status == 200, body
    await assert_serving(http, hostile, server, model_id)


async def raw_request(url: str, head: bytes) -> bytes:
    """Send request bytes as they are (aiohttp will not send a header that is not UTF-8)."""
    where = urlparse(url)
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    writer.write(head)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return reply


async def test_an_api_key_that_is_not_utf8_is_a_401(hostile, server, http, model_id):
    """A UnicodeEncodeError (a 500 and a traceback per request) before."""
    for header in (b"Authorization: Bearer \xff\xfe\xfa", b"X-Api-Key: key-\xc3\x28"):
        reply = await raw_request(hostile[1], b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
        assert b'"invalid_api_key"' in reply
    assert "Traceback" not in hostile[0].tail()
    await assert_serving(http, hostile, server, model_id)


async def test_the_key_is_taken_as_x_api_key(hostile, server, model_id):
    url = hostile[1]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v1/models", headers={"X-Api-Key": API_KEY}) as r:
            assert r.status == 200
        async with session.get(f"{url}/v1/models", headers={"X-Api-Key": "wrong"}) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "invalid_api_key"
        async with session.get(f"{url}/v1/models", headers={"Authorization": "Basic abc", "X-Api-Key": API_KEY}) as r:
            assert r.status == 200
        async with session.get(f"{url}/v1/models") as r:
            assert r.status == 401


# -- a huge prompt must not freeze the event loop ----------------------------------------------


async def test_a_huge_prompt_does_not_freeze_the_gateway(hostile, server, http, model_id):
    """Tokenizing 7.8 MB took 7 s on the event loop, and every other stream froze meanwhile.
    Now it runs on a worker thread: the gateway answers while it is under way."""
    url = hostile[1]
    prompt = "word " * 1_560_000  # 7.8 MB
    big = asyncio.ensure_future(post(http, url, "completions", {"model": model_id, "prompt": prompt, "max_tokens": 1}))
    await asyncio.sleep(0.5)  # the body is sent and tokenizing has begun
    slowest = 0.0
    while not big.done():
        started = time.monotonic()
        async with http.get(f"{url}/health") as r:
            assert r.status == 200
        slowest = max(slowest, time.monotonic() - started)
        await asyncio.sleep(0.2)
    status, body = await big
    refused(status, body, "prompt")  # far longer than the context
    assert body["error"]["code"] == "context_length_exceeded"
    assert slowest < 2.0, f"/health took {slowest:.1f} s while the prompt was tokenized"
    await assert_serving(http, hostile, server, model_id)


# -- found by the fuzzer (tests/test_e2e_fuzz.py) --------------------------------------------


async def test_logprobs_under_a_grammar_are_numbers(hostile, server, http, model_id):
    """Alternatives the grammar forbids have logprob -inf, which reached clients as null
    (OpenAI's SDK and the document want a number): they are -9999.0, as OpenAI writes them."""
    schema = json_schema({"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]})
    status, body = await post(http, hostile[1], "completions", {"model": model_id, "prompt": "JSON:", "logprobs": 20, "max_tokens": 6, "response_format": schema})
    assert status == 200, body
    lp = body["choices"][0]["logprobs"]
    values = lp["token_logprobs"] + [v for top in lp["top_logprobs"] for v in top.values()]
    assert values and all(isinstance(v, float) for v in values), values
    assert -9999.0 in values  # the grammar forbade most of each position's top 20
    status, body = await post(http, hostile[1], "chat/completions", chat(model_id, max_tokens=6, logprobs=True, top_logprobs=20, response_format=schema))
    assert status == 200, body
    for entry in body["choices"][0]["logprobs"]["content"]:
        assert all(isinstance(e["logprob"], float) for e in [entry, *entry["top_logprobs"]]), entry
