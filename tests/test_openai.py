"""demesne.gateway.openai: request validation into CompletionRequest, the error shape, and the
response / stream-chunk shapes."""

import re
import time
import types

import numpy as np
import json

import pytest

from demesne.gateway.errors import ApiError, bad
from demesne.gateway.openai import (
    MAX_STOP_STRINGS,
    Shaper,
    parse_chat,
    parse_completion,
    usage,
)
from demesne.gateway.logprobs import completion_logprobs
from demesne.protocol import Generate, SamplingParams

MODEL = "gemma-3-270m-q4_k_m"


def chat(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **extra}


def completion(**extra) -> dict:
    return {"model": MODEL, "prompt": "Once upon a time", **extra}


def refused(parse, body, param, code=None) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body)
    err = info.value
    assert err.status == 400
    assert err.param == param, err.message
    if code is not None:
        assert err.code == code
    assert err.message
    return err


# --- valid requests ---------------------------------------------------------------------------


def test_parse_chat_minimal():
    req = parse_chat(chat())
    assert req.chat and req.model == MODEL
    assert req.messages == [{"role": "user", "content": "Hi"}]
    assert req.prompt is None
    assert req.max_tokens is None
    assert req.params == SamplingParams()  # temperature 1, top_p 1, no top-k, no seed
    assert req.stop == [] and not req.stream and not req.include_usage


def test_parse_chat_content_as_text_parts():
    body = chat(
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
            {"role": "user", "content": "Hi", "name": "ann"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "developer", "content": "Rule."},
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "42"}]},
        ]
    )
    req = parse_chat(body)
    assert req.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi", "name": "ann"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {}}}]},
        {"role": "system", "content": "Rule."},  # developer is the new name of system
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]


def test_parse_chat_sampling_and_options():
    req = parse_chat(
        chat(temperature=0, top_p=0.5, top_k=40, seed=7, max_tokens=16, stop="\n\n", stream=True, stream_options={"include_usage": True}, n=1, user="u1")
    )
    assert req.params == SamplingParams(temperature=0.0, top_p=0.5, top_k=40, seed=7)
    assert req.params.greedy
    assert req.max_tokens == 16 and req.stop == ["\n\n"] and req.stream and req.include_usage


def test_parse_chat_max_completion_tokens_wins():
    assert parse_chat(chat(max_completion_tokens=5, max_tokens=9)).max_tokens == 5
    assert parse_chat(chat(max_completion_tokens=None, max_tokens=9)).max_tokens == 9


def test_parse_chat_temperature_bounds_are_inclusive():
    assert parse_chat(chat(temperature=2)).params.temperature == 2.0
    assert parse_chat(chat(temperature=0.0)).params.temperature == 0.0
    assert parse_chat(chat(top_p=1)).params.top_p == 1.0


def test_parse_chat_stop_list_drops_empty_strings():
    assert parse_chat(chat(stop=["a", "", "b"])).stop == ["a", "b"]
    assert parse_chat(chat(stop=["1", "2", "3", "4"])).stop == ["1", "2", "3", "4"]


def test_parse_completion_prompt_as_string():
    req = parse_completion(completion())
    assert not req.chat and req.prompt == "Once upon a time" and req.messages is None


def test_parse_completion_prompt_as_token_ids():
    assert parse_completion(completion(prompt=[2, 818, 5279])).prompt == [2, 818, 5279]


@pytest.mark.parametrize("prompt, expected", [(["Once"], "Once"), ([[2, 818]], [2, 818])])
def test_parse_completion_prompt_as_a_batch_of_one(prompt, expected):
    assert parse_completion(completion(prompt=prompt)).prompt == expected


def test_parse_completion_prompt_batch():
    req = parse_completion(completion(prompt=["a", [2, 818], "b"], n=2))
    assert req.prompts == ["a", [2, 818], "b"] and req.prompt == "a" and req.n == 2
    refused(parse_completion, completion(prompt=["a"] * 33, n=2), "n")
    refused(parse_completion, completion(prompt=["a"] * 65), "prompt")


