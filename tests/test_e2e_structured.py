"""End to end: response_format json_object / json_schema always parse and match the schema."""

from __future__ import annotations

import json
import re

import openai
import pytest

from conftest import API_KEY

pytestmark = pytest.mark.e2e

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "colour": {"enum": ["red", "green", "blue"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string", "maxLength": 6}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "colour", "address", "tags", "ok"],
    "additionalProperties": False,
}
LIST = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}
CHOICE = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"], "additionalProperties": False}


def check_person(value) -> None:
    assert set(value) == set(PERSON["required"])
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool)
    assert value["colour"] in ("red", "green", "blue")
    assert set(value["address"]) == {"city", "zip"} and all(isinstance(v, str) for v in value["address"].values())
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3 and all(isinstance(t, str) and len(t) <= 6 for t in value["tags"])
    assert isinstance(value["ok"], bool)


def check_list(value) -> None:
    assert isinstance(value, list) and 2 <= len(value) <= 4 and all(isinstance(v, int) for v in value)


def check_choice(value) -> None:
    assert value in ({"answer": "yes"}, {"answer": "no"})


def fmt(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


def client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0)


@pytest.mark.parametrize("schema, check", [(PERSON, check_person), (LIST, check_list), (CHOICE, check_choice)])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_json_schema_output_validates(server, model_id, schema, check, temperature):
    out = await client(server).chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Reply in JSON."}],
        max_tokens=300,
        temperature=temperature,
        seed=5,
        response_format=fmt(schema),
    )
    text = out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop", text
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise AssertionError(f"not JSON: {text!r}") from exc
    check(value)


async def test_json_schema_streamed(server, model_id):
    stream = await client(server).chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Describe a person."}],
        max_tokens=300,
        temperature=0.7,
        seed=9,
        response_format=fmt(PERSON),
        stream=True,
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    check_person(json.loads(text))


async def test_json_object_parses(server, model_id):
    out = await client(server).completions.create(
        model=model_id, prompt="A small JSON object:", max_tokens=200, temperature=0, extra_body={"response_format": {"type": "json_object"}}
    )
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].text), dict)
    else:  # cut by max_tokens: still a valid JSON prefix that opens an object
        assert out.choices[0].text.lstrip().startswith("{")


@pytest.mark.parametrize(
    "response_format, param",
    [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
        (fmt({"type": "object", "not": {"required": ["a"]}}), "response_format.json_schema.schema"),
        (fmt({"type": "array", "uniqueItems": True}), "response_format.json_schema.schema"),
    ],
)
async def test_unsupported_formats_are_400(server, model_id, response_format, param):
    with pytest.raises(openai.BadRequestError) as info:
        await client(server).chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "x"}], max_tokens=5, response_format=response_format
        )
    assert info.value.body["param"] == param
    if "not" in json.dumps(response_format) or "uniqueItems" in json.dumps(response_format):
        assert "not" in info.value.body["message"] or "uniqueItems" in info.value.body["message"]


# -- the other ways to constrain an output (llguidance makes them cheap) -------------------------


async def _content(server, model_id, **fields) -> tuple[str, str]:
    out = await client(server).chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Answer."}], max_tokens=40, temperature=1.0, seed=3, **fields
    )
    return out.choices[0].message.content, out.choices[0].finish_reason


@pytest.mark.parametrize(
    "fields, check",
    [
        ({"response_format": {"type": "regex", "regex": "[A-Z][a-z]{2,8} [0-9]{2}"}}, lambda t: re.fullmatch("[A-Z][a-z]{2,8} [0-9]{2}", t)),
        ({"response_format": {"type": "grammar", "grammar": 'start: "It is " ("red" | "blue") "."'}}, lambda t: t in ("It is red.", "It is blue.")),
        ({"extra_body": {"grammar": 'root ::= "n=" [0-9] [0-9]?'}}, lambda t: re.fullmatch("n=[0-9]{1,2}", t)),  # llama-server's GBNF
        ({"extra_body": {"json_schema": CHOICE}}, lambda t: json.loads(t) in ({"answer": "yes"}, {"answer": "no"})),
        ({"extra_body": {"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}}}, lambda t: t in ("alpha", "beta", "gamma")),
        ({"extra_body": {"guided_regex": "(yes|no), [0-9]"}}, lambda t: re.fullmatch("(yes|no), [0-9]", t)),
        ({"extra_body": {"guided_json": LIST}}, lambda t: check_list(json.loads(t)) is None),
    ],
    ids=["regex", "lark", "gbnf", "json_schema-field", "vllm-choice", "vllm-regex", "vllm-json"],
)
async def test_every_way_to_constrain_the_output(server, model_id, fields, check):
    text, finish = await _content(server, model_id, **fields)
    assert finish == "stop" and check(text), text


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"response_format": {"type": "regex", "regex": "(unclosed"}}, "response_format.regex", "regex"),
        ({"response_format": {"type": "grammar", "grammar": "start: undefined_rule"}}, "response_format.grammar", "undefined_rule"),
        ({"extra_body": {"guided_json": {"type": "array", "contains": {"const": 1}}}}, "guided_json", '"contains"'),
    ],
)
async def test_what_llguidance_refuses_is_a_400_on_its_field(server, model_id, fields, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        await _content(server, model_id, **fields)
    assert info.value.body["param"] == param and words in info.value.body["message"], info.value.body


async def test_tool_schemas_are_strict_when_forced_and_lenient_when_merely_allowed(server, model_id):
    tool = {"type": "function", "function": {"name": "tag", "parameters": {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "uniqueItems": True, "maxItems": 3}}, "required": ["tags"]}}}
    c = client(server)
    with pytest.raises(openai.BadRequestError) as info:
        await c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Tag it."}], tools=[tool], tool_choice="required", max_tokens=40)
    assert info.value.body["param"] == "tools" and "uniqueItems" in info.value.body["message"]
    out = await c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Tag it."}], tools=[tool], max_tokens=40, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "tool_calls", "length")


async def test_ignore_eos_runs_to_max_tokens(server, model_id):
    out = await client(server).completions.create(model=model_id, prompt="The end.", max_tokens=48, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 48
