"""demesne.protocol: every message survives encode -> decode, and bad frames are refused."""

import orjson
import pytest

from demesne.protocol import (
    Abort,
    Delta,
    Deltas,
    Error,
    Generate,
    ModelInfo,
    Ping,
    Pong,
    ProtocolError,
    PROTOCOL_VERSION,
    SamplingParams,
    check_params,
    decode,
    GetVocab,
    Vocab,
    encode,
    request_id,
)

MODEL = ModelInfo(
    id="gemma-3-270m",
    path="/models/gemma-3-270m-q4_k_m.gguf",
    n_ctx=16384,
    n_vocab=262144,
    chat_template="{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
    bos_token="<bos>",
    eos_token="<eos>",
)


def roundtrip(msg):
    frame = encode(msg)
    assert isinstance(frame, bytes)
    back = decode(frame)
    assert type(back) is type(msg)
    assert back == msg
    return back


# --- round trips ---------------------------------------------------------------------------


def test_frame_is_an_orjson_object_with_the_type_tag():
    body = orjson.loads(encode(Abort(rid="r-1")))
    assert body == {"t": "abort", "rid": "r-1"}


def test_ping_roundtrip():
    back = roundtrip(Ping(sent=1234.5))
    assert back.sent == 1234.5 and back.version == PROTOCOL_VERSION
    assert roundtrip(Ping()).sent == 0.0


def test_pong_roundtrip_rebuilds_model_info():
    stats = {"requests_running": 3, "decode_seconds_total": 1.25, "kv_cells_used": 0}
    back = roundtrip(Pong(sent=99.5, engine_id="engine-0", model=MODEL, stats=stats))
    assert isinstance(back.model, ModelInfo)
    assert back.model.n_vocab == 262144
    assert back.model.chat_template == MODEL.chat_template
    assert back.stats == stats


def test_pong_roundtrip_without_chat_template():
    model = ModelInfo("m", "/m.gguf", 256, 10, None, "<s>", "</s>")
    back = roundtrip(Pong(sent=0.0, engine_id="e", model=model, stats={}))
    assert back.model.chat_template is None


def test_generate_roundtrip_rebuilds_sampling_params():
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=1234567890123, logprobs=3)
    back = roundtrip(Generate(rid="req-1", prompt=[2, 105, 2364, 107], max_tokens=64, params=params))
    assert isinstance(back.params, SamplingParams)
    assert back.params.seed == 1234567890123
    assert back.params.top_k == 40
    assert back.params.logprobs == 3
    assert back.prompt == [2, 105, 2364, 107]


def test_generate_roundtrip_with_default_params():
    back = roundtrip(Generate(rid="r", prompt=[1], max_tokens=1))
    assert back.params == SamplingParams()
    assert back.params.seed is None


def test_generate_greedy_params_stay_greedy():
    back = roundtrip(Generate(rid="r", prompt=[1], max_tokens=1, params=SamplingParams(temperature=0.0)))
    assert back.params.greedy


def test_abort_roundtrip():
    assert roundtrip(Abort(rid="req-7")).rid == "req-7"
    assert roundtrip(GetVocab(digest="ab" * 32)).digest == "ab" * 32
    assert roundtrip(Vocab(digest="ab" * 32, data="R0dVRg==")).data == "R0dVRg=="


def test_deltas_roundtrip_rebuilds_every_delta():
    items = [
        Delta(rid="a", tokens=[10, 11, 12], prompt_tokens=5),
        Delta(rid="b", tokens=[], finish="stop", prompt_tokens=7, cached_tokens=4),
        Delta(rid="c", tokens=[262143], finish="length", prompt_tokens=1),
        Delta(rid="d", tokens=[3], logprobs=[[-0.25, [[3, -0.25], [9, -1.5]]]]),
    ]
    back = roundtrip(Deltas(items=items))
    assert len(back.items) == 4
    assert all(isinstance(d, Delta) for d in back.items)
    assert [d.rid for d in back.items] == ["a", "b", "c", "d"]
    assert back.items[1].finish == "stop" and back.items[1].cached_tokens == 4
    assert back.items[0].finish is None
    assert back.items[3].logprobs == [[-0.25, [[3, -0.25], [9, -1.5]]]]


def test_empty_deltas_roundtrip():
    assert roundtrip(Deltas(items=[])).items == []


def test_error_roundtrip():
    back = roundtrip(Error(rid="r", status=400, message="the prompt is empty", code="empty_prompt", param="prompt"))
    assert (back.status, back.code, back.param) == (400, "empty_prompt", "prompt")
    back = roundtrip(Error(rid="r", status=429, message="queue full"))
    assert back.code is None and back.param is None


def test_unicode_survives():
    back = roundtrip(Error(rid="日本", status=400, message="naïve 🙂"))
    assert back.message == "naïve 🙂"


def test_every_tag_is_distinct():
    tags = [cls.TAG for cls in (Ping, Pong, Generate, Abort, Deltas, Error)]
    assert len(set(tags)) == len(tags) and all(tags)


# --- bad frames ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x00\xff\xfe garbage",
        b"{not json",
        b'{"t": "abort", "rid": "r"',  # truncated
        b"\xc3\x28",  # invalid UTF-8
    ],
)
def test_garbage_bytes_are_a_protocol_error(frame):
    with pytest.raises(ProtocolError):
        decode(frame)