def test_parse_completion_logprobs():
    assert parse_completion(completion(logprobs=2)).params.logprobs == 2
    assert parse_completion(completion(logprobs=0)).params.logprobs == 0
    assert parse_completion(completion()).params.logprobs == -1


def test_parse_completion_shares_the_common_fields():
    req = parse_completion(completion(temperature=0.3, max_tokens=4, stop=["."], stream=True))
    assert req.params.temperature == pytest.approx(0.3) and req.max_tokens == 4 and req.stop == ["."] and req.stream


# --- refused requests: status 400 and the right param ----------------------------------------------


@pytest.mark.parametrize("body", [None, [], "hi", 3, [chat()]])
def test_body_not_an_object(body):
    refused(parse_chat, body, None, "invalid_type")
    refused(parse_completion, body, None, "invalid_type")


@pytest.mark.parametrize("messages", [None, [], "Hi", {"role": "user", "content": "Hi"}])
def test_missing_or_empty_messages(messages):
    body = chat()
    if messages is None:
        del body["messages"]
    else:
        body["messages"] = messages
    refused(parse_chat, body, "messages")


def test_missing_model():
    body = chat()
    del body["model"]
    refused(parse_chat, body, "model", "missing_required_parameter")
    refused(parse_chat, chat(model=""), "model")
    refused(parse_chat, chat(model=3), "model", "invalid_type")


@pytest.mark.parametrize("role", ["robot", None, "USER"])
def test_unknown_role(role):
    body = chat(messages=[{"role": "user", "content": "a"}, {"role": role, "content": "b"}])
    err = refused(parse_chat, body, "messages[1].role")
    assert "role" in err.message


def test_a_legacy_function_message_must_answer_a_function_call():
    body = chat(messages=[{"role": "user", "content": "a"}, {"role": "function", "name": "f", "content": "b"}])
    refused(parse_chat, body, "messages[1].tool_call_id")


def test_message_not_an_object():
    refused(parse_chat, chat(messages=["Hi"]), "messages[0]", "invalid_type")


def test_image_part_is_refused():
    content = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    refused(parse_chat, chat(messages=[{"role": "user", "content": content}]), "messages[0].content[1]", "unsupported_content")


@pytest.mark.parametrize("part", [{"type": "text"}, {"type": "text", "text": 5}, "plain", {"type": "video"}])
def test_malformed_content_part(part):
    refused(parse_chat, chat(messages=[{"role": "user", "content": [part]}]), "messages[0].content[0]", "invalid_type")


def test_null_content_is_only_for_assistant():
    refused(parse_chat, chat(messages=[{"role": "user", "content": None}]), "messages[0].content", "invalid_type")
    refused(parse_chat, chat(messages=[{"role": "user", "content": 12}]), "messages[0].content", "invalid_type")


@pytest.mark.parametrize(
    "field, value, code",
    [
        ("temperature", 2.5, "invalid_value"),
        ("temperature", -0.1, "invalid_value"),
        ("temperature", "0.5", "invalid_type"),
        ("temperature", True, "invalid_type"),
        ("top_p", 0, "invalid_value"),
        ("top_p", 1.01, "invalid_value"),
        ("top_k", -1, "invalid_value"),
        ("top_k", 2.5, "invalid_type"),
        ("max_tokens", -5, "invalid_value"),
        ("max_tokens", 0, "invalid_value"),
        ("max_tokens", "10", "invalid_type"),
        ("max_tokens", True, "invalid_type"),
        ("max_tokens", 10.0, "invalid_type"),
        ("max_completion_tokens", -1, "invalid_value"),
        ("seed", "7", "invalid_type"),
        ("n", 0, "invalid_value"),
        ("n", 17, "invalid_value"),
        ("n", 2.0, "invalid_type"),
        ("stream", "yes", "invalid_type"),
        ("user", 5, "invalid_type"),
    ],
)
def test_bad_field(field, value, code):
    refused(parse_chat, chat(**{field: value}), field, code)
    refused(parse_completion, completion(**{field: value}), field, code)


