"""Every message between gateway and engine: small typed structs, a type tag, orjson frames.

A gateway's DEALER socket connects to an engine's ROUTER socket. Each ZeroMQ message carries
one orjson-encoded frame: a dict whose ``"t"`` key names the message type. Both processes
import this module and nothing else defines the wire format.

Gateway -> engine: ``Ping`` (heartbeat; answered with ``Pong`` at once, even mid-step),
``Generate``, ``Abort``, ``GetVocab``.
Engine -> gateway: ``Pong`` (version, model info, counters, draining), ``Deltas`` (new tokens
for many requests at once, one frame per gateway per step), ``Error`` (a request the engine
refused or failed), ``Vocab`` (the model's vocabulary-only GGUF, asked for once per model by a
gateway that does not have it cached: gateways need no model file). An engine that is about to exit sends a closing ``Pong`` after its last
reply and waits for each gateway's ``Ping`` with ``bye``, so no reply dies with the connection.

Every frame is checked against the field types declared here before it becomes a message:
a frame from a buggy or hostile peer is a :class:`ProtocolError`, never an exception deep in
the engine. ``Ping`` and ``Pong`` are the handshake: they decode whatever fields a peer of
another version adds, so the versions can always be compared and refused with a clear
message; for the same reason a flag added to them with a default (``bye``, ``closing``) needs
no new version: a peer without it ignores it and the exchange degrades to what it was. The ranges of sampling parameters are checked by :func:`check_params` (the engine
calls it; the gateway has its own OpenAI-facing checks).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import orjson

PROTOCOL_VERSION = 4  # bump on any change of message shapes; peers of another version refuse

# Why a request stopped: "stop" (end-of-generation token or stop string), "length"
# (max_tokens or the context), "abort" (the gateway asked).
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"


@dataclass(slots=True)
class SamplingParams:
    """How to pick each token. temperature 0 means greedy (top_p/top_k/seed then unused)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    logprobs: int = -1  # -1: none; k >= 0: the chosen token's logprob and the top k
    min_p: float = 0.0  # drop tokens below min_p times the best token's probability
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token generated so far
    frequency_penalty: float = 0.0  # OpenAI: minus this times how often it was generated
    repetition_penalty: float = 1.0  # llama.cpp: recent tokens' logits divided (or multiplied) by it
    logit_bias: list[list[float]] | None = None  # [[token id, bias], ...]
    ignore_eos: bool = False  # never end the output with an end-of-generation token (benchmarks)
    # An llguidance grammar the output must follow (Lark with inline %json schemas, or the
    # JSON form of a schema): structured output and tool calls.
    grammar: str | None = None
    # Lazy: the grammar lets free text through until something in it opens the constrained
    # part (a tool call); the engine then masks nothing until the grammar first refuses a token.
    grammar_lazy: bool = False
    grammar_param: str = "grammar"  # the request field the grammar came from, named in errors

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        # A temperature this small is greedy in effect and would overflow the scaling.
        return self.temperature < 1e-5 or self.top_k == 1


# The limits both processes hold requests to (the gateway words them for OpenAI clients).
MAX_TEMPERATURE = 100.0
MAX_LOGPROBS = 20
MAX_PENALTY = 2.0
MIN_REPETITION_PENALTY = 0.01  # tinier ones make a repeated token's logit infinite
MAX_REPETITION_PENALTY = 10.0
MAX_BIAS = 100.0
MAX_GRAMMAR_BYTES = 1 << 20
# llguidance compiles recursively along chains of rules and of $refs (engine/constraints.py):
MAX_GRAMMAR_RULES = 5000  # Lark rule definitions in a grammar
MAX_GRAMMAR_REFS = 2000  # "$ref"s in its JSON schemas
MAX_PARAM_NAME = 100
MAX_VOCAB_BYTES = 64 << 20  # a vocabulary-only GGUF (Gemma's 262,144 tokens: 6.5 MB)
# The largest frame either side reads (ZeroMQ's MAXMSGSIZE): a Vocab in base64, or a prompt of
# a million tokens with a grammar.
MAX_FRAME_BYTES = 96 << 20
INT64 = 1 << 63


