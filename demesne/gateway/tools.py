"""Function calling: validating ``tools`` and ``tool_choice``, rendering tools and tool
messages for the chat template, the grammar that forces or guards a call, and turning the
model's text into OpenAI ``tool_calls``, whole or streamed.

The family-specific parts (markup, detection, grammar shape) are in :mod:`.tool_formats`;
the incremental parser is :mod:`.tool_parser`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .tool_formats import ToolFormat, grammar, short_id
from .tool_parser import Call, CallParser, Events

MAX_PARALLEL = 4  # calls one forced turn may hold
MAX_TOOLS = 128  # as OpenAI
MAX_ARGUMENTS_DEPTH = 64  # deeper call arguments in history stay text: nothing recurses that deep


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
    legacy: bool = False  # asked with functions/function_call: answer with message.function_call

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")


def parse_tools(body: dict) -> ToolSpec | None:
    """``tools``/``tool_choice``/``parallel_tool_calls``, or the legacy ``functions``/``function_call``."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    legacy = tools is None and body.get("functions") is not None
    if legacy:
        tools = [{"type": "function", "function": f} for f in _list(body["functions"], "functions", MAX_TOOLS)]
        asked = body.get("function_call")
        choice = {"type": "function", "function": asked} if isinstance(asked, dict) else asked
    if tools is None:
        if choice not in (None, "none"):
            raise ToolError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    tools = [_tool(t, i) for i, t in enumerate(_list(tools, "tools", MAX_TOOLS))]
    names: set[str] = set()
    for i, t in enumerate(tools):
        if t["function"]["name"] in names:
            raise ToolError(f"'tools[{i}].function.name' repeats {t['function']['name']!r}", f"tools[{i}].function.name")
        names.add(t["function"]["name"])
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ToolError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    spec = ToolSpec(tools, "auto", None, parallel and not legacy, names, legacy)  # legacy: one call
    if choice in (None, "auto", "none", "required"):
        spec.choice = choice or "auto"
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not isinstance(name, str):
            raise ToolError("'tool_choice.function.name' must be a string", "tool_choice.function.name")
        if name not in names:
            raise ToolError(f"'tool_choice' names {name!r}, which is not among the tools", "tool_choice")
        spec.choice, spec.named = "named", name
    else:
        raise ToolError("'tool_choice' must be none, auto, required or {type: function, function: {name}}", "tool_choice")
    return spec


def _list(value: Any, param: str, most: int) -> list:
    if not isinstance(value, list) or not value:
        raise ToolError(f"'{param}' must be a non-empty array", param)
    if len(value) > most:
        raise ToolError(f"'{param}' takes at most {most} entries, got {len(value)}", param)
    return value


def _tool(tool: Any, i: int) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
        raise ToolError(f"'{where}' must be {{type: function, function: {{...}}}}", where)
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ToolError(f"'{where}.function.name' must be 1-64 letters, digits, _ or -", f"{where}.function.name")
    for key, kind, what in (("description", str, "a string"), ("strict", bool, "a boolean")):
        if fn.get(key) is not None and not isinstance(fn[key], kind):
            raise ToolError(f"'{where}.function.{key}' must be {what}", f"{where}.function.{key}")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict) or params.get("type", "object") != "object" or not isinstance(params.get("properties", {}), dict):
        raise ToolError(f"'{where}.function.parameters' must be a JSON schema of type object", f"{where}.function.parameters")
    # Only the fields OpenAI defines go on to the template: nothing else a client sends is rendered.
    known = {key: fn[key] for key in ("name", "description", "strict") if fn.get(key) is not None}
    return {"type": "function", "function": {**known, "parameters": params}}


def legacy_history(messages: list) -> list:
    """The legacy function-calling turns as tool turns: an assistant ``function_call`` becomes
    one tool call (its id derived from the message's place, so a replay renders alike) and a
    ``function`` message answers the latest such call to that name."""
    out, open_calls = [], {}
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("function_call"), dict) and not m.get("tool_calls"):
            call_id = f"call_fn{i}"
            open_calls[_name(m["function_call"].get("name"), f"messages[{i}].function_call.name")] = call_id
            m = {**m, "tool_calls": [{"id": call_id, "type": "function", "function": m["function_call"]}]}
        elif isinstance(m, dict) and m.get("role") == "function":
            call_id = open_calls.pop(_name(m.get("name"), f"messages[{i}].name"), None)
            m = {"role": "tool", "content": m.get("content"), "tool_call_id": call_id}
        out.append(m)
    return out