def test_too_many_stop_strings():
    assert MAX_STOP_STRINGS == 4
    refused(parse_chat, chat(stop=["a", "b", "c", "d", "e"]), "stop")
    refused(parse_completion, completion(stop=["a", "b", "c", "d", "e"]), "stop")


@pytest.mark.parametrize("stop", [5, ["a", 1], {"a": 1}, [None]])
def test_stop_of_wrong_type(stop):
    refused(parse_chat, chat(stop=stop), "stop", "invalid_type")


def test_stream_options_need_stream():
    refused(parse_chat, chat(stream_options={"include_usage": True}), "stream_options")
    refused(parse_chat, chat(stream=False, stream_options={"include_usage": True}), "stream_options")
    refused(parse_completion, completion(stream_options={"include_usage": True}), "stream_options")
    refused(parse_chat, chat(stream=True, stream_options="usage"), "stream_options", "invalid_type")


@pytest.mark.parametrize(
    "field, value",
    [("echo", True), ("suffix", "The end."), ("logprobs", 21), ("logprobs", -1), ("logprobs", True), ("logprobs", "2")],
)
def test_completion_only_fields(field, value):
    refused(parse_completion, completion(**{field: value}), field)


@pytest.mark.parametrize("prompt", [None, 5, [], [1, "a"], [1, True], ["a", 5], ["a", []], [[1, True]], {"text": "a"}])
def test_bad_prompt(prompt):
    body = completion(prompt=prompt)
    if prompt is None:
        del body["prompt"]
    refused(parse_completion, body, "prompt", "invalid_type")


def test_every_accepted_seed_is_usable_by_the_engine():
    from demesne.engine.core import Engine

    for seed in (-1, -(2**63), 2**63 - 1, 0):
        try:
            req = parse_chat(chat(seed=seed))
        except ApiError as exc:  # refusing it up front would be fine too
            assert exc.status == 400 and exc.param == "seed"
            continue
        gen = Generate("r", [1, 2], 4, req.params)
        engine = types.SimpleNamespace(_seed_rng=np.random.default_rng(0))
        rng = Engine._rng_for(engine, gen)  # what Engine.submit does with it
        assert isinstance(rng, np.random.Generator)


# --- the error shape --------------------------------------------------------------------------------


def test_api_error_body_shape():
    err = bad("'temperature' must be in [0.0, 2.0], got 2.5", "temperature")
    assert err.status == 400
    assert err.body() == {
        "error": {
            "message": "'temperature' must be in [0.0, 2.0], got 2.5",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": "invalid_value",
        }
    }


@pytest.mark.parametrize(
    "status, kind",
    [(400, "invalid_request_error"), (401, "invalid_request_error"), (404, "invalid_request_error"), (413, "invalid_request_error"), (429, "rate_limit_error"), (500, "server_error"), (503, "server_error")],
)
def test_api_error_type_by_status(status, kind):
    body = ApiError(status, "msg", None, "some_code").body()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == kind
    assert body["error"]["param"] is None and body["error"]["code"] == "some_code"


def test_api_error_is_an_exception_with_its_message():
    err = ApiError(404, "The model 'x' does not exist", "model", "model_not_found")
    assert str(err) == "The model 'x' does not exist"


# --- response shapes ---------------------------------------------------------------------------------

ENVELOPE = {"id", "object", "created", "model", "system_fingerprint"}


def test_usage_shape():
    assert usage(10, 5, 3) == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 3}}
    assert usage(1, 0)["prompt_tokens_details"] == {"cached_tokens": 0}


def test_chat_response_shape():
    before = int(time.time())
    shaper = Shaper(chat=True, model=MODEL, fingerprint="fp_1")
    body = shaper.response([shaper.choice(0, "Hello!", "stop")], usage(3, 2))
    assert ENVELOPE | {"choices", "usage"} == set(body)
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", body["id"])
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL and body["system_fingerprint"] == "fp_1"
    assert before <= body["created"] <= int(time.time())
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello!", "refusal": None}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert body["usage"]["total_tokens"] == 5


