"""How each model family writes a tool call, which family a chat template belongs to, and
the grammar that makes a call impossible to get wrong.

Every format is a *run* of calls between markers. A call is a JSON object
``{"name": ..., "arguments": {...}}`` (the arguments key differs by family), or, in Mistral's
newer tokenizers, the name and then the arguments object after ``[ARGS]``:

=========  ==========================================================  ======================
format     what the model writes                                       families
=========  ==========================================================  ======================
hermes     ``<tool_call>{...}</tool_call>`` (one per call)              Qwen 2.5 / 3, QwQ,
                                                                       Hermes 2 Pro / 3
llama3     ``{"name": .., "parameters": {..}}`` as the whole reply,    Llama 3.1, 3.2, 3.3
           or after ``<|python_tag|>``; calls joined by ``;``
mistral    ``[TOOL_CALLS][{...}, {...}]``                               Mistral 7B v0.3,
                                                                       Mixtral 8x22B, Nemo,
                                                                       Small 3.1
mistral-   ``[TOOL_CALLS]name[ARGS]{...}`` (one marker per call)        Mistral Small 3.2,
v11                                                                    Devstral, Magistral
generic    ``{"tool_calls": [{...}, ...]}``                             anything else: base
                                                                       models (the bundled
                                                                       Gemma), templates
                                                                       without tools
=========  ==========================================================  ======================

:func:`detect` picks the format from the template's text; ``--tool-format`` overrides it.
A format's markers are literal *parts* with optional whitespace between them; the
streaming parser (:mod:`.tool_parser`) and the grammar are both built from them, so what
is forced is what is parsed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from .schemas import JSON_WS, enforced, lark_literal

Parts = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Opener:
    """Parts that begin a run of calls; ``start_only``: only at the start of the reply."""

    parts: Parts
    start_only: bool = False
    # How many leading units (opener parts, then the call's head '{', '"name"', ...) output must
    # hold before a lazy grammar takes over: a bare '{' is too common to constrain on.
    trigger_units: int = 1


@dataclass(frozen=True, slots=True)
class ToolFormat:
    name: str
    openers: tuple[Opener, ...]
    separators: tuple[Parts, ...]  # between two calls of one run
    closer: Parts  # ends a run; () when the run ends with the reply
    args_key: str  # the key the family's template teaches: "arguments" or "parameters"
    max_calls: int  # the most calls one turn may hold (the template's own limit)
    special: tuple[str, ...] = ()  # markers that are control tokens in the family's vocabulary
    short_ids: bool = False  # the template demands 9-character alphanumeric call ids
    named_args: bool = False  # a call is name[ARGS]{...}, not one JSON object


HERMES = ToolFormat(
    "hermes",
    openers=(Opener(("<tool_call>",)),),
    separators=(("</tool_call>", "<tool_call>"),),
    closer=("</tool_call>",),
    args_key="arguments",
    max_calls=8,
)
LLAMA3 = ToolFormat(
    "llama3",
    openers=(Opener((), start_only=True, trigger_units=2), Opener(("<|python_tag|>",))),
    separators=((";",),),
    closer=(),
    args_key="parameters",
    max_calls=1,  # Llama 3.x templates raise "This model only supports single tool-calls at once!"
    special=("<|python_tag|>",),
)
MISTRAL = ToolFormat(
    "mistral",
    openers=(Opener(("[TOOL_CALLS]", "[")),),
    separators=((",",),),
    closer=("]",),
    args_key="arguments",
    max_calls=8,
    special=("[TOOL_CALLS]",),
    short_ids=True,
)
MISTRAL_V11 = ToolFormat(
    "mistral-v11",
    openers=(Opener(("[TOOL_CALLS]",)),),
    separators=(("[TOOL_CALLS]",),),
    closer=(),
    args_key="arguments",
    max_calls=8,
    special=("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
    short_ids=True,
    named_args=True,
)
GENERIC = ToolFormat(
    "generic",
    openers=(Opener(("{", '"tool_calls"', ":", "["), trigger_units=2),),
    separators=((",",),),
    closer=("]", "}"),
    args_key="arguments",
    max_calls=8,
)
FORMATS = {f.name: f for f in (HERMES, LLAMA3, MISTRAL, MISTRAL_V11, GENERIC)}


def detect(template_source: str | None) -> ToolFormat:
    """The format a chat template speaks, from the markers its text holds.

    Checked against the real templates (see the issue note): Mistral's hold
    ``[TOOL_CALLS]``, the newer ones also ``[ARGS]``; Qwen 2.5/3 and Hermes 2 Pro/3
    ``<tool_call>``; Llama 3.1-3.3 ``<|start_header_id|>`` with the ``ipython`` role.
    Anything else, and a template that never reads ``tools``, gets the generic format.
    """
    src = template_source or ""
    if not supports_tools(src):
        return GENERIC
    if "[TOOL_CALLS]" in src:
        return MISTRAL_V11 if "[ARGS]" in src else MISTRAL
    if "<tool_call>" in src:
        return HERMES
    if "<|start_header_id|>" in src and "ipython" in src:
        return LLAMA3
    return GENERIC


def supports_tools(template_source: str | None) -> bool:
    """Whether a template renders the tool list itself (it reads the ``tools`` variable)."""
    return bool(template_source) and re.search(r"\btools\b", template_source) is not None


def short_id(call_id: str) -> str:
    """A 9-character alphanumeric stand-in for a call id (Mistral's templates demand one);
    the same id always maps to the same stand-in, so a replayed conversation renders alike."""
    return hashlib.blake2b(call_id.encode(), digest_size=8).hexdigest()[:9]


# -- the grammar -------------------------------------------------------------------------------
#
# An llguidance grammar in its Lark dialect (engine/constraints.py compiles it). Each tool's
# parameters are an inline ``%json`` schema; the call object around them is written out here,
# name first, so that a lazy grammar can start inside it (Llama 3's bare ``{"name"``).

_WS_RE = "[ \\t\\n]{0,4}"  # between markers, as the parser allows (tool_parser.py)


def grammar(
    fmt: ToolFormat, tools: list[dict], max_calls: int, lazy: bool = False, strict: bool = True,
    one_token: Callable[[str], int | None] = lambda text: None,
) -> str:
    """The grammar of a run of 1..max_calls calls to ``tools`` in ``fmt``'s markup: the whole
    output (forced), or free text until a call opens and the run from there (``lazy``).

    A marker the vocabulary has as one token (``one_token(text)`` its id: Qwen's
    ``<tool_call>``, Llama's ``<|python_tag|>``) may be written as that token or spelled out.
    A lazy grammar opens a run at an opener's token, or at the first text that matches an
    opener's trigger units (a lazy lexeme: llguidance matches it as the text grows, with no
    search over the output).
    """
    mark = _Markers(one_token)
    more = min(max_calls, fmt.max_calls) - 1
    seps = " | ".join(mark.parts(sep) for sep in fmt.separators)
    close = f" MWS {mark.parts(fmt.closer)}" if fmt.closer else ""
    rules = [
        "%llguidance {}",
        f"MWS: /{_WS_RE}/",
        f"JWS: /{JSON_WS}/",
        *_call_rules(fmt, tools, strict),
        "more: " + (f"(MWS ({seps}) MWS call){{0,{more}}}" if more > 0 else '""') + close,
    ]
    starts = ["TEXT"] if lazy else []
    for i, opener in enumerate(fmt.openers):
        if not lazy:
            starts.append(_after(fmt, opener, 0, mark))
            continue
        k = opener.trigger_units
        token = one_token(opener.parts[0]) if k == 1 and opener.parts else None
        if token is not None:
            starts.append(f"TEXT <[{token}]> {_after(fmt, opener, 1, mark)}")
        units = (list(opener.parts) + ([] if fmt.named_args else list(_HEAD)))[:k]
        lead = "/[ \\t\\n]*/" if opener.start_only else "TEXT"
        rules.append(f"head{i}[lazy]: {lead} /{_WS_RE.join(_regex(u) for u in units)}/")
        starts.append(f"head{i} {_after(fmt, opener, k, mark)}")
    if lazy:
        rules.append("TEXT: /(.|\\n)*/")
    rules.insert(1, "start: " + " | ".join(starts))
    return "\n".join(rules) + "\n"


# The head of a call object, where a lazy grammar may take trigger units from.
_HEAD: Parts = ("{", '"name"')


def _after(fmt: ToolFormat, opener: Opener, k: int, mark: _Markers) -> str:
    """The run once its first ``k`` units (the opener's parts, then the call's head) are
    written."""
    if k <= len(opener.parts) or fmt.named_args:
        return "".join(f"MWS {mark.one(p)} " for p in opener.parts[k:]) + "MWS call more"
    head = _HEAD[k - len(opener.parts) :]
    return " ".join(f"JWS {lark_literal(u)}" for u in head) + " call_tail more"


def _call_rules(fmt: ToolFormat, tools: list[dict], strict: bool) -> list[str]:
    """``call`` (and ``call_tail``, after a call object's head): one call to any of
    ``tools``, its arguments an inline JSON schema."""
    rules = []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        params = fn.get("parameters")
        schema = enforced(params if isinstance(params, dict) else {"type": "object"}, strict)
        rules.append(f"args{i}: %json {json.dumps(schema, ensure_ascii=False)}")
        if fmt.named_args:
            rules.append(f"fn{i}: {lark_literal(fn['name'] + '[ARGS]')} args{i}")
        else:
            key = lark_literal(json.dumps(fmt.args_key))
            rules.append(f"fn{i}: {lark_literal(json.dumps(fn['name']))} JWS \",\" JWS {key} JWS \":\" JWS args{i}")
    fns = " | ".join(f"fn{i}" for i in range(len(tools)))
    if fmt.named_args:
        return rules + [f"call: {fns}"]
    return rules + [f'call: "{{" JWS {lark_literal(_HEAD[1])} call_tail', f'call_tail: JWS ":" JWS ({fns}) JWS "}}"']


class _Markers:
    """Lark for markers: a literal, or also its token where the vocabulary has one."""

    def __init__(self, one_token: Callable[[str], int | None]):
        self.one_token = one_token

    def one(self, text: str) -> str:
        token = self.one_token(text) if len(text) > 1 else None
        return f"(<[{token}]> | {lark_literal(text)})" if token is not None else lark_literal(text)

    def parts(self, parts: Parts) -> str:
        return " MWS ".join(self.one(p) for p in parts)


def _regex(text: str) -> str:
    """``text`` as a regex inside Lark's ``/.../``."""
    return re.escape(text).replace("/", "\\/")


def token_openers(fmt: ToolFormat) -> list[str]:
    """Openers that alone start a call: a model whose vocabulary has one as a single token
    (Qwen's <tool_call>, Mistral's [TOOL_CALLS], Llama's <|python_tag|>) can trigger on it."""
    return [o.parts[0] for o in fmt.openers if o.parts and o.trigger_units == 1]


def prefix_re(literal: str, then: str = "") -> str:
    """A regex for any non-empty prefix of ``literal`` (``then`` may follow all of it)."""
    chain = re.escape(literal[-1]) + then
    for ch in reversed(literal[:-1]):
        chain = re.escape(ch) + f"(?:{chain})?"
    return chain
