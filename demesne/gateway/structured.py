"""Structured output: JSON schemas bounded, then turned into GBNF grammars for the engine.

A schema is checked (:func:`check_schema`) before llama-cpp-python's converter sees it, and
the grammar it makes before llama.cpp's parser does: both crash or hang on inputs a client
can send (nested repetitions, huge enums, stray closers in patterns).
"""

from __future__ import annotations

import json
import re
from typing import Any

from llama_cpp.llama_grammar import json_schema_to_gbnf

from ..engine.grammar import grammar_problem
from .errors import bad


def schema_grammar(schema: dict, param: str) -> str:
    """GBNF for a JSON schema (within :func:`check_schema`'s bounds); a schema the converter
    refuses, or a grammar too big to hand to llama.cpp, is a 400 on ``param``."""
    try:
        grammar = strict_strings(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter's own refusals (remote $ref, bad patterns, ...)
        raise bad(f"cannot enforce this JSON schema: {_clipped(exc)}", param, "unsupported_schema") from None
    problem = grammar_problem(grammar)
    if problem:
        raise bad(f"this JSON schema makes a grammar too big to enforce: {problem}", param, "schema_too_complex")
    return grammar


def _clipped(exc: Exception, most: int = 300) -> str:
    text = str(exc)
    return text if len(text) <= most else text[:most] + "..."


_STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F]'


def strict_strings(grammar: str) -> str:
    """JSON forbids raw control characters in strings, but llama-cpp-python's converter lets
    them through (its ``char`` rule is only ``[^"\\]``), so a model could write a newline
    inside a string and the output would not parse. Tighten the rule as llama.cpp writes it."""
    return re.sub(r'^char ::= \[\^"\\\\\]', lambda _: _STRICT_CHAR, grammar, flags=re.M)


# Keywords llama.cpp's schema-to-grammar converter does not enforce.
_UNSUPPORTED_SCHEMA = frozenset({"not", "if", "then", "else", "dependentSchemas", "dependentRequired", "patternProperties", "uniqueItems", "contains", "multipleOf", "unevaluatedProperties"})


# Bounds on a JSON schema, so that neither the converter nor llama.cpp is asked for more than
# it can take. The converter writes x{0,n} as n nested groups; llama.cpp's grammar parser
# recurses once per group (20,000 overflow its stack: a segfault, not an error) and refuses
# more than about 1,000. Every alternative that can be open at once (an enum's entries, the
# branches of anyOf, and so on through $refs) is a grammar stack llama.cpp advances for every
# candidate token (an enum of 20,000 costs 30 s a token; 4,096 take 34 s to mask a row over
# the vocabulary, 512 take 2.5 s), and llama.cpp's check for left recursion walks every
# path through unions of $refs (26 nested pairs of them took 11 s). The converter itself
# recurses per level and per optional property.
MAX_SCHEMA_DEPTH = 64  # objects and arrays inside one another, the schema's own JSON
MAX_SCHEMA_NODES = 10_000  # values in the whole schema
MAX_SCHEMA_REPEAT = 1000  # minLength, maxLength, minItems, maxItems, {m,n} in a pattern
MAX_SCHEMA_ALTERNATIVES = 512  # open at once: enum entries, anyOf/oneOf branches, through $refs
MAX_SCHEMA_PROPERTIES = 256  # properties of one object
MAX_PATTERN_CHARS = 1000

_REPEATS = (("minLength", "maxLength"), ("minItems", "maxItems"))
_SUBSCHEMAS = ("items", "prefixItems", "additionalProperties", "allOf")
_CHOICES = ("enum", "oneOf", "anyOf", "allOf")
_DATA = frozenset({"enum", "const", "default", "examples"})  # values, not schemas
_NAMED = frozenset({"properties", "$defs", "definitions", "patternProperties", "dependentSchemas"})  # name -> schema
_QUANTIFIER = re.compile(r"\{([0-9\s,]*)\}")


def check_schema(schema: Any, param: str) -> list[str]:
    """Hold a JSON schema to the bounds above (a 400 on ``param`` past one), walking it
    without recursion; the keywords it uses that the converter does not enforce, sorted."""
    unsupported: set[str] = set()
    stack: list[tuple[Any, int, str]] = [(schema, 1, "schema")]
    nodes = 0
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
                _check_keywords(node, param)
                unsupported.update(_UNSUPPORTED_SCHEMA.intersection(node))
            for key, value in node.items():
                child = "schema" if kind == "names" else kind if kind == "data" else "data" if key in _DATA else "names" if key in _NAMED else "schema"
                stack.append((value, depth + 1, child))
    if isinstance(schema, dict):
        _Alternatives(schema, param).count(schema, 0)
    return sorted(unsupported)