def test_completion_response_shape():
    shaper = Shaper(chat=False, model=MODEL, fingerprint="fp_1")
    body = shaper.response([shaper.choice(0, " there lived", "length")], usage(4, 2))
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", body["id"])
    assert body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": " there lived", "logprobs": None, "finish_reason": "length"}]


def test_ids_are_unique_per_request():
    ids = {Shaper(chat=True, model=MODEL, fingerprint="f").id for _ in range(50)}
    assert len(ids) == 50


def test_chat_stream_chunks():
    shaper = Shaper(chat=True, model=MODEL, fingerprint="fp")
    first = shaper.chunk(0, "", first=True)
    middle = shaper.chunk(0, "lo")
    last = shaper.chunk(0, None, "stop")
    for c in (first, middle, last):
        assert c["object"] == "chat.completion.chunk"
        assert c["id"] == shaper.id and c["id"].startswith("chatcmpl-")
        assert c["created"] == first["created"]
        assert "usage" not in c
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert middle["choices"][0]["delta"] == {"content": "lo"}  # role only in the first
    assert middle["choices"][0]["finish_reason"] is None
    assert last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] == "stop"


def test_completion_stream_chunks():
    shaper = Shaper(chat=False, model=MODEL, fingerprint="fp")
    c = shaper.chunk(0, " once")
    assert c["object"] == "text_completion" and c["id"].startswith("cmpl-")
    assert c["choices"] == [{"index": 0, "text": " once", "logprobs": None, "finish_reason": None}]
    end = shaper.chunk(0, None, "length")
    assert end["choices"][0]["text"] == "" and end["choices"][0]["finish_reason"] == "length"


def test_chunks_with_usage_requested_carry_null_usage_then_a_usage_chunk():
    for is_chat, obj in ((True, "chat.completion.chunk"), (False, "text_completion")):
        shaper = Shaper(chat=is_chat, model=MODEL, fingerprint="fp")
        assert shaper.chunk(0, "x", with_usage=True)["usage"] is None
        final = shaper.usage_chunk(usage(7, 3))
        assert final["object"] == obj and final["id"] == shaper.id
        assert final["choices"] == []
        assert final["usage"] == usage(7, 3)
        assert ENVELOPE | {"choices", "usage"} == set(final)


def test_explicit_id_and_created_are_kept():
    shaper = Shaper(chat=True, model=MODEL, fingerprint="fp", id="chatcmpl-fixed", created=1700000000)
    body = shaper.response([shaper.choice(0, "", "stop")], usage(1, 0))
    assert body["id"] == "chatcmpl-fixed" and body["created"] == 1700000000


def test_completion_logprobs_shape():
    texts = {5: " a", 9: " b", 11: "c"}
    entries = [[-0.5, [[5, -0.5], [9, -1.0]]], [-0.25, [[11, -0.25], [5, -2.0]]]]
    body = completion_logprobs([" a", "c"], entries, texts.get, offset=10)
    assert body == {
        "tokens": [" a", "c"],
        "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{" a": -0.5, " b": -1.0}, {"c": -0.25, " a": -2.0}],
        "text_offset": [10, 12],
    }
    shaper = Shaper(chat=False, model=MODEL, fingerprint="fp")
    assert shaper.response([shaper.choice(0, "x", "stop", body)], usage(1, 1))["choices"][0]["logprobs"] is body
    assert shaper.chunk(0, "x", logprobs=body)["choices"][0]["logprobs"] is body


def test_sampling_extensions_parse_into_params():
    req = parse_chat(chat(min_p=0.05, presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.1, logit_bias={"42": -100, "7": 3.5}))
    p = req.params
    assert (p.min_p, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.05, 0.5, -1.0, 1.1)
    assert p.logit_bias == [[42, -100.0], [7, 3.5]]
    assert parse_completion(completion()).params.logit_bias is None


