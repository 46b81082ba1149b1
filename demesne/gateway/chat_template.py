"""The model's Jinja chat template, rendered in a sandbox; the built-in fallback; overrides.

Client text stays text: :class:`ClientText` marks control-token text that a client wrote
(``<start_of_turn>`` in a message) so that it is tokenized as plain text, and only the
template's own markup becomes control tokens.

Precedence: ``--chat-template FILE``, then the GGUF's ``tokenizer.chat_template``, then
:data:`FALLBACK_TEMPLATE` for base models that have none (the bundled Gemma 3 270M). The
template sees what Hugging Face passes: ``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``, ``tools``, ``raise_exception``, and ``strftime_now``.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import secrets
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tool_formats import supports_tools

log = logging.getLogger("demesne.gateway")

# A plain transcript, which base models continue sensibly:
#
#     <bos>{system}\n\nUser: {user}\nAssistant: {assistant}\n ... Assistant:
#
# It knows nothing of tools: like any template that never reads ``tools``, it is given them
# described in a system turn, in the generic format (tools.template_messages).
#
# A base model will happily write the user's next turn as well, so this template comes
# with the stop string "\nUser:" (added to each chat request that uses it). The model writes
# a space after "Assistant:"; the reply is stripped of it.
FALLBACK_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message.role == 'system' %}{{ message.content }}\n\n"
    "{% elif message.role == 'user' %}User: {{ message.content }}\n"
    "{% elif message.role == 'assistant' %}Assistant: {{ message.content }}\n"
    "{% elif message.role == 'tool' %}Tool result: {{ message.content }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_STOPS = ("\nUser:",)


class TemplateError(ValueError):
    """The template refused the conversation (``raise_exception``) or failed to render."""


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False) -> str:
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(
        self, source: str, bos_token: str, eos_token: str, origin: str, stops: tuple[str, ...] = (), strip_reply: bool = False
    ):
        # As Hugging Face renders templates: loop controls on, its own tojson.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the chat template ({origin}) does not compile: {exc}") from exc
        self.source = source
        self.supports_tools = supports_tools(source)  # it renders tools and tool messages itself
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.origin = origin  # "file PATH", "model", or "built-in fallback"
        self.stops = stops
        self.strip_reply = strip_reply  # replies start with whitespace the prompt implies (fallback)

    @classmethod
    def select(cls, override_path: str | None, model_template: str | None, bos: str, eos: str) -> ChatTemplate:
        if override_path:
            with open(override_path, encoding="utf-8") as f:
                template = cls(f.read(), bos, eos, f"file {override_path}")
        elif model_template:
            template = cls(model_template, bos, eos, "the model's tokenizer.chat_template")
        else:
            template = cls(FALLBACK_TEMPLATE, bos, eos, "the built-in fallback (the model has none)", FALLBACK_STOPS, strip_reply=True)
        log.info("chat template: %s", template.origin)
        return template

    def render(
        self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True, extra: dict | None = None
    ) -> str:
        """``extra``: more template variables (a request's ``chat_template_kwargs``, e.g.
        ``enable_thinking``); they cannot replace the ones set here."""
        try:
            return self._template.render(
                **(extra or {}),
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError:
            raise
        except Exception as exc:  # the template is code from the model file: any failure is its own
            raise TemplateError(f"the chat template failed: {exc}") from exc


class ClientText:
    """Keeps control-token text that a client wrote from becoming control tokens.

    :meth:`shield` replaces every control-token text inside client strings (message
    content, names, tool arguments, tool schemas: any string, keys too) with a sentinel of
    lowercase letters and digits, which the template renders like any word (trim, tojson
    and escape leave it alone). :meth:`segments` cuts the rendered prompt at the sentinels:
    the template's text is tokenized with special-token parsing on, the client's control-token
    text with it off (``Tokenizer.encode_segments``). A conversation without such text is one
    markup segment, tokenized exactly as before.

    Each segment is tokenized on its own: tokens never merge across a sentinel's edges, and a
    vocabulary that adds a space prefix (older SentencePiece ones) adds it to each segment.
    Control-token text that only appears by joining two client strings the template writes
    side by side, with nothing between, is not caught.
    """

    def __init__(self, control: re.Pattern | None):
        self._control = control
        self._nonce = secrets.token_hex(8)
        self._sentinel = re.compile(f"dmsn{self._nonce}n(\\d+)z")
        self.literals: list[str] = []

    def shield(self, value: Any) -> Any:
        """``value`` (a string, or lists and dicts of them) with control-token text replaced."""
        if self._control is None:
            return value
        if isinstance(value, str):
            return self._control.sub(self._mark, value)
        if isinstance(value, dict):
            return {self.shield(k): self.shield(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.shield(v) for v in value]
        return value

    def _mark(self, match: re.Match) -> str:
        self.literals.append(match.group(0))
        return f"dmsn{self._nonce}n{len(self.literals) - 1}z"

    def segments(self, rendered: str) -> list[tuple[str, bool]]:
        """``rendered`` as ``(text, markup)`` segments: client control-token text is not markup."""
        if not self.literals:
            return [(rendered, True)]
        out: list[tuple[str, bool]] = []
        at = 0
        for match in self._sentinel.finditer(rendered):
            out.append((rendered[at : match.start()], True))
            out.append((self.literals[int(match.group(1))], False))
            at = match.end()
        out.append((rendered[at:], True))
        return [(text, markup) for text, markup in out if text]