@pytest.mark.parametrize("frame", [b"[1, 2]", b'"abort"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object_is_a_protocol_error(frame):
    with pytest.raises(ProtocolError):
        decode(frame)


def test_unknown_tag_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        decode(b'{"t": "launch_missiles", "rid": "r"}')


def test_missing_tag_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        decode(b'{"rid": "r"}')


def test_unhashable_tag_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        decode(b'{"t": ["abort"], "rid": "r"}')


@pytest.mark.parametrize(
    "body",
    [
        {"t": "abort"},
        {"t": "gen", "rid": "r", "prompt": [1]},  # max_tokens missing
        {"t": "err", "rid": "r", "status": 500},  # message missing
        {"t": "deltas"},
        {"t": "pong", "sent": 0.0, "engine_id": "e", "stats": {}},  # model missing
    ],
)
def test_missing_fields_are_a_protocol_error(body):
    with pytest.raises(ProtocolError):
        decode(orjson.dumps(body))


def test_unknown_field_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        decode(b'{"t": "abort", "rid": "r", "bogus": 1}')


def test_missing_field_inside_a_nested_struct_is_a_protocol_error():
    model = {k: v for k, v in orjson.loads(orjson.dumps(MODEL)).items() if k != "n_vocab"}
    frame = orjson.dumps({"t": "pong", "sent": 0.0, "engine_id": "e", "model": model, "stats": {}})
    with pytest.raises(ProtocolError):
        decode(frame)
    with pytest.raises(ProtocolError):
        decode(orjson.dumps({"t": "deltas", "items": [{"tokens": [1]}]}))  # rid missing


@pytest.mark.parametrize(
    "body",
    [
        {"t": "gen", "rid": "r", "prompt": [1], "max_tokens": 1, "params": "greedy"},
        {"t": "gen", "rid": "r", "prompt": [1], "max_tokens": 1, "params": None},
        {"t": "deltas", "items": [1, 2]},
        {"t": "deltas", "items": None},
        {"t": "gen", "rid": "r", "prompt": [1], "max_tokens": 1, "params": {"temperature": 1, "nucleus": 0.5}},
    ],
)
def test_malformed_nested_struct_is_a_protocol_error(body):
    with pytest.raises(ProtocolError):
        decode(orjson.dumps(body))


def test_protocol_error_is_a_value_error():
    assert issubclass(ProtocolError, ValueError)


# --- every field checked: frames from a buggy or hostile peer ---------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"t": "abort", "rid": [1]},  # once killed the engine
        {"t": "abort", "rid": None},
        {"t": "gen", "rid": "r", "prompt": "hello", "max_tokens": 1},
        {"t": "gen", "rid": "r", "prompt": [1, "2"], "max_tokens": 1},
        {"t": "gen", "rid": "r", "prompt": [1], "max_tokens": 1.5},
        {"t": "gen", "rid": "r", "prompt": [1], "max_tokens": True},
        {"t": "gen", "rid": "r", "prompt": [1], "max_tokens": 1, "params": {"top_k": "40"}},
        {"t": "gen", "rid": "r", "prompt": [1], "max_tokens": 1, "params": {"seed": 1.5}},
        {"t": "gen", "rid": "r", "prompt": [1], "max_tokens": 1, "params": {"logit_bias": [[1, "x"]]}},
        {"t": "gen", "rid": "r", "prompt": [1], "max_tokens": 1, "params": {"grammar_lazy": "x"}},
        {"t": "deltas", "items": [{"rid": "a", "tokens": [1.5]}]},
        {"t": "err", "rid": "r", "status": "500", "message": "m"},
        {"t": "ping", "sent": "now"},
    ],
)
def test_a_field_of_the_wrong_type_is_a_protocol_error(body):
    with pytest.raises(ProtocolError):
        decode(orjson.dumps(body))


def test_a_bad_frame_that_names_a_request_can_be_answered():
    assert request_id(b'{"t": "gen", "rid": "abc", "prompt": "x"}') == "abc"
    assert request_id(b'{"t": "abort", "rid": [1]}') is None
    assert request_id(b"garbage") is None and request_id(b"[1]") is None


def test_handshake_messages_tolerate_another_versions_fields():
    frame = orjson.dumps({"t": "ping", "sent": 1.0, "version": 7, "shiny": True})
    assert decode(frame).version == 7
    assert decode(b'{"t": "ping", "sent": 1.0}').version == 1  # the first protocol had none


def test_huge_integers_reach_the_range_checks_not_numpy():
    frame = orjson.dumps({"t": "gen", "rid": "r", "prompt": [1], "max_tokens": 1, "params": {"top_k": 2**63}})
    params = decode(frame).params
    assert check_params(params, 262144)[0] == "top_k"


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1), ("temperature", 1e308), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
        ("top_k", 262145), ("seed", 2**64), ("seed", -(2**63) - 1), ("logprobs", 21), ("logprobs", -2),
        ("min_p", 1.5), ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0), ("repetition_penalty", 5e-324),
        ("repetition_penalty", 11.0), ("logit_bias", [[262144, 1.0]]), ("logit_bias", [[5, 101.0]]),
        ("logit_bias", [[1.5, 1.0]]), ("grammar", "x" * (2**20 + 1)), ("grammar_param", "x" * 101),
    ],
)
def test_out_of_range_parameters_are_named(field, value):
    params = SamplingParams(**{field: value})
    assert check_params(params, 262144)[0] == field


def test_parameters_in_range_pass():
    assert check_params(SamplingParams(), 262144) is None
    edge = SamplingParams(temperature=100.0, top_p=1.0, top_k=262144, seed=-(2**63), logprobs=20, min_p=1.0,
                          presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=10.0, logit_bias=[[0, -100.0]])
    assert check_params(edge, 262144) is None