@pytest.mark.parametrize(
    "field, value, code",
    [
        ("presence_penalty", 2.5, "invalid_value"),
        ("frequency_penalty", -3, "invalid_value"),
        ("repetition_penalty", 0, "invalid_value"),
        ("min_p", 1.5, "invalid_value"),
        ("logit_bias", {"5": 101}, "invalid_value"),
        ("logit_bias", {"five": 1}, "invalid_type"),
        ("logit_bias", {"5": "1"}, "invalid_type"),
        ("logit_bias", [1, 2], "invalid_type"),
    ],
)
def test_bad_sampling_extensions(field, value, code):
    refused(parse_chat, chat(**{field: value}), field, code)
    refused(parse_completion, completion(**{field: value}), field, code)


def test_chat_logprobs_and_top_logprobs():
    assert parse_chat(chat(logprobs=True, top_logprobs=20)).params.logprobs == 20
    assert parse_chat(chat(logprobs=True)).params.logprobs == 0
    assert parse_chat(chat()).params.logprobs == -1
    refused(parse_chat, chat(logprobs=True, top_logprobs=21), "top_logprobs")
    refused(parse_chat, chat(top_logprobs=3), "top_logprobs")


def test_response_format_becomes_a_grammar():
    assert parse_chat(chat(response_format={"type": "text"})).params.grammar is None
    any_object = json.loads(parse_chat(chat(response_format={"type": "json_object"})).params.grammar)
    assert any_object["grammars"][0]["json_schema"]["type"] == "object"
    assert any_object["grammars"][0]["json_schema"]["x-guidance"]["lenient"] is False  # never silently unenforced
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    spec = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    req = parse_completion(completion(response_format=spec))
    enforced = json.loads(req.params.grammar)["grammars"][0]["json_schema"]
    assert enforced["properties"]["a"] == {"type": "integer", "minimum": -(10**18 - 1), "maximum": 10**18 - 1}  # 18 digits
    assert enforced["required"] == ["a"]
    assert req.params.grammar_param == "response_format.json_schema.schema" and not req.params.grammar_lazy
    refused(parse_chat, chat(response_format={"type": "yaml"}), "response_format.type")
    # A keyword llguidance cannot enforce passes the gateway; the engine refuses it, naming it
    # (tests/test_constraints.py, tests/test_e2e_structured.py).
    nested_not = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}
    assert parse_chat(chat(response_format=schema_format(nested_not))).params.grammar


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"response_format": {"type": "regex", "regex": "[0-9]{3}"}}, "response_format.regex"),
        ({"response_format": {"type": "grammar", "grammar": 'start: "yes" | "no"'}}, "response_format.grammar"),
        ({"response_format": {"type": "grammar", "grammar": {"syntax": "gbnf", "definition": 'root ::= "yes" | "no"'}}}, "response_format.grammar"),
        ({"response_format": {"type": "json_object", "schema": {"type": "array"}}}, "response_format.schema"),  # llama-server
        ({"json_schema": {"type": "object"}}, "json_schema"),  # llama-server
        ({"grammar": 'root ::= "a"+'}, "grammar"),  # llama-server's GBNF
        ({"structured_outputs": {"choice": ["red", "green"]}}, "structured_outputs"),  # vLLM
        ({"structured_outputs": {"json": '{"type": "integer"}'}}, "structured_outputs"),
        ({"guided_regex": "a+"}, "guided_regex"),
        ({"guided_json": {"type": "integer"}}, "guided_json"),
        ({"guided_choice": ["x"]}, "guided_choice"),
        ({"guided_grammar": 'start: "a"'}, "guided_grammar"),
    ],
)
def test_every_structured_output_field_becomes_one_grammar(fields, param):
    import llguidance

    for parse, body in ((parse_chat, chat), (parse_completion, completion)):
        params = parse(body(**fields)).params
        assert params.grammar_param == param
        error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(params.grammar)
        assert not error, messages


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"guided_choice": "a"}, "guided_choice"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"response_format": {"type": "regex", "regex": ""}}, "response_format.regex"),
        ({"response_format": {"type": "grammar", "grammar": {"syntax": "ebnf", "definition": "x"}}}, "response_format.grammar"),
        ({"grammar": 'root ::= "a'}, "grammar"),  # GBNF the converter cannot read
        ({"grammar": "x" * (2**18 + 1)}, "grammar"),
        ({"grammar": "root ::= r0\n" + "\n".join(f'r{i} ::= "a" r{i + 1}' for i in range(1000))}, "grammar"),  # GBNF past 16 KiB
    ],
)
def test_bad_structured_output_fields_are_refused(fields, param):
    refused(parse_chat, chat(**fields), param)


