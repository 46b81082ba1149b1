"""JSON schemas as demesne enforces them: size bounds, and the schema llguidance is given.

:func:`check_schema` holds a client's schema to bounds without recursion (llguidance compiles
a schema recursively, and a deep enough one would overflow its stack). :func:`enforced` is the
schema handed to llguidance: its options (bounded whitespace; strict: a keyword it cannot
enforce is an error), and two defaults that keep a model from writing forever, both only
ever narrowing what the schema allows (so the output still validates against it):

- an integer without bounds gets 18 digits at most, within the 64 bits clients and databases
  read (llama.cpp's converter allows 16; llguidance goes through doubles, where 2**63 - 1
  overflows);
- an object that lists its ``properties`` and says nothing of others gets no others, as
  llama.cpp's converter and XGrammar's strict mode read it (OpenAI's strict mode demands it
  be written out). A schema using ``allOf`` is left as it is: its parts may add properties
  to one another.
"""

from __future__ import annotations

import json
from typing import Any

from ..protocol import MAX_GRAMMAR_REFS
from .errors import bad

# JSON whitespace: a space, or a line break or two and an indent; bounded, so that a model
# cannot spin on whitespace forever.
JSON_WS = r"(?: |\n{1,2}[ \t]{0,20})?"
LARGEST_INTEGER = 10**18 - 1  # the default bound of an integer schema


def enforced(schema: dict, strict: bool = True) -> dict:
    """``schema`` as llguidance is to enforce it: with our options in its ``x-guidance`` key
    (they win over the client's), and integers bounded (:data:`LARGEST_INTEGER`).
    ``strict``: a keyword llguidance cannot enforce is an error; lenient: ignored (the
    arguments of calls a model merely may make)."""
    options = {"whitespace_pattern": JSON_WS, "lenient": not strict}
    return {**_narrowed(schema, "schema", closed=not _uses(schema, "allOf")), "x-guidance": options}


def lark_literal(text: str) -> str:
    """``text`` as a string literal in llguidance's Lark."""
    return json.dumps(text, ensure_ascii=False)


_OTHER_PROPERTIES = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def _narrowed(node: Any, kind: str, closed: bool) -> Any:
    """A copy of ``node`` with the defaults above (``kind`` as in :func:`check_schema`; the
    depth is already bounded there)."""
    if isinstance(node, list):
        return [_narrowed(item, kind, closed) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _narrowed(value, _child(kind, key), closed) for key, value in node.items()}
    if kind != "schema":
        return out
    types = node.get("type")
    if types == "integer" or isinstance(types, list) and "integer" in types:
        if "minimum" not in node and "exclusiveMinimum" not in node:
            out["minimum"] = -LARGEST_INTEGER
        if "maximum" not in node and "exclusiveMaximum" not in node:
            out["maximum"] = LARGEST_INTEGER
    if closed and isinstance(node.get("properties"), dict) and not any(k in node for k in _OTHER_PROPERTIES):
        out["additionalProperties"] = False
    return out


def _uses(schema: Any, keyword: str) -> bool:
    """Whether ``keyword`` is a keyword anywhere in ``schema`` (not a property name or data)."""
    stack = [(schema, "schema")]
    while stack:
        node, kind = stack.pop()
        if isinstance(node, list):
            stack.extend((item, kind) for item in node)
        elif isinstance(node, dict):
            if kind == "schema" and keyword in node:
                return True
            stack.extend((value, _child(kind, key)) for key, value in node.items())
    return False


MAX_SCHEMA_DEPTH = 64  # objects and arrays inside one another, the schema's own JSON
MAX_SCHEMA_NODES = 10_000  # values in the whole schema
MAX_PATTERN_CHARS = 1000

_DATA = frozenset({"enum", "const", "default", "examples"})  # values, not schemas
_NAMED = frozenset({"properties", "$defs", "definitions", "patternProperties", "dependentSchemas"})  # name -> schema


def check_schema(schema: Any, param: str) -> None:
    """Hold a JSON schema to the bounds above and the engine's (a 400 on ``param`` past
    one), walking it without recursion."""
    stack: list[tuple[Any, int, str]] = [(schema, 1, "schema")]
    nodes = refs = 0
    while stack:
        node, depth, kind = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise bad(f"the JSON schema holds more than {MAX_SCHEMA_NODES} values", param, "schema_too_complex")
        if depth > MAX_SCHEMA_DEPTH and isinstance(node, (dict, list)):
            raise bad(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels", param, "schema_too_complex")
        if isinstance(node, list):
            stack.extend((item, depth + 1, kind) for item in node)
        elif isinstance(node, dict):
            if kind == "schema":
                refs += "$ref" in node
                if refs > MAX_GRAMMAR_REFS:
                    raise bad(f"the JSON schema holds more than {MAX_GRAMMAR_REFS} $refs", param, "schema_too_complex")
                if isinstance(node.get("pattern"), str) and len(node["pattern"]) > MAX_PATTERN_CHARS:
                    raise bad(f"a 'pattern' in the JSON schema may be at most {MAX_PATTERN_CHARS} characters long", param, "schema_too_complex")
            for key, value in node.items():
                stack.append((value, depth + 1, _child(kind, key)))


def _child(kind: str, key: str) -> str:
    """What the value under ``key`` of a ``kind`` node is: a schema, a name -> schema map,
    or data (enum values, defaults...)."""
    if kind == "names":
        return "schema"
    if kind == "data":
        return "data"
    return "data" if key in _DATA else "names" if key in _NAMED else "schema"