def check_params(params: SamplingParams, n_vocab: int) -> tuple[str, str] | None:
    """The first sampling parameter out of range, as (field, message); None when all are in."""
    p = params
    checks = (
        ("temperature", 0.0 <= p.temperature <= MAX_TEMPERATURE, f"must be in [0, {MAX_TEMPERATURE:g}]"),
        ("top_p", 0.0 < p.top_p <= 1.0, "must be in (0, 1]"),
        ("top_k", 0 <= p.top_k <= n_vocab, f"must be in [0, {n_vocab}] (the vocabulary size)"),
        ("seed", p.seed is None or -INT64 <= p.seed < INT64, "must fit in 64 bits"),
        ("logprobs", -1 <= p.logprobs <= MAX_LOGPROBS, f"must be in [-1, {MAX_LOGPROBS}]"),
        ("min_p", 0.0 <= p.min_p <= 1.0, "must be in [0, 1]"),
        ("presence_penalty", abs(p.presence_penalty) <= MAX_PENALTY, f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"),
        ("frequency_penalty", abs(p.frequency_penalty) <= MAX_PENALTY, f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"),
        ("repetition_penalty", MIN_REPETITION_PENALTY <= p.repetition_penalty <= MAX_REPETITION_PENALTY, f"must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}]"),
        ("logit_bias", _bias_ok(p.logit_bias, n_vocab), f"must map token ids in [0, {n_vocab}) to biases in [-100, 100]"),
        ("grammar", p.grammar is None or len(p.grammar) <= MAX_GRAMMAR_BYTES, "is too long"),
        ("grammar_param", len(p.grammar_param) <= MAX_PARAM_NAME, f"must be at most {MAX_PARAM_NAME} characters"),
    )
    for name, ok, message in checks:
        if not ok:
            return name, f"'{name}' {message}"
    return None


def _bias_ok(bias: list[list[float]] | None, n_vocab: int) -> bool:
    return all(
        len(pair) == 2 and float(pair[0]).is_integer() and 0 <= pair[0] < n_vocab and abs(pair[1]) <= MAX_BIAS
        for pair in bias or ()
    )


@dataclass(slots=True)
class ModelInfo:
    """What a gateway learns about an engine's model from its Pong."""

    id: str
    path: str
    n_ctx: int  # the most tokens one sequence may hold (prompt + output)
    n_vocab: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    fingerprint: str = ""  # the model's identity: engines claiming one id must agree on it
    vocab_digest: str = ""  # sha256 of its vocabulary-only GGUF (ask with GetVocab)
    vocab_bytes: int = 0


@dataclass(slots=True)
class Message:
    TAG: ClassVar[str] = ""
    HANDSHAKE: ClassVar[bool] = False  # decodes fields of other versions, to compare versions


@dataclass(slots=True)
class Ping(Message):
    TAG: ClassVar[str] = "ping"
    HANDSHAKE: ClassVar[bool] = True
    sent: float = 0.0  # sender's clock, echoed back for round-trip time
    version: int = PROTOCOL_VERSION
    bye: bool = False  # answers a closing Pong: every frame before it has been read


@dataclass(slots=True)
class Pong(Message):
    """Answered by the engine's I/O thread, so it comes even while a step runs."""

    TAG: ClassVar[str] = "pong"
    HANDSHAKE: ClassVar[bool] = True
    sent: float
    engine_id: str
    model: ModelInfo
    stats: dict[str, float]
    version: int = PROTOCOL_VERSION
    draining: bool = False  # shutting down: finishing what it has, taking nothing new
    step_seconds: float = 0.0  # how long the step now running has taken so far
    # The engine closes the connection next; every reply it sent came before this. It waits
    # (briefly) for a Ping with ``bye`` before closing: ZeroMQ may drop frames still in
    # flight when a connection closes.
    closing: bool = False


@dataclass(slots=True)
class Generate(Message):
    TAG: ClassVar[str] = "gen"
    rid: str
    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(slots=True)
class Abort(Message):
    TAG: ClassVar[str] = "abort"
    rid: str


@dataclass(slots=True)
class Delta:
    """New tokens of one request since the last Delta; ``finish`` set on the last one."""

    rid: str
    tokens: list[int]
    finish: str | None = None
    prompt_tokens: int = 0  # set on the first delta and the last
    cached_tokens: int = 0
    # Per token when asked for: [chosen logprob, [[token id, logprob], ...top k]].
    logprobs: list | None = None


@dataclass(slots=True)
class Deltas(Message):
    TAG: ClassVar[str] = "deltas"
    items: list[Delta]


@dataclass(slots=True)
class Error(Message):
    """The engine refused or failed a request; ``status`` is the HTTP status to report."""

    TAG: ClassVar[str] = "err"
    rid: str
    status: int
    message: str
    code: str | None = None
    param: str | None = None


@dataclass(slots=True)
class GetVocab(Message):
    """Ask for the vocabulary-only GGUF with this digest (ModelInfo.vocab_digest)."""

    TAG: ClassVar[str] = "getvocab"
    digest: str


@dataclass(slots=True)
class Vocab(Message):
    """The vocabulary-only GGUF, base64 (empty when the engine has none of that digest)."""

    TAG: ClassVar[str] = "vocab"
    digest: str
    data: str


_TYPES: dict[str, type[Message]] = {
    cls.TAG: cls for cls in (Ping, Pong, Generate, Abort, Deltas, Error, GetVocab, Vocab)
}


class ProtocolError(ValueError):
    """A frame that is not a well-formed message."""


def encode(msg: Message) -> bytes:
    body = {name: getattr(msg, name) for name in _fields(type(msg))}  # (the fields, once per class)
    body["t"] = msg.TAG
    return orjson.dumps(body)  # nested dataclasses serialise natively


def decode(frame: bytes) -> Message:
    try:
        body = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"bad frame: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("bad frame: not an object")
    cls = _TYPES.get(body.pop("t", None)) if isinstance(body.get("t"), str) else None
    if cls is None:
        raise ProtocolError(f"bad frame: unknown message type {body.get('t')!r}")
    if cls.HANDSHAKE:
        body.setdefault("version", 1)  # the first protocol had no version field
    return _build(cls, body, "")


def request_id(frame: bytes) -> str | None:
    """The request a frame that did not decode names, if it names one (to answer it)."""
    try:
        rid = orjson.loads(frame).get("rid")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return rid if isinstance(rid, str) else None


# -- checking frames against the declared field types -----------------------------------------

# A check gets the value, then where it sits as a prefix and a name, joined only for the error
# (a frame comes per decoded token: its checks must cost little). Returns the value, rebuilt
# where it is a struct.
_Check = Callable[[Any, str, str], Any]


def _build(cls: type, body: Any, where: str) -> Any:
    if not isinstance(body, dict):
        raise ProtocolError(f"bad frame: {where or cls.__name__} must be an object")
    fields = _fields(cls)
    if not body.keys() <= fields.keys() and not getattr(cls, "HANDSHAKE", False):
        raise ProtocolError(f"bad frame: unknown fields {sorted(body.keys() - fields.keys())} in {cls.__name__}")
    values = {}
    for name, (check, required) in fields.items():
        if name in body:
            values[name] = check(body[name], where, name)
        elif required:
            raise ProtocolError(f"bad frame: {cls.__name__} needs '{name}'")
    return cls(**values)


_FIELDS: dict[type, dict[str, tuple[_Check, bool]]] = {}


def _fields(cls: type) -> dict[str, tuple[_Check, bool]]:
    if cls not in _FIELDS:
        hints = typing.get_type_hints(cls)
        _FIELDS[cls] = {
            f.name: (
                _checker(hints[f.name]),
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in dataclasses.fields(cls)
        }
    return _FIELDS[cls]


def _checker(hint: Any) -> _Check:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        options = [_checker(a) for a in args if a is not type(None)]
        nullable = type(None) in args

        def check_union(value, where, name):
            if value is None and nullable:
                return None
            return options[0](value, where, name)

        return check_union
    if origin is list:
        item = _checker(args[0]) if args else (lambda v, _w, _n: v)

        def check_list(value, where, name):
            if not isinstance(value, list):
                raise ProtocolError(f"bad frame: {where}{name} must be a list")
            if item is _int and all(type(v) is int for v in value):  # token ids: one pass in C
                return value
            return [item(v, where, name) for v in value]

        return check_list
    if origin is dict:
        return _scalar(dict, "an object")
    if hint is list:  # free-form (logprobs entries): only the engine sends these
        return _scalar(list, "a list")
    if dataclasses.is_dataclass(hint):
        return lambda value, where, name: _build(hint, value, f"{where}{name}.")
    return {int: _int, float: _float, str: _scalar(str, "a string"), bool: _scalar(bool, "a boolean")}[hint]


def _scalar(kind: type, what: str) -> _Check:
    def check(value, where, name):
        if not isinstance(value, kind):
            raise ProtocolError(f"bad frame: {where}{name} must be {what}")
        return value

    return check


def _int(value, where, name):
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"bad frame: {where}{name} must be an integer")
    return value


def _float(value, where, name):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ProtocolError(f"bad frame: {where}{name} must be a finite number")
    return float(value)