# --- bounds on every input (issue 9) -----------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, code",
    [
        ("top_k", 2**63, "invalid_value"),
        ("top_k", 2**31, "invalid_value"),
        ("top_k", True, "invalid_type"),
        ("seed", 2**63, "invalid_value"),
        ("seed", -(2**63) - 1, "invalid_value"),
        ("seed", 10**4000, "invalid_value"),
        ("seed", False, "invalid_type"),
        ("max_tokens", 2**31, "invalid_value"),
        ("max_completion_tokens", 2**64, "invalid_value"),
        ("n", 10**30, "invalid_value"),
        ("temperature", 1e308, "invalid_value"),
        ("temperature", 10**400, "invalid_value"),  # too big for a float
        ("top_p", -1e308, "invalid_value"),
        ("min_p", 10**400, "invalid_value"),
        ("presence_penalty", 2.0001, "invalid_value"),
        ("frequency_penalty", -(10**400), "invalid_value"),
        ("repetition_penalty", 10.5, "invalid_value"),
        ("repetition_penalty", -1, "invalid_value"),
        ("repetition_penalty", 5e-324, "invalid_value"),  # made a repeated token's logit infinite
        ("repetition_penalty", 0.0099, "invalid_value"),
        ("repetition_penalty", True, "invalid_type"),
        ("logit_bias", {"5": 10**400}, "invalid_value"),
        ("logit_bias", {"5": True}, "invalid_type"),
    ],
)
def test_numbers_out_of_range(field, value, code):
    for parse, body in ((parse_chat, chat), (parse_completion, completion)):
        err = refused(parse, body(**{field: value}), field, code)
        assert len(err.message) < 200


def test_numbers_at_their_bounds_are_taken():
    req = parse_chat(chat(top_k=2**31 - 1, seed=2**63 - 1, max_tokens=2**31 - 1, n=16, temperature=2, repetition_penalty=10))
    assert (req.params.top_k, req.params.seed, req.max_tokens, req.n) == (2**31 - 1, 2**63 - 1, 2**31 - 1, 16)
    assert parse_chat(chat(seed=-(2**63))).params.seed == -(2**63)
    assert parse_chat(chat(logit_bias={"0": -100, "262143": 100})).params.logit_bias == [[0, -100.0], [262143, 100.0]]


@pytest.mark.parametrize("key", ["²", "--5", "٣", " 5", "5 ", "+5", "0x5", "1" * 11, "", "5.0"])
def test_logit_bias_keys_are_decimal_token_ids(key):
    """int() takes unicode digits and spaces; "²" passed isdigit() and then failed int()."""
    refused(parse_chat, chat(logit_bias={key: 1}), "logit_bias", "invalid_type")


def test_stop_strings_are_bounded():
    assert parse_chat(chat(stop="x" * 1024)).stop == ["x" * 1024]
    refused(parse_chat, chat(stop="x" * 1025), "stop")
    refused(parse_completion, completion(stop=["a", "y" * 5000]), "stop")


def schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


SCHEMA = "response_format.json_schema.schema"


