"""Structured output: what a request's output must follow, as one llguidance grammar.

OpenAI's ``response_format`` (``json_object``, ``json_schema``, and here also ``regex`` and
``grammar``), llama-server's ``json_schema`` and ``grammar`` fields, and vLLM's
``structured_outputs`` (and its older ``guided_json`` / ``guided_regex`` / ``guided_choice``
/ ``guided_grammar``) all become one grammar text for the engine, which compiles it once
per distinct text (engine/constraints.py). A keyword llguidance cannot enforce is refused
there with a 400 naming it: never a schema silently left unenforced.

Schemas are held to size bounds first (schemas.py).
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

from ..protocol import MAX_GRAMMAR_BYTES
from .errors import bad
from .schemas import check_schema, enforced, lark_literal

MAX_GRAMMAR_CHARS = MAX_GRAMMAR_BYTES // 4  # a character is at most 4 bytes of UTF-8
MAX_GBNF_CHARS = 16384
MAX_CHOICES = 1024  # strings of a guided_choice


def output_grammar(body: dict) -> tuple[str, str] | None:
    """(grammar, the field it came from) for whichever structured-output field ``body``
    uses; None when it asks for none. More than one is a 400."""
    found = [(param, make) for param, make in _FIELDS if body.get(param) is not None]
    if isinstance(body.get("response_format"), dict) and body["response_format"].get("type", "text") == "text":
        found = [(param, make) for param, make in found if param != "response_format"]
    if not found:
        return None
    if len(found) > 1:
        raise bad(f"'{found[0][0]}' and '{found[1][0]}' cannot be combined: pick one way to constrain the output", found[1][0])
    param, make = found[0]
    return make(body[param], param), _where(param, body[param])


def _where(param: str, value: Any) -> str:
    """The field an engine's refusal names: for response_format, the part holding the
    schema, regex or grammar."""
    if param != "response_format":
        return param
    kind = value.get("type")
    if kind == "json_schema":
        return "response_format.json_schema.schema"
    if kind == "json_object":
        return "response_format.schema" if "schema" in value else param
    return f"response_format.{kind}"


def schema_grammar(schema: Any, param: str) -> str:
    """The grammar of JSON text that validates against ``schema`` (strictly enforced)."""
    if not isinstance(schema, dict):
        raise bad("a JSON schema must be an object", param, "invalid_type")
    check_schema(schema, param)
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(enforced(schema))
    except ValueError as exc:  # what it cannot serialise (integers past 64 bits, ...)
        raise bad(f"cannot read this JSON schema: {_clipped(exc)}", param, "invalid_schema") from None


def _response_format(fmt: Any, param: str) -> str:
    if not isinstance(fmt, dict):
        raise bad("'response_format' must be an object", param, "invalid_type")
    kind = fmt.get("type")
    if kind == "json_object":  # any JSON object; llama-server also takes a schema beside it
        return schema_grammar(fmt.get("schema", {"type": "object"}), f"{param}.schema")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad("response_format.json_schema.schema must be a JSON schema object", f"{param}.json_schema.schema", "invalid_type")
        return schema_grammar(schema, f"{param}.json_schema.schema")
    if kind == "regex":
        return _regex(fmt.get("regex"), f"{param}.regex")
    if kind == "grammar":
        spec = fmt.get("grammar")
        if isinstance(spec, str):
            return _lark(spec, f"{param}.grammar")
        if not isinstance(spec, dict) or spec.get("syntax", "lark") not in _SYNTAXES:
            raise bad("response_format.grammar must be a string, or {\"syntax\": \"lark\" | \"gbnf\" | \"regex\", \"definition\": ...}", f"{param}.grammar")
        return _SYNTAXES[spec.get("syntax", "lark")](spec.get("definition"), f"{param}.grammar.definition")
    raise bad(f"response_format type must be text, json_object, json_schema, regex or grammar, got {kind!r}", f"{param}.type")


def _regex(text: Any, param: str) -> str:
    _text(text, param, "a regular expression")
    return llguidance.LLMatcher.grammar_from_regex(text)


def _lark(text: Any, param: str) -> str:
    """A grammar in llguidance's Lark dialect, or GBNF (llama.cpp's), told apart by ``::=``.
    GBNF is converted here, by llguidance's Python converter: its time grows with the square
    of the grammar's length (0.45 s at 16 KiB, 13 s at 96 KiB), so GBNF is held to
    :data:`MAX_GBNF_CHARS` (llama.cpp's own grammars are a few KiB)."""
    _text(text, param, "a grammar")
    if "::=" in text and len(text) > MAX_GBNF_CHARS:
        raise bad(f"a GBNF grammar may be at most {MAX_GBNF_CHARS} characters long (Lark up to {MAX_GRAMMAR_CHARS})", param, "grammar_too_complex")
    try:
        return llguidance.grammar_from("grammar", text)
    except Exception as exc:  # noqa: BLE001 - the GBNF converter's refusals, whatever they raise
        raise bad(f"cannot read this grammar: {_clipped(exc)}", param, "invalid_grammar") from None


def _choice(choices: Any, param: str) -> str:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise bad(f"'{param}' must be a non-empty array of strings", param, "invalid_type")
    if len(choices) > MAX_CHOICES:
        raise bad(f"'{param}' takes at most {MAX_CHOICES} strings, got {len(choices)}", param)
    return "start: " + " | ".join(lark_literal(c) for c in choices)


def _structured_outputs(spec: Any, param: str) -> str:
    """vLLM's ``structured_outputs``: exactly one of json, regex, choice, grammar."""
    if not isinstance(spec, dict):
        raise bad(f"'{param}' must be an object", param, "invalid_type")
    kinds = [k for k in _VLLM if spec.get(k) is not None]
    if len(kinds) != 1:
        raise bad(f"'{param}' takes exactly one of {', '.join(_VLLM)}", param)
    return _VLLM[kinds[0]](spec[kinds[0]], f"{param}.{kinds[0]}")


def _json_value(schema: Any, param: str) -> str:
    """A schema given as an object or as JSON text (vLLM takes both)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise bad(f"'{param}' is not valid JSON", param, "invalid_type") from None
    return schema_grammar(schema, param)


def _text(value: Any, param: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise bad(f"'{param}' must be {what} (a non-empty string)", param, "invalid_type")
    if len(value) > MAX_GRAMMAR_CHARS:
        raise bad(f"'{param}' may be at most {MAX_GRAMMAR_CHARS} characters long", param, "grammar_too_complex")


def _clipped(exc: Exception, most: int = 300) -> str:
    text = str(exc)
    return text if len(text) <= most else text[:most] + "..."


_SYNTAXES = {"lark": _lark, "gbnf": _lark, "regex": _regex}
_VLLM = {"json": _json_value, "regex": _regex, "choice": _choice, "grammar": _lark}
_FIELDS = (
    ("response_format", _response_format),
    ("json_schema", _json_value),  # llama-server
    ("grammar", _lark),  # llama-server (GBNF), or Lark
    ("structured_outputs", _structured_outputs),  # vLLM
    ("guided_json", _json_value),  # vLLM, before structured_outputs
    ("guided_regex", _regex),
    ("guided_choice", _choice),
    ("guided_grammar", _lark),
)
