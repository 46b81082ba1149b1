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
    SamplingParams,
    decode,
    encode,
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
    assert back.sent == 1234.5
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
