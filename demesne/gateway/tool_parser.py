"""Reading tool calls out of a model's text as it streams, in any :mod:`.tool_formats` format.

:class:`CallParser` is fed text pieces and returns events: content that is certainly not a
call, a call's start (its name is known), and pieces of its arguments as the model writes
them. Text that might open a call is held back until it is known; markup never becomes
content. The non-streamed response is the same parser fed all at once, so both agree.

States::

    TEXT --opener--> WAIT --'{'--> OBJECT --object closes--> AFTER --separator--> WAIT
                                                              AFTER --closer--> TEXT

Inside an object the arguments stream as soon as ``{"name": "<allowed name>", "arguments":``
has been read; an object written in another key order is reported whole when it closes.
An object that is not a call to an allowed tool is given back as content, with the markup
that opened its run.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from .tool_formats import ToolFormat, prefix_re

WHITESPACE = " \t\n\r"
TEXT, WAIT, OBJECT, AFTER, DONE = range(5)
FULL, PARTIAL, NO = range(3)

# The head of a call whose arguments can stream: name first, then an arguments object.
_HEAD = re.compile(
    r'\{\s*(?:"type"\s*:\s*"function"\s*,\s*)?"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)'
)


# Mistral's newer calls: name[ARGS]{...}, perhaps with [CALL_ID]id before [ARGS].
_NAME = r"[A-Za-z0-9_.-]{1,64}"
_CALL_ID = r"(?:\[CALL_ID\][A-Za-z0-9]{0,64})?"
_NAMED_HEAD = re.compile(f"({_NAME}){_CALL_ID}\\[ARGS\\](?=\\{{)")
_NAMED_PREFIX = re.compile(f"{_NAME}{_CALL_ID}(?:{prefix_re('[CALL_ID]')}|{prefix_re('[ARGS]')})?")


@dataclass(slots=True)
class Call:
    id: str
    name: str
    arguments: str = ""  # JSON text, as streamed


@dataclass(slots=True)
class Events:
    """What one :meth:`CallParser.feed` found: content text, and in order the calls that
    began (``(index, None)``) and pieces of their arguments (``(index, text)``)."""

    content: str = ""
    calls: list[tuple[int, str | None]] = field(default_factory=list)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def match_parts(text: str, i: int, parts: tuple[str, ...]) -> tuple[int, int]:
    """Whether ``parts`` (whitespace allowed between them) appear at ``text[i:]``:
    (FULL, end), (PARTIAL, -1) if the text ends inside them, or (NO, -1)."""
    for k, part in enumerate(parts):
        if k:
            i = _skip_ws(text, i)
        seg = text[i : i + len(part)]
        if seg != part:
            return (PARTIAL, -1) if len(seg) < len(part) and part.startswith(seg) else (NO, -1)
        i += len(part)
    return FULL, i


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    return i


class CallParser:
    def __init__(self, fmt: ToolFormat, names: set[str], parallel: bool = True, no_content: bool = False):
        self.fmt = fmt
        self.names = names
        self.limit = fmt.max_calls if parallel else 1
        self.no_content = no_content  # everything is markup (a forced call): emit no content
        self._bare_opener = next((o for o in fmt.openers if o.start_only), None)
        self.calls: list[Call] = []
        self._text = ""
        self._state = TEXT
        self._sent = 0  # content emitted up to here
        self._pos = 0  # the scan position of the current state
        self._run = 0  # where the current run's opener began
        self._run_calls = 0  # calls made in the current run
        self._bare = False  # the current run has a zero-width opener (Llama's bare JSON)
        self._at_start = True  # nothing but whitespace so far
        # the object being read
        self._obj = 0
        self._braces = _Braces(0)
        self._arg_braces = _Braces(0)
        self._args = -1  # where its streamed arguments begin, once the head is read
        self._args_end = -1
        self._args_sent = 0
        self._call: Call | None = None

    # -- feeding ---------------------------------------------------------------------------

    def feed(self, piece: str) -> Events:
        self._text += piece
        out = Events()
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> Events:
        """The end of the reply: held text is resolved, a call cut short keeps what it has."""
        out = Events()
        while self._step(out, final=True):
            pass
        if self._state == TEXT:
            self._content(out, len(self._text))
        elif self._state == OBJECT and self._call is not None:
            self._stream_args(out)
        elif self._state in (WAIT, OBJECT) and self._bare and not self._run_calls:
            self._content(out, len(self._text))  # JSON that never became a call is the answer
        self._state = DONE
        return out

    def _content(self, out: Events, end: int) -> None:
        if end > self._sent:
            text = self._text[self._sent : end]
            if self._at_start and not text.strip():
                return  # whitespace before anything else: held until we know what follows
            if not self.no_content:
                out.content += text
            self._at_start = False
            self._sent = end

    def _step(self, out: Events, final: bool) -> bool:
        """Advance one state; False when it must wait for more text."""
        if self._state == TEXT:
            return self._scan_text(out, final)
        if self._state == WAIT:
            return self._scan_wait(out, final)
        if self._state == OBJECT:
            return self._scan_object(out)
        if self._state == AFTER:
            return self._scan_after(out, final)
        return False

    # -- TEXT: content until an opener ----------------------------------------------------

    def _scan_text(self, out: Events, final: bool) -> bool:
        text, i = self._text, self._pos
        if self._at_start and len(self.calls) < self.limit:
            j = _skip_ws(text, self._sent)
            if j == len(text) and not final:
                return False  # only whitespace so far
            if self._bare_opener is not None and j < len(text) and text[j] == "{":
                self._open_run(j, j, bare=True)
                return True
        while len(self.calls) < self.limit:
            start = self._next_candidate(i)
            if start < 0:
                break
            verdict, end = self._match_opener(start)
            if verdict == FULL:
                self._content(out, start)
                self._open_run(start, end, bare=False)
                return True
            if verdict == PARTIAL and not final:
                self._content(out, start)
                self._pos = start
                return False
            i = start + 1
        self._content(out, len(text))
        self._pos = len(text)
        return False

    def _next_candidate(self, i: int) -> int:
        found = [self._text.find(o.parts[0][0], i) for o in self.fmt.openers if o.parts]
        found = [f for f in found if f >= 0]
        return min(found) if found else -1

    def _match_opener(self, start: int) -> tuple[int, int]:
        best = (NO, -1)
        for opener in self.fmt.openers:
            if opener.parts:
                verdict, end = match_parts(self._text, start, opener.parts)
                if verdict == FULL:
                    return verdict, end
                if verdict == PARTIAL:
                    best = (PARTIAL, -1)
        return best

    def _open_run(self, start: int, end: int, bare: bool) -> None:
        self._state, self._run, self._pos, self._bare, self._run_calls = WAIT, start, end, bare, 0

    def _not_a_call(self) -> None:
        """The object just read is no call: the run ends before it, or is text after all."""
        if self._run_calls:
            self._state, self._pos, self._sent = TEXT, self._obj, self._obj
        else:
            self._give_back()

    def _give_back(self) -> None:
        """The run held no call after all: its text is content, scanned on from past the opener."""
        self._state, self._pos = TEXT, self._run + 1
        self._at_start = False

    # -- WAIT: an object must come next ------------------------------------------------------

    def _scan_wait(self, out: Events, final: bool) -> bool:
        j = _skip_ws(self._text, self._pos)
        if j == len(self._text):
            if final:  # an opener and nothing after it: markup, never content
                self._state, self._sent = TEXT, len(self._text)
            return final
        starts = _NAMED_PREFIX.match(self._text, j) if self.fmt.named_args else self._text[j] == "{"
        if not starts:
            if self._run_calls:  # the run ends here; what follows is content
                self._state, self._sent = TEXT, self._pos
            else:
                self._give_back()
            return True
        self._state, self._obj, self._pos = OBJECT, j, j
        self._braces = None if self.fmt.named_args else _Braces(j)  # name[ARGS]: after the head
        self._args, self._args_end, self._args_sent, self._call = -1, -1, 0, None
        return True

    # -- OBJECT: scan to its closing brace, streaming the arguments ------------------------

    def _scan_object(self, out: Events) -> bool:
        if self._braces is None:
            verdict = self._read_named_head(out)
            if verdict != FULL:
                if verdict == NO:
                    self._not_a_call()
                return verdict == NO
        closed = self._braces.advance(self._text, len(self._text))
        self._pos = self._braces.pos
        if self._args < 0:
            self._read_head(out)
        elif self._args_end < 0:
            self._args_end = self._arg_braces.advance(self._text, self._pos)
        if self._call is not None:
            self._stream_args(out)
        if closed >= 0:
            self._close_object(out)
            return True
        return False

    def _read_head(self, out: Events) -> None:
        head = _HEAD.match(self._text, self._obj, self._pos)
        if head is None:
            return
        try:
            name = json.loads('"' + head.group(1) + '"')
        except ValueError:
            name = None
        self._args = head.end()
        self._arg_braces = _Braces(self._args)
        self._args_end = self._arg_braces.advance(self._text, self._pos)
        if name in self.names:
            self._start_call(out, name)

    def _read_named_head(self, out: Events) -> int:
        """name[ARGS]: FULL once read (the arguments object is then scanned as the call),
        PARTIAL while the text may still become one, NO when it cannot."""
        head = _NAMED_HEAD.match(self._text, self._obj)
        if head is None:
            return PARTIAL if _NAMED_PREFIX.fullmatch(self._text, self._obj) else NO
        self._args = self._pos = head.end()
        self._braces, self._arg_braces = _Braces(self._args), _Braces(self._args)
        if head.group(1) in self.names:
            self._start_call(out, head.group(1))
        return FULL

    def _start_call(self, out: Events, name: str) -> None:
        self._call = Call(new_call_id(), name)
        self.calls.append(self._call)
        self._run_calls += 1
        out.calls.append((len(self.calls) - 1, None))
        self._sent = self._pos  # the markup so far is consumed

    def _stream_args(self, out: Events) -> None:
        end = self._args_end if self._args_end >= 0 else self._pos
        if end > self._args + self._args_sent:
            piece = self._text[self._args + self._args_sent : end]
            self._args_sent += len(piece)
            self._call.arguments += piece
            out.calls.append((len(self.calls) - 1, piece))

    def _close_object(self, out: Events) -> None:
        raw = self._text[self._obj : self._pos]
        if self._call is None:
            call = None if self.fmt.named_args else _whole_call(raw, self.names, self.fmt.args_key)
            if call is None:
                self._not_a_call()
                return
            name, arguments = call
            self._start_call(out, name)
            self._call.arguments = arguments
            out.calls.append((len(self.calls) - 1, arguments))
        self._sent = self._pos
        self._at_start = False
        self._state = AFTER if len(self.calls) < self.limit else DONE
        if self._state == DONE:
            self._sent = len(self._text)

    # -- AFTER: another call, or the end of the run -----------------------------------------

    def _scan_after(self, out: Events, final: bool) -> bool:
        j = _skip_ws(self._text, self._pos)
        if j == len(self._text) and not final:
            return False
        for sep in self.fmt.separators:
            verdict, end = match_parts(self._text, j, sep)
            if verdict == FULL:
                self._state, self._pos = WAIT, end
                return True
            if verdict == PARTIAL and not final:
                return False
        if self.fmt.closer:
            verdict, end = match_parts(self._text, j, self.fmt.closer)
            if verdict == PARTIAL and not final:
                return False
            if verdict == FULL:
                j = end
        self._state, self._pos, self._sent = TEXT, j, j  # the run's markup ends here
        return True


class _Braces:
    """Bracket matching over JSON text as it arrives (strings and escapes understood)."""

    __slots__ = ("pos", "depth", "in_string", "escape")

    def __init__(self, pos: int):
        self.pos, self.depth, self.in_string, self.escape = pos, 0, False, False

    def advance(self, text: str, stop: int) -> int:
        """Scan up to ``stop``; the index just past the bracket that closes the value, or -1."""
        depth, in_string, escape = self.depth, self.in_string, self.escape
        i, end = self.pos, -1
        while i < stop:
            ch = text[i]
            i += 1
            if in_string:
                if escape:
                    escape = False
                elif ch == "\\":
                    escape = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    end = i
                    break
        self.pos, self.depth, self.in_string, self.escape = i, depth, in_string, escape
        return end


def _whole_call(raw: str, names: set[str], args_key: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of a complete call object in any key order, or None."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # the model's text may nest as deep as it likes
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or value["name"] not in names:
        return None
    args = value.get(args_key, value.get("arguments", value.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return value["name"], json.dumps(args, ensure_ascii=False)