def _check_keywords(node: dict, param: str) -> None:
    """One schema object's sizes: repetitions, alternatives, properties, its pattern."""
    for low, high in _REPEATS:
        for key in (low, high):
            value = node.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SCHEMA_REPEAT):
                raise bad(f"'{key}' in a JSON schema must be an integer in [0, {MAX_SCHEMA_REPEAT}]", param, "schema_too_complex")
        if isinstance(node.get(low), int) and isinstance(node.get(high), int) and node[low] > node[high]:
            raise bad(f"'{low}' exceeds '{high}' in the JSON schema", param)
    for key in _CHOICES:
        if isinstance(node.get(key), list) and len(node[key]) > MAX_SCHEMA_ALTERNATIVES:
            raise bad(f"'{key}' in a JSON schema takes at most {MAX_SCHEMA_ALTERNATIVES} entries, got {len(node[key])}", param, "schema_too_complex")
    if isinstance(node.get("properties"), dict) and len(node["properties"]) > MAX_SCHEMA_PROPERTIES:
        raise bad(f"an object in the JSON schema has more than {MAX_SCHEMA_PROPERTIES} properties", param, "schema_too_complex")
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        if len(pattern) > MAX_PATTERN_CHARS:
            raise bad(f"a 'pattern' in the JSON schema may be at most {MAX_PATTERN_CHARS} characters long", param, "schema_too_complex")
        for bounds in _QUANTIFIER.findall(pattern):
            if any(int(n) > MAX_SCHEMA_REPEAT for n in re.findall(r"[0-9]+", bounds)):
                raise bad(f"a 'pattern' in the JSON schema repeats more than {MAX_SCHEMA_REPEAT} times", param, "schema_too_complex")
        stray = _stray_closer(pattern)
        if stray:
            raise bad(f"a 'pattern' in the JSON schema has a '{stray}' that closes nothing: escape it as '\\{stray}'", param, "unsupported_schema")


def _stray_closer(pattern: str) -> str | None:
    """A ']' or '}' outside any class or repetition, read as the converter reads a pattern:
    it takes such a character for neither syntax nor text and loops on it forever (one
    request would hold the gateway's event loop at 100% CPU)."""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
        elif c == "[":  # to the class's end, escapes skipped
            i += 1
            while i < len(pattern) and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            i += 1
        elif c == "{":  # to the repetition's end
            end = pattern.find("}", i)
            i = len(pattern) if end < 0 else end + 1
        elif c in "]}":
            return c
        else:
            i += 1
    return None


class _Alternatives:
    """Counts how many alternatives of a schema can be open at once, following local $refs
    (each counted once, however often it is used), as the converter reads the schema: branches
    of a union add up, parts of an object or array do not (one is open at a time)."""

    def __init__(self, root: dict, param: str):
        self.root, self.param = root, param
        self.refs: dict[str, int] = {}

    def count(self, node: Any, depth: int) -> int:
        if depth > 2 * MAX_SCHEMA_DEPTH:
            raise bad(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels through its $refs", self.param, "schema_too_complex")
        if not isinstance(node, dict):
            return 1
        ref = node.get("$ref")
        if ref is not None:  # the converter's order: $ref, unions, type lists, const, enum, ...
            return self._ref(ref, depth) if isinstance(ref, str) else 1
        for key in ("oneOf", "anyOf"):
            if isinstance(node.get(key), list):
                return self._within(sum(self.count(branch, depth + 1) for branch in node[key]))
        if isinstance(node.get("type"), list):
            return len(node["type"])
        if "const" not in node and isinstance(node.get("enum"), list):
            return self._within(len(node["enum"]))
        parts = list(node["properties"].values()) if isinstance(node.get("properties"), dict) else []
        for key in _SUBSCHEMAS:
            part = node.get(key)
            parts += part if isinstance(part, list) else [part] if isinstance(part, dict) else []
        return max((self.count(part, depth + 1) for part in parts), default=1)

    def _ref(self, ref: str, depth: int) -> int:
        if ref not in self.refs:
            self.refs[ref] = 1  # a schema that refers to itself counts once inside itself
            self.refs[ref] = self.count(self._resolve(ref), depth + 1)
        return self.refs[ref]

    def _resolve(self, ref: str) -> Any:
        """A local ``#/...`` reference's target; None where there is none (the converter
        then refuses the schema)."""
        if not ref.startswith("#"):
            return None
        target: Any = self.root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                return None
            target = target[part]
        return target

    def _within(self, n: int) -> int:
        if n > MAX_SCHEMA_ALTERNATIVES:
            raise bad(
                f"the JSON schema lets more than {MAX_SCHEMA_ALTERNATIVES} alternatives (enum entries,"
                " anyOf/oneOf branches, counted through $refs) be open at once",
                self.param,
                "schema_too_complex",
            )
        return n
