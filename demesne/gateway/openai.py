"""The OpenAI API surface: request validation into one typed request, and response shapes.

Every error a client can cause is an :class:`ApiError`, which the error middleware turns
into ``{"error": {"message", "type", "param", "code"}}`` with its status.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..protocol import INT64, MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY, SamplingParams
from .errors import bad
from .schemas import check_schema
from .structured import output_grammar
from .tools import ToolError, ToolSpec, assistant_calls, check_tool_messages, legacy_call, legacy_history, parse_tools

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1024  # each stop string; the stop matcher holds back this much text
MAX_INT = 2**31 - 1  # top_k, max_tokens: more than any vocabulary or context
MAX_CHOICES = 16
MAX_BATCH_CHOICES = 64  # completions: prompts times n
MAX_LOGIT_BIAS = 1024
MAX_TOP_LOGPROBS = 20  # chat, as OpenAI
MAX_COMPLETION_LOGPROBS = 20  # OpenAI allows 5 here; demesne as many as chat
ROLES = ("system", "developer", "user", "assistant", "tool")

@dataclass(slots=True)
class CompletionRequest:
    """A validated request of either endpoint, before its prompt is tokenized."""

    chat: bool
    model: str
    messages: list[dict] | None  # chat
    prompt: str | list[int] | None  # completions: text or token ids (the first of a batch)
    max_tokens: int | None
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    tools: ToolSpec | None = None
    prompts: list | None = None  # completions: every prompt of a batch; each gets n choices
    template_kwargs: dict | None = None  # chat: more chat template variables (chat_template_kwargs)
    thinking_open: bool = False  # chat: the rendered prompt leaves a <think> block open (set when rendered)
    reasoning_budget: int | None = None  # chat: most tokens a <think> block may take (reasoning_budget)


# -- field checks ------------------------------------------------------------------------


def _typed(body: dict, name: str, types: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python; a JSON true is never a valid number here.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise bad(f"'{name}' must be of type {_type_name(types)}", name, "invalid_type")
    if not isinstance(value, types):
        raise bad(f"'{name}' must be of type {_type_name(types)}", name, "invalid_type")
    return value


def _type_name(types) -> str:
    names = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = _typed(body, name, (int, float), default)
    # Compared before float(): an integer too big for a float is out of range, not an error.
    if value != value or value > hi or value < lo or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise bad(f"'{name}' must be in {bracket}{lo:g}, {hi:g}], got {_shown(value)}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = _typed(body, name, int, default)
    if value is not None and not lo <= value <= hi:
        raise bad(f"'{name}' must be in [{lo}, {hi}], got {_shown(value)}", name)
    return value


def _shown(value: int | float) -> str:
    """A number for an error message; a huge integer by its size (str() refuses past 4,300 digits)."""
    if isinstance(value, int) and abs(value) >= 10**20:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


def _max_tokens(body: dict) -> int | None:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _integer(body, name, None, 1, MAX_INT)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("'stop' must be a string or an array of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise bad(f"each 'stop' string may be at most {MAX_STOP_CHARS} characters long", "stop")
    return [s for s in stop if s]


def _sampling(body: dict) -> SamplingParams:
    return SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_integer(body, "top_k", 0, 0, MAX_INT),  # and at most the vocabulary, once the model is known
        seed=_integer(body, "seed", None, -INT64, INT64 - 1),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        # Down to 0.01: a repeated token's logit is divided by it, and 5e-324 made it infinite.
        repetition_penalty=_number(body, "repetition_penalty", 1.0, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY),
        logit_bias=_logit_bias(body),
        ignore_eos=_typed(body, "ignore_eos", bool, False),  # llama-server's and vLLM's extension
        **_grammar(body),
    )


def _grammar(body: dict) -> dict:
    made = output_grammar(body)
    return {} if made is None else {"grammar": made[0], "grammar_param": made[1]}


def _logit_bias(body: dict) -> list[list[float]] | None:
    """``{"token id": bias}`` as OpenAI takes it; ids are checked against the vocabulary later."""
    bias = _typed(body, "logit_bias", dict)
    if not bias:
        return None
    if len(bias) > MAX_LOGIT_BIAS:
        raise bad(f"'logit_bias' takes at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}", "logit_bias")
    pairs = []
    for key, value in bias.items():
        # ASCII digits only: int() would also take "²" (and fail on it) or "٣", and " 5".
        if not _TOKEN_ID.fullmatch(key) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("'logit_bias' maps token ids (as decimal strings) to numbers", "logit_bias", "invalid_type")
        if not -100 <= value <= 100:
            raise bad(f"'logit_bias' values must be in [-100, 100], got {_shown(value)} for token {key}", "logit_bias")
        pairs.append([int(key), float(value)])
    return pairs


_TOKEN_ID = re.compile(r"-?[0-9]{1,10}")


def _common(body: dict, chat: bool) -> dict[str, Any]:
    model = _typed(body, "model", str)
    if not model:
        raise bad("'model' is required", "model", "missing_required_parameter")
    n = _integer(body, "n", 1, 1, MAX_CHOICES)
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, {})
    include_usage = bool(_typed(options, "include_usage", bool, False)) if options else False
    if options and not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    _typed(body, "user", str)
    return dict(
        chat=chat,
        model=model,
        max_tokens=_max_tokens(body),
        params=_sampling(body),
        stop=_stop(body),
        stream=stream,
        include_usage=include_usage,
        n=n,
    )


# -- the two endpoints ---------------------------------------------------------------------


def parse_chat(body: Any) -> CompletionRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array", "messages", "invalid_type" if messages else "missing_required_parameter")
    try:
        messages = legacy_history(messages)
    except ToolError as exc:
        raise bad(str(exc), exc.param) from None
    clean = [_message(m, i) for i, m in enumerate(messages)]
    req = CompletionRequest(messages=clean, prompt=None, **_common(body, chat=True))
    req.template_kwargs = _template_kwargs(body)
    req.reasoning_budget = _integer(body, "reasoning_budget", None, 0, MAX_INT)
    if req.reasoning_budget is not None and _typed(body, "logprobs", bool, False):
        raise bad("'reasoning_budget' and 'logprobs' cannot be combined", "reasoning_budget")
    try:
        req.tools = parse_tools(body)
        check_tool_messages(clean, messages)
    except ToolError as exc:
        raise bad(str(exc), exc.param) from None
    for i, tool in enumerate(req.tools.tools if req.tools else ()):
        where = "functions" if req.tools.legacy else "tools"
        check_schema(tool["function"]["parameters"], f"{where}[{i}].function.parameters")
    if req.tools is not None and req.tools.forced and req.params.grammar:
        field = req.params.grammar_param.split(".")[0]
        raise bad(f"a forced tool call and '{field}' cannot be combined", field)
    top = _typed(body, "top_logprobs", int)
    if _typed(body, "logprobs", bool, False):
        top = 0 if top is None else top
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise bad(f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {_shown(top)}", "top_logprobs")
        req.params.logprobs = top
    elif top is not None:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return req


_RESERVED_TEMPLATE_VARS = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})
MAX_TEMPLATE_KWARGS = 32


def _template_kwargs(body: dict) -> dict | None:
    """``chat_template_kwargs`` (as vLLM and llama-server take it): more variables for the
    chat template, e.g. ``{"enable_thinking": false}``."""
    kw = _typed(body, "chat_template_kwargs", dict)
    if kw is None:
        return None
    if len(kw) > MAX_TEMPLATE_KWARGS:
        raise bad(f"'chat_template_kwargs' takes at most {MAX_TEMPLATE_KWARGS} variables", "chat_template_kwargs")
    for key in kw:
        if not key.isidentifier() or key in _RESERVED_TEMPLATE_VARS:
            raise bad(f"'chat_template_kwargs' may not set {key!r}", "chat_template_kwargs")
    return kw


def _message(m: Any, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(f"'{where}' must be an object", where, "invalid_type")
    role = m.get("role")
    if role not in ROLES:
        raise bad(f"'{where}.role' must be one of {', '.join(ROLES)}; got {role!r}", f"{where}.role")
    content = _content(m.get("content"), f"{where}.content", allow_null=role == "assistant")
    out = {"role": "system" if role == "developer" else role, "content": content}
    if role == "assistant" and m.get("tool_calls") is not None:
        try:
            calls = assistant_calls(m, where)
        except ToolError as exc:
            raise bad(str(exc), exc.param) from None
        if calls:
            out["tool_calls"] = calls
    name = m.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise bad(f"'{where}.name' must be a string", f"{where}.name", "invalid_type")
        out["name"] = name
    return out


def _content(content: Any, where: str, allow_null: bool) -> str:
    if content is None and allow_null:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("image_url", "input_audio", "file"):
                raise bad(f"'{where}[{j}]': this model takes text only, not {kind}", f"{where}[{j}]", "unsupported_content")
            else:
                raise bad(f"'{where}[{j}]' must be a text part", f"{where}[{j}]", "invalid_type")
        return "".join(texts)
    raise bad(f"'{where}' must be a string or an array of content parts", where, "invalid_type")


def parse_completion(body: Any) -> CompletionRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    prompts = _prompts(body.get("prompt"))
    if body.get("echo"):
        raise bad("'echo' is not supported", "echo", "unsupported_value")
    if body.get("suffix"):
        raise bad("'suffix' is not supported", "suffix", "unsupported_value")
    req = CompletionRequest(messages=None, prompt=prompts[0], prompts=prompts, **_common(body, chat=False))
    if len(prompts) * req.n > MAX_BATCH_CHOICES:
        raise bad(f"'n' times the number of prompts may be at most {MAX_BATCH_CHOICES}, got {len(prompts) * req.n}", "n")
    logprobs = _typed(body, "logprobs", int)
    if logprobs is not None:
        if not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
            raise bad(f"'logprobs' must be in [0, {MAX_COMPLETION_LOGPROBS}], got {_shown(logprobs)}", "logprobs")
        req.params.logprobs = logprobs
    return req


def _prompts(prompt: Any) -> list:
    """Every prompt of a request: a string, token ids, or (the batch form) an array of either."""
    batch = prompt if isinstance(prompt, list) and prompt and all(isinstance(x, (str, list)) for x in prompt) else [prompt]
    if len(batch) > MAX_BATCH_CHOICES:
        raise bad(f"'prompt' holds at most {MAX_BATCH_CHOICES} prompts, got {len(batch)}", "prompt")
    for one in batch:
        if isinstance(one, list) and one and all(isinstance(t, int) and not isinstance(t, bool) for t in one):
            continue  # token ids
        if not isinstance(one, str):
            raise bad("'prompt' must be a string, an array of token ids, or an array of either", "prompt", "invalid_type")
    return batch


# -- responses -------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass(slots=True)
class Shaper:
    """Builds the response objects and stream chunks of one request."""

    chat: bool
    model: str
    fingerprint: str
    id: str = ""
    created: int = 0
    legacy: bool = False  # asked with functions: calls go out as function_call

    def __post_init__(self) -> None:
        self.id = self.id or new_id(self.chat)
        self.created = self.created or int(time.time())

    def _envelope(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint}

    def _finish(self, finish: str | None) -> str | None:
        return "function_call" if self.legacy and finish == "tool_calls" else finish

    def choice(
        self, index: int, text: str | None, finish: str, logprobs: dict | None = None, tool_calls: list | None = None,
        reasoning: str | None = None,
    ) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            if reasoning:
                message["reasoning_content"] = reasoning
            if tool_calls and self.legacy:  # the one call as function_call
                message["function_call"] = tool_calls[0]["function"]
            elif tool_calls:
                message["tool_calls"] = tool_calls
            finish = self._finish(finish)
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def response(self, choices: list[dict], use: dict) -> dict:
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._envelope(obj), "choices": choices, "usage": use}

    def chunk(
        self,
        index: int,
        text: str | None,
        finish: str | None = None,
        first: bool = False,
        with_usage: bool = False,
        logprobs: dict | None = None,
        tool_calls: list | None = None,
        reasoning: str | None = None,
    ) -> dict:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if reasoning:
                delta["reasoning_content"] = reasoning
            if text is not None:
                delta["content"] = text
            if tool_calls and self.legacy:
                delta["function_call"] = legacy_call(tool_calls[0])
            elif tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": self._finish(finish)}
            body = {**self._envelope("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            body = {**self._envelope("text_completion"), "choices": [choice]}
        if with_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, use: dict) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(obj), "choices": [], "usage": use}

