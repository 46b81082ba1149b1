"""Function calling: validating ``tools`` and ``tool_choice``, the grammar that forces a call,
and parsing calls out of the model's text.

One output format so far, the Hermes / Qwen 2.5 markup, which is also the generic format for
models with none (the bundled base model, told about it by the fallback template)::

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

``tool_choice: "required"`` or a named function constrains decoding with a grammar built from
the allowed tools' parameter schemas, so the output is always a valid call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_PARALLEL = 4  # calls one forced turn may hold
# For tool_choice auto: llama.cpp's lazy grammar starts at the first group once output matches.
CALL_TRIGGER = r"[\s\S]*?(" + re.escape(OPEN) + r")[\s\S]*"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


class ToolError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class ToolSpec:
    """The validated tool part of a chat request."""

    tools: list[dict]  # OpenAI shape, passed to the chat template
    choice: str  # "none", "auto", "required", or "named"
    named: str | None = None
    parallel: bool = True
    names: set[str] = field(default_factory=set)

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")


def parse_tools(body: dict) -> ToolSpec | None:
    """``tools``/``tool_choice``/``parallel_tool_calls``, or the legacy ``functions``/``function_call``."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None and body.get("functions") is not None:
        tools = [{"type": "function", "function": f} for f in _list(body["functions"], "functions")]
        legacy = body.get("function_call")
        choice = {"type": "function", "function": legacy} if isinstance(legacy, dict) else legacy
    if tools is None:
        if choice not in (None, "none"):
            raise ToolError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    tools = [_tool(t, i) for i, t in enumerate(_list(tools, "tools"))]
    names = {t["function"]["name"] for t in tools}
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ToolError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    spec = ToolSpec(tools, "auto", None, parallel, names)
    if choice in (None, "auto", "none", "required"):
        spec.choice = choice or "auto"
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise ToolError(f"'tool_choice' names {name!r}, which is not among the tools", "tool_choice")
        spec.choice, spec.named = "named", name
    else:
        raise ToolError("'tool_choice' must be none, auto, required or {type: function, function: {name}}", "tool_choice")
    return spec


def _list(value: Any, param: str) -> list:
    if not isinstance(value, list) or not value:
        raise ToolError(f"'{param}' must be a non-empty array", param)
    return value


def _tool(tool: Any, i: int) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
        raise ToolError(f"'{where}' must be {{type: function, function: {{...}}}}", where)
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ToolError(f"'{where}.function.name' must be 1-64 letters, digits, _ or -", f"{where}.function.name")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise ToolError(f"'{where}.function.parameters' must be a JSON schema of type object", f"{where}.function.parameters")
    return {"type": "function", "function": {**fn, "parameters": params}}


def check_tool_messages(messages: list[dict], raw: list[dict]) -> None:
    """A ``tool`` message must answer a call an earlier assistant message made."""
    seen: set[str] = set()
    for i, m in enumerate(raw):
        if m.get("role") == "assistant":
            for call in m.get("tool_calls") or []:
                if isinstance(call, dict) and isinstance(call.get("id"), str):
                    seen.add(call["id"])
        elif m.get("role") == "tool":
            call_id = m.get("tool_call_id")
            if call_id not in seen:
                raise ToolError(f"'messages[{i}].tool_call_id' {call_id!r} answers no earlier tool call", f"messages[{i}].tool_call_id")
            messages[i]["tool_call_id"] = call_id


def assistant_calls(raw: dict) -> list[dict] | None:
    """An assistant message's ``tool_calls`` for the template (arguments as objects)."""
    calls = []
    for call in raw.get("tool_calls") or []:
        fn = call.get("function", {}) if isinstance(call, dict) else {}
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            pass
        calls.append({"id": call.get("id"), "type": "function", "function": {"name": fn.get("name"), "arguments": args}})
    return calls or None


# -- forcing a call ------------------------------------------------------------------------


def call_grammar(spec: ToolSpec, schema_to_gbnf) -> str:
    """GBNF for one or more ``<tool_call>{...}</tool_call>`` with allowed names and arguments."""
    allowed = [t for t in spec.tools if spec.choice != "named" or t["function"]["name"] == spec.named]
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t["function"]["name"]}, "arguments": t["function"]["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in allowed
    ]
    schema = variants[0] if len(variants) == 1 else {"oneOf": variants}
    body = re.sub(r"^root ::=", "call ::=", schema_to_gbnf(schema), flags=re.M)
    one = f'"{OPEN}" call "{CLOSE}"'
    more = MAX_PARALLEL - 1 if spec.parallel and spec.choice != "named" else 0
    root = f"root ::= {one}" + (f' ("\\n" {one}){{0,{more}}}' if more else "")
    return body + "\n" + root + "\n"


# -- reading calls out of text ---------------------------------------------------------------


def parse_calls(text: str, spec: ToolSpec) -> tuple[str | None, list[dict]]:
    """Split model text into (content, tool_calls), OpenAI-shaped; unknown names stay text."""
    calls, kept = [], []
    last = 0
    for match in _CALL.finditer(text):
        call = _call(match.group(1), spec)
        if call is None:
            continue
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append(call)
        if not spec.parallel:
            break
    if not calls:
        return text, []
    tail = text[last:]
    unfinished = tail.find(OPEN)  # a call cut short (max_tokens): markup, never content
    kept.append(tail if unfinished < 0 else tail[:unfinished])
    content = "".join(kept).strip()
    return content or None, calls


def _call(payload: str, spec: ToolSpec) -> dict | None:
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in spec.names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    return {
        "id": "call_" + uuid.uuid4().hex[:24],
        "type": "function",
        "function": {"name": value["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


def might_open_call(text: str) -> int:
    """How many trailing characters of ``text`` could start ``<tool_call>`` (hold them back)."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


class ToolStream:
    """Streams a choice's content while holding back anything that may be a tool call.

    Text before ``<tool_call>`` goes out as content (a tail that could begin the marker is
    held); from the marker on everything is kept until the end, then parsed into calls.
    """

    def __init__(self, spec: ToolSpec):
        self.spec = spec
        self._text = ""
        self._sent = 0
        self._in_call = False

    def feed(self, piece: str) -> str:
        self._text += piece
        if self._in_call:
            return ""
        start = self._text.find(OPEN, self._sent)
        if start >= 0:
            self._in_call = True
            end = start
        else:
            end = len(self._text) - might_open_call(self._text)
        out, self._sent = self._text[self._sent : end], max(self._sent, end)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """Content not yet sent, and the calls (all in the held-back part)."""
        content, calls = parse_calls(self._text[self._sent :], self.spec)
        return (content or "").strip() if calls else self._text[self._sent :], calls
