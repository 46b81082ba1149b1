"""Reasoning output split from the reply: thinking models (Qwen 3, DeepSeek R1, QwQ...) write
their reasoning between ``<think>`` and ``</think>`` before the answer, and clients expect it
apart (``reasoning_content`` on chat, a reasoning item on Responses, a ``thinking`` block on
Messages) so that only the answer is shown, parsed for tool calls, or sent back.

``--reasoning-format``: ``auto`` splits for models whose chat template writes ``<think>``,
``deepseek`` always, ``none`` never (the markup stays in the content). Some templates open
the block in the prompt (DeepSeek R1's generation prompt ends with ``<think>``): the reply then
starts inside it, which :func:`splitter` sees from the rendered prompt.
"""

from __future__ import annotations

import dataclasses

from .generation import Piece

OPEN, CLOSE = "<think>", "</think>"
REASONING_FORMATS = ("auto", "deepseek", "none")


def template_thinks(source: str) -> bool:
    return OPEN in source or CLOSE in source


def opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt leaves a ``<think>`` block open for the reply."""
    tail = prompt.rstrip()
    return tail.endswith(OPEN)


def splitter(fmt: str, template_source: str, inside: bool) -> ThinkSplitter | None:
    """The splitter for one reply, or None when its reasoning is not split. ``inside``: the
    prompt opened the block (:func:`opens_thinking`)."""
    if fmt == "none" or (fmt == "auto" and not template_thinks(template_source)):
        return None
    return ThinkSplitter(inside)


def _partial(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkSplitter:
    """Streamed text in, (reasoning, content) pieces out, whatever the chunk boundaries.

    Before the answer, leading whitespace is held until it is known whether a ``<think>``
    follows. One block is split: the first ``<think>`` ... ``</think>`` (or, ``inside``, up to
    the first ``</think>``); the whitespace after it is dropped; later tags are content. A
    reply cut off inside the block has all its text as reasoning."""

    def __init__(self, inside: bool = False):
        self.state = "inside" if inside else "start"  # start -> inside -> after -> content
        self.held = ""
        self.reasoning_seen = False

    def feed(self, text: str) -> tuple[str, str]:
        buf, self.held = self.held + text, ""
        reasoning, content = [], []
        while buf:
            if self.state == "start":
                stripped = buf.lstrip()
                if not stripped:
                    self.held = buf
                    break
                if stripped.startswith(OPEN):
                    self.state, buf = "inside", stripped[len(OPEN):]
                    self.reasoning_seen = True
                elif OPEN.startswith(stripped):
                    self.held = buf  # maybe the tag, not complete yet
                    break
                else:
                    self.state = "content"
            elif self.state == "inside":
                self.reasoning_seen = True
                at = buf.find(CLOSE)
                if at >= 0:
                    reasoning.append(buf[:at])
                    self.state, buf = "after", buf[at + len(CLOSE):]
                else:
                    keep = _partial(buf, CLOSE)
                    reasoning.append(buf[: len(buf) - keep])
                    self.held = buf[len(buf) - keep:]
                    break
            elif self.state == "after":
                stripped = buf.lstrip()
                if stripped:
                    self.state, buf = "content", stripped
                else:
                    break
            else:
                content.append(buf)
                break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """What is held at the end of the reply."""
        held, self.held = self.held, ""
        if self.state == "inside":
            return held, ""  # cut off while reasoning (a partial "</think>" is reasoning text)
        if self.state == "after":
            return "", ""  # whitespace after the block
        return "", held  # a reply of whitespace, or "<thi" that never became the tag


CLOSING = "\n" + CLOSE + "\n\n"  # what ends a block cut at its budget


async def budgeted(make, prompt: list[int], max_tokens: int, budget: int, encode, inside: bool):
    """One choice's pieces, its reasoning held to ``budget`` tokens.

    ``make(tokens, n)`` starts an engine request (generation.generate_text) and returns its
    pieces. When the reply is still inside its ``<think>`` block after ``budget`` tokens, that
    request is closed (the engine aborts it) and a second one continues from the prompt, the
    reasoning so far and a closing ``</think>`` (``encode(reasoning_text)`` gives its tokens),
    so the model answers; the prefix cache holds the prompt. The pieces read as one reply:
    the closing tag is in the text, usage counts the original prompt and every output token.
    A budget of 0 closes a block the prompt opened before anything is generated."""
    split = ThinkSplitter(inside)
    raw: list[str] = []
    first: Piece | None = None
    if not (budget == 0 and inside):
        stream = make(prompt, max_tokens)
        try:
            async for piece in stream:
                first = first or piece
                raw.append(piece.text)
                split.feed(piece.text)
                cut = piece.finish is None and split.state == "inside" and piece.completion_tokens >= budget
                if not cut:
                    yield piece
                    if piece.finish is not None:
                        return
                    continue
                used = piece.completion_tokens
                yield dataclasses.replace(piece, text=piece.text + CLOSING)
                break
            else:
                return
        finally:
            await stream.aclose()
    else:
        used = 0
    left = max_tokens - used
    continuation = prompt + encode("".join(raw) + CLOSING)
    if left <= 0:
        yield Piece("", "length", len(prompt), used, first.cached_tokens if first else 0)
        return
    async for piece in make(continuation, left):
        yield dataclasses.replace(
            piece, prompt_tokens=len(prompt), completion_tokens=used + piece.completion_tokens,
            cached_tokens=first.cached_tokens if first else piece.cached_tokens,
        )