def _name(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise ToolError(f"'{param}' must be a string", param)
    return value


def legacy_call(delta: dict) -> dict:
    """A streamed ``tool_calls`` entry as the legacy ``delta.function_call``."""
    fn = delta["function"]
    return {"name": fn["name"], "arguments": ""} if "id" in delta else {"arguments": fn["arguments"]}


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
            if call_id is not None and not isinstance(call_id, str):
                raise ToolError(f"'messages[{i}].tool_call_id' must be a string", f"messages[{i}].tool_call_id")
            if call_id not in seen:
                raise ToolError(f"'messages[{i}].tool_call_id' {call_id!r} answers no earlier tool call", f"messages[{i}].tool_call_id")
            messages[i]["tool_call_id"] = call_id


def assistant_calls(raw: dict, where: str) -> list[dict] | None:
    """An assistant message's ``tool_calls``, checked, for the template (arguments as objects)."""
    given = raw.get("tool_calls")
    if given is None:
        return None
    if not isinstance(given, list):
        raise ToolError(f"'{where}.tool_calls' must be an array", f"{where}.tool_calls")
    calls = []
    for j, call in enumerate(given):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function":
            raise ToolError(f"'{at}' must be {{id, type: function, function: {{name, arguments}}}}", at)
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise ToolError(f"'{at}.id' must be a non-empty string", f"{at}.id")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolError(f"'{at}.function.name' must be a non-empty string", f"{at}.function.name")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):  # OpenAI's shape: JSON text; templates want the object
            args = _arguments(args)
        elif json_depth(args) > MAX_ARGUMENTS_DEPTH:
            raise ToolError(f"'{at}.function.arguments' nests deeper than {MAX_ARGUMENTS_DEPTH} levels", f"{at}.function.arguments")
        calls.append({"id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return calls or None


def _arguments(text: str) -> Any:
    """Call arguments as the template wants them: the object the JSON text holds, or the text
    as it was when it is no JSON (a call cut short) or nests too deep to render safely."""
    if not text.strip():
        return {}
    if _nests_too_deep(text):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


def _nests_too_deep(text: str) -> bool:
    """Whether the brackets of JSON text nest deeper than MAX_ARGUMENTS_DEPTH (strings
    skipped), found without recursing."""
    if text.count("[") + text.count("{") <= MAX_ARGUMENTS_DEPTH:
        return False  # the common case, at no cost
    depth = 0
    for ch in re.findall(r"[\[\]{}]", _JSON_STRING.sub("", text)):
        depth = depth + 1 if ch in "[{" else depth - 1
        if depth > MAX_ARGUMENTS_DEPTH:
            return True
    return False


def json_depth(value: Any) -> int:
    """How deep a parsed JSON value nests (a scalar is 0), without recursing."""
    most, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        most = max(most, depth)
        stack.extend((child, depth + 1) for child in node)
    return most


# -- rendering for the chat template --------------------------------------------------------


def template_messages(messages: list[dict], tools: list[dict] | None, fmt: ToolFormat, native: bool) -> list[dict]:
    """The conversation as the chat template should see it.

    ``native``: the template renders ``tools``, ``tool_calls`` and ``tool`` messages itself;
    only call ids change where the family demands short ones (Mistral). Otherwise the tools
    (if offered) are described in the system prompt in ``fmt``'s markup, earlier calls are
    written into their assistant turns the same way, and tool results become user turns
    (merged with a neighbouring user turn, for templates that insist on alternation).
    """
    if native:
        return [_short_ids(m) for m in messages] if fmt.short_ids else messages
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = write_calls(fmt, [(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]])
            m = {"role": "assistant", "content": (content + "\n" if content else "") + calls}
        elif role == "tool":
            m = {"role": "user", "content": f"Tool result ({_call_name(messages, m)}): {content}"}
        else:
            m = {"role": role, "content": content}
        if out and out[-1]["role"] == m["role"] and m["role"] in ("system", "user"):
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(m)
    if not tools:
        return out
    described = describe_tools(tools, fmt)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + described}
    else:
        out.insert(0, {"role": "system", "content": described})
    return out


def describe_tools(tools: list[dict], fmt: ToolFormat) -> str:
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    example = write_calls(fmt, [("<function name>", "<arguments object>")], literal_args=True)
    return (
        f"You can call these functions:\n{listing}\n"
        f"To call one, answer with {example}"
        + (" (several calls go in one answer)." if fmt.max_calls > 1 else ".")
    )


def write_calls(fmt: ToolFormat, calls: list[tuple[str, Any]], literal_args: bool = False) -> str:
    """Calls in ``fmt``'s markup, as the model is asked to write them."""
    if fmt.named_args:  # [TOOL_CALLS]name[ARGS]{...} for each call
        opener = fmt.openers[0].parts[0]
        return "".join(f"{opener}{name}[ARGS]{args if literal_args else json.dumps(args, ensure_ascii=False)}" for name, args in calls)
    objects = []
    for name, args in calls:
        if literal_args:  # the placeholder in the instructions
            objects.append(f'{{"name": "{name}", "{fmt.args_key}": {args}}}')
        else:
            objects.append(json.dumps({"name": name, fmt.args_key: args}, ensure_ascii=False))
    return _written(fmt.openers[0].parts) + _written(fmt.separators[0]).join(objects) + _written(fmt.closer)


def _written(parts: tuple[str, ...]) -> str:
    return "".join(p + " " if p in (":", ",") else p for p in parts)


def _call_name(messages: list[dict], tool_message: dict) -> str:
    for m in messages:
        for call in m.get("tool_calls") or []:
            if call.get("id") == tool_message.get("tool_call_id"):
                return call["function"]["name"]
    return "tool"


def _short_ids(m: dict) -> dict:
    if m.get("tool_calls"):
        m = {**m, "tool_calls": [{**c, "id": short_id(c["id"] or "")} for c in m["tool_calls"]]}
    if m.get("tool_call_id"):
        m = {**m, "tool_call_id": short_id(m["tool_call_id"])}
    return m


# -- constraining decoding ------------------------------------------------------------------


def call_constraint(spec: ToolSpec, fmt: ToolFormat, one_token: Callable[[str], int | None] = lambda text: None) -> tuple[str, bool]:
    """(grammar, lazy) for a request: ``required`` or a named tool forces a call from the
    first token; ``auto`` lets the model write text until it opens a call, then keeps the
    call valid (lazy). A forced call's schemas are enforced strictly (a keyword llguidance
    cannot enforce is refused, naming it); a call the model merely may make ignores such
    keywords rather than refuse the request. ``one_token(text)``: the token id if the
    vocabulary has the text as one token (that marker may be written as the token)."""
    allowed = [t for t in spec.tools if spec.choice != "named" or t["function"]["name"] == spec.named]
    most = MAX_PARALLEL if spec.parallel and spec.choice != "named" else 1
    lazy = not spec.forced
    return grammar(fmt, allowed, most, lazy=lazy, strict=spec.forced, one_token=one_token), lazy


# -- reading calls out of the model's text ----------------------------------------------------


def parse_calls(text: str, spec: ToolSpec, fmt: ToolFormat) -> tuple[str | None, list[dict]]:
    """Split a whole reply into (content, tool_calls), OpenAI-shaped; unknown names stay text."""
    parser = _parser(spec, fmt)
    content = parser.feed(text).content + parser.finish().content
    calls = [_call_json(c) for c in parser.calls]
    if calls or spec.forced:
        return content.strip() or None, calls
    return content, []


def _parser(spec: ToolSpec, fmt: ToolFormat) -> CallParser:
    # A forced call's grammar allows nothing but markup: no content, even cut short.
    return CallParser(fmt, spec.names, spec.parallel, no_content=spec.forced)


def _call_json(call: Call) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


class ToolStream:
    """One streamed choice: content deltas, and ``delta.tool_calls`` entries as OpenAI sends
    them (the first with ``index``, ``id``, ``type`` and ``function.name``, then
    ``function.arguments`` in pieces)."""

    def __init__(self, spec: ToolSpec, fmt: ToolFormat):
        self._parser = _parser(spec, fmt)

    @property
    def called(self) -> bool:
        return bool(self._parser.calls)

    def feed(self, piece: str) -> tuple[str, list[dict]]:
        return self._deltas(self._parser.feed(piece))

    def finish(self) -> tuple[str, list[dict]]:
        return self._deltas(self._parser.finish())

    def _deltas(self, events: Events) -> tuple[str, list[dict]]:
        deltas = []
        for i, piece in events.calls:
            if piece is None:
                call = self._parser.calls[i]
                deltas.append({"index": i, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}})
            else:
                deltas.append({"index": i, "function": {"arguments": piece}})
        return events.content, deltas
