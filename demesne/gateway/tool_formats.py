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
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass

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

WS_RULE = "tc-ws ::= [ \\t\\n]{0,4}"


def _gbnf_parts(parts: Parts) -> str:
    return " tc-ws ".join(_gbnf_literal(p) for p in parts)


def _gbnf_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def call_schema(fmt: ToolFormat, tools: list[dict]) -> dict:
    """The JSON schema of one call to any of ``tools`` (name first, then its arguments).

    Each tool's ``$defs`` (pydantic writes nested models there) move to the root under a
    per-tool prefix, and its local ``$ref``s follow, so they resolve inside the wrapper.
    """
    defs: dict = {}
    variants = []
    for i, t in enumerate(tools):
        params = _hoist_defs(t["function"]["parameters"], f"t{i}-", defs)
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": t["function"]["name"]}, fmt.args_key: params},
                "required": ["name", fmt.args_key],
                "additionalProperties": False,
            }
        )
    schema = variants[0] if len(variants) == 1 else {"oneOf": variants}
    return {**schema, "$defs": defs} if defs else schema


_LOCAL_REF = re.compile(r"^#/(\$defs|definitions)/")


def _hoist_defs(params: dict, prefix: str, defs: dict) -> dict:
    def rewrite(node):
        if isinstance(node, dict):
            out = {k: rewrite(v) for k, v in node.items() if k not in ("$defs", "definitions")}
            ref = node.get("$ref")
            if isinstance(ref, str) and _LOCAL_REF.match(ref):
                out["$ref"] = "#/$defs/" + prefix + _LOCAL_REF.sub("", ref)
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for key in ("$defs", "definitions"):
        for name, sub in (params.get(key) or {}).items():
            defs[prefix + name] = rewrite(sub)
    return rewrite(params)


def grammar(fmt: ToolFormat, tools: list[dict], max_calls: int, schema_to_gbnf: Callable[[dict], str]) -> str:
    """GBNF for a run of 1..max_calls calls to ``tools`` in ``fmt``'s markup.

    The root accepts every opener (a lazy grammar may be triggered by any of them), and
    whitespace wherever the parser allows it.
    """
    if fmt.named_args:
        body = _named_calls(tools, schema_to_gbnf)
    else:
        body = re.sub(r"^root ::=", "tc-call ::=", schema_to_gbnf(call_schema(fmt, tools)), flags=re.M)
    opens = [_gbnf_parts(o.parts) for o in fmt.openers if o.parts]
    bare = any(not o.parts for o in fmt.openers)  # a run may also start with no opener at all
    start = f"({' | '.join(opens)})" + ("?" if bare else "") if opens else ""
    sep = "(" + " | ".join(_gbnf_parts(s) for s in fmt.separators) + ")"
    more = min(max_calls, fmt.max_calls) - 1
    calls = "tc-call" + (f" (tc-ws {sep} tc-ws tc-call){{0,{more}}}" if more > 0 else "")
    close = f" tc-ws {_gbnf_parts(fmt.closer)}" if fmt.closer else ""
    root = f"root ::= tc-ws {start} tc-ws {calls}{close}".replace("tc-ws  tc-ws", "tc-ws")
    return f"{body}\n{root}\n{WS_RULE}\n"


def _named_calls(tools: list[dict], schema_to_gbnf: Callable[[dict], str]) -> str:
    """``tc-call`` for name[ARGS]{...}: each tool's name, then its own arguments rule (one
    conversion of a wrapper object whose properties are the tools' parameter schemas)."""
    defs: dict = {}
    props = {f"tc-args-{i}": _hoist_defs(t["function"]["parameters"], f"t{i}-", defs) for i, t in enumerate(tools)}
    wrapper = {"type": "object", "properties": props, **({"$defs": defs} if defs else {})}
    body = re.sub(r"^root ::=", "tc-wrapper ::=", schema_to_gbnf(wrapper), flags=re.M)
    calls = " | ".join(f'{_gbnf_literal(t["function"]["name"] + "[ARGS]")} tc-args-{i}' for i, t in enumerate(tools))
    return f"{body}\ntc-call ::= {calls}"


# -- lazy triggers (tool_choice auto) ---------------------------------------------------------

# The head of a call object as llama.cpp's schema grammar writes it: '{', '"name"', ':', '"',
# with at most one space between (its ``space`` rule also takes one).
_HEAD: Parts = ("{", '"name"', ":", '"')


def triggers(fmt: ToolFormat, names: list[str], by_token: Collection[str] = ()) -> list[str]:
    """Regexes for llama.cpp's lazy grammar, which searches the output so far with each after
    every token and starts the grammar at the first group of a match.

    Each match must *end* the output (``$``) inside text the grammar accepts: the group is an
    opener's leading units followed by any prefix of the rest of the opener and the head of
    a call. Were the output allowed to run on past that (a token such as ``>Paris`` closing
    ``<tool_call``), llama.cpp would hand the grammar text it rejects, and it aborts the
    process rather than refuse. Only the bare-JSON opener is anchored at the start (``^``).
    No leading ``[\\s\\S]*?``: searching for the opener directly costs a fifth as much, and
    the search runs over the whole output after every token (0.12 ms a token at 3000 tokens
    on this machine, against 0.66 ms).

    Openers in ``by_token`` are left out: they are single tokens of the model's vocabulary,
    and llama.cpp triggers on those tokens themselves, at no cost per token.
    """
    if fmt.named_args:  # the opener, then a prefix of an allowed name, "[ARGS]" and "{"
        if fmt.openers[0].parts[0] in by_token:
            return []
        heads = "|".join(prefix_re(name + "[ARGS]{") for name in names)
        return ["(" + re.escape(fmt.openers[0].parts[0]) + f"(?:{heads})?)$"]
    patterns = []
    for opener in fmt.openers:
        if opener.parts and opener.parts[0] in by_token:
            continue
        units = [(_WS_RE, p) for p in opener.parts] + [(_WS_RE if opener.parts else "", _HEAD[0])]
        units += [(" ?", p) for p in _HEAD[1:]]
        units[0] = ("", units[0][1])
        need, rest = units[: opener.trigger_units], units[opener.trigger_units :]
        fixed = "".join(sep + re.escape(literal) for sep, literal in need)
        lead = r"^\s*" if opener.start_only else ""
        patterns.append(f"{lead}({fixed}{_prefix_re(rest)})$")
    return patterns


_WS_RE = "[ \\t\\n]{0,4}"


def _prefix_re(units: list[tuple[str, str]]) -> str:
    """A regex for any prefix of the units' text (each a separator regex, then a literal)."""
    if not units:
        return ""
    (sep, literal), rest = units[0], units[1:]
    chain = prefix_re(literal, _prefix_re(rest))
    return f"(?:{sep}(?:{chain})?)?" if sep else f"(?:{chain})?"


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