def deep(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(
    "schema",
    [
        deep(70),
        deep(600),  # a RecursionError (500) before
        {"type": "object", "properties": {f"p{i}": {"enum": list(range(100))} for i in range(120)}},  # 12,000 values
        {"$defs": {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(2001)}, "$ref": "#/$defs/d0"},  # a chain of $refs
        {"type": "string", "pattern": "^" + "a" * 2000 + "$"},
    ],
)
def test_schemas_too_big_to_compile_safely(schema):
    err = refused(parse_chat, chat(response_format=schema_format(schema)), SCHEMA)
    assert err.code == "schema_too_complex"


def test_schemas_the_old_converter_refused_are_enforced():
    """Sizes that llama.cpp's converter and grammar sampler could not take (stack overflows,
    30 s a token) are cheap for llguidance: the gateway passes them to the engine."""
    tree = {  # a recursive schema
        "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "type": "object",
        "properties": {"root": {"$ref": "#/$defs/node"}},
    }
    for schema in (
        {"type": "string", "maxLength": 20000},
        {"type": "string", "pattern": "^a{0,100000}$"},
        {"enum": [f"v{i}" for i in range(5000)]},
        {"anyOf": [{"const": i} for i in range(600)]},
        {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(300)}},
        deep(60),
        {"type": "object", "properties": {"x": {"const": {"not": 1, "if": [[[[1]]]]}}}},  # data, not keywords
        tree,
    ):
        assert parse_chat(chat(response_format=schema_format(schema))).params.grammar


def test_tool_parameter_schemas_are_bounded():
    def tools(params):
        return [{"type": "function", "function": {"name": "f", "parameters": params}}]

    deep_params = {"type": "object", "properties": {"a": deep(100)}}
    err = refused(parse_chat, chat(tools=tools(deep_params)), "tools[0].function.parameters")
    assert err.code == "schema_too_complex"
    refused(parse_chat, chat(functions=[{"name": "f", "parameters": deep_params}]), "functions[0].function.parameters")


@pytest.mark.parametrize(
    "messages, param",
    [
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "function_call": {"name": ["f"], "arguments": "{}"}}],
            "messages[1].function_call.name",
        ),
        ([{"role": "user", "content": "x"}, {"role": "function", "name": {"a": 1}, "content": "1"}], "messages[1].name"),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": ["a"], "content": "1"},
            ],
            "messages[2].tool_call_id",
        ),
    ],
)
def test_names_and_ids_given_as_lists(messages, param):
    """Each was a TypeError (unhashable list) and a 500."""
    refused(parse_chat, chat(messages=messages, functions=[{"name": "f"}]), param)


@pytest.mark.parametrize("pattern", ["^a\\}$", "^[}]$", "^[\\]}]$", "^a{2}$", "^[a-z]{1,3}(x|y)$", "^a}$", "^(a|b)]$"])
def test_patterns_go_to_the_engine_as_written(pattern):
    """(A stray '}' made llama-cpp-python's converter loop forever; llguidance's regex
    parser reads or refuses any pattern.)"""
    grammar = json.loads(parse_chat(chat(response_format=schema_format({"type": "string", "pattern": pattern}))).params.grammar)
    assert grammar["grammars"][0]["json_schema"]["pattern"] == pattern


def test_impossible_tokens_have_a_number_for_a_logprob():
    """The engine's frame carries -inf as null (JSON has no -inf): a grammar-forbidden
    alternative went out as null, which OpenAI clients and the document refuse (found by
    fuzzing). It is -9999.0, as OpenAI writes it."""
    from demesne.gateway.logprobs import chat_logprobs

    got = completion_logprobs(["a"], [[None, [[5, -0.1], [6, None]]]], lambda i: f"t{i}", 0)
    assert got["token_logprobs"] == [-9999.0] and got["top_logprobs"] == [{"t5": -0.1, "t6": -9999.0}]
    got = chat_logprobs([b"a"], [[-0.5, [[6, None]]]], lambda i: b"x")
    assert got["content"][0]["logprob"] == -0.5 and got["content"][0]["top_logprobs"][0]["logprob"] == -9999.0
