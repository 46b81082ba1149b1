"""Every message between gateway and engine: small typed structs, a type tag, orjson frames.

A gateway's DEALER socket connects to an engine's ROUTER socket. Each ZeroMQ message carries
one orjson-encoded frame: a dict whose ``"t"`` key names the message type. Both processes
import this module and nothing else defines the wire format.

Gateway -> engine: ``Ping`` (heartbeat; answered with ``Pong``), ``Generate``, ``Abort``.
Engine -> gateway: ``Pong`` (model info and counters), ``Deltas`` (new tokens for many
requests at once, one frame per gateway per step), ``Error`` (a request the engine refused).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

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
    grammar: str | None = None  # GBNF the output must follow (structured output)
    # Lazy grammar: regexes over the whole output so far; the grammar applies from the first
    # group of the first one that matches (llama.cpp's grammar_lazy).
    grammar_triggers: list[str] | None = None
    grammar_trigger_tokens: list[int] | None = None  # ...or once one of these tokens is sampled

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        # A temperature this small is greedy in effect and would overflow the scaling.
        return self.temperature < 1e-5 or self.top_k == 1


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


@dataclass(slots=True)
class Message:
    TAG: ClassVar[str] = ""


@dataclass(slots=True)
class Ping(Message):
    TAG: ClassVar[str] = "ping"
    sent: float = 0.0  # sender's clock, echoed back for round-trip time


@dataclass(slots=True)
class Pong(Message):
    TAG: ClassVar[str] = "pong"
    sent: float
    engine_id: str
    model: ModelInfo
    stats: dict[str, float]


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


_TYPES: dict[str, type[Message]] = {
    cls.TAG: cls for cls in (Ping, Pong, Generate, Abort, Deltas, Error)
}
# Nested structs rebuilt on decode: (message type, field name) -> struct type, and whether
# the field holds a list of them.
_NESTED: dict[tuple[str, str], tuple[type, bool]] = {
    ("pong", "model"): (ModelInfo, False),
    ("gen", "params"): (SamplingParams, False),
    ("deltas", "items"): (Delta, True),
}


class ProtocolError(ValueError):
    """A frame that is not a well-formed message."""


def encode(msg: Message) -> bytes:
    body = _as_dict(msg)
    body["t"] = msg.TAG
    return orjson.dumps(body)


def _as_dict(msg: Message) -> dict[str, Any]:
    # orjson serialises nested dataclasses natively; only the top level needs the tag.
    return {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}


def decode(frame: bytes) -> Message:
    try:
        body = orjson.loads(frame)
        tag = body.pop("t")
        cls = _TYPES[tag]
        for name, value in body.items():
            nested = _NESTED.get((tag, name))
            if nested is not None:
                struct, many = nested
                body[name] = [struct(**v) for v in value] if many else struct(**value)
        return cls(**body)
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ProtocolError(f"bad frame: {exc}") from exc
