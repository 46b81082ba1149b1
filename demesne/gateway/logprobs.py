"""The ``logprobs`` objects of both endpoints, built from the engine's per-token entries and
released in step with the text they stand for."""

from __future__ import annotations

from .generation import Piece
from .tokenizer import Tokenizer

# A token the sampler could not pick (a grammar forbade it, or a penalty left it no
# probability) has logprob -inf, which JSON cannot carry: the engine's frame brings it as
# null. It goes out as OpenAI writes such a token, -9999.0, never as null.
IMPOSSIBLE = -9999.0


def _lp(logprob: float | None) -> float:
    return IMPOSSIBLE if logprob is None or logprob < IMPOSSIBLE else logprob


def completion_logprobs(pieces: list[str], entries: list, top_text, offset: int) -> dict:
    """The completions endpoint's ``logprobs`` object for some generated tokens.

    ``pieces`` are the tokens' texts, ``entries`` the engine's ``[logprob, [[id, lp]...]]``
    per token, ``top_text(id)`` a token's text, ``offset`` the text length before them.
    """
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    return {
        "tokens": pieces,
        "token_logprobs": [_lp(e[0]) for e in entries],
        "top_logprobs": [{top_text(i): _lp(lp) for i, lp in e[1]} for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(pieces: list[bytes], entries: list, top_bytes) -> dict:
    """The chat endpoint's ``logprobs`` object: ``content`` with, per token, its text, bytes,
    logprob and ``top_logprobs``. ``top_bytes(id)`` gives a token's bytes."""

    def item(raw: bytes, logprob: float) -> dict:
        return {"token": raw.decode("utf-8", "replace"), "logprob": _lp(logprob), "bytes": list(raw)}

    content = []
    for raw, (logprob, top) in zip(pieces, entries):
        content.append({**item(raw, logprob), "top_logprobs": [item(top_bytes(i), lp) for i, lp in top]})
    return {"content": content, "refusal": None}


class LogprobShaper:
    """Turns the engine's per-token logprobs into either endpoint's ``logprobs`` object.

    A token's entry goes out with the text it stands for: entries wait while the stop-string
    matcher holds their text back, and those of a stop string (and anything after it) are
    dropped, as OpenAI leaves them out. Whitespace stripped from the start of a reply is taken
    off its tokens too: the tokens spell exactly the content."""

    def __init__(self, tokenizer: Tokenizer, chat: bool):
        self._tokenizer = tokenizer
        self._chat = chat
        self._offset = 0  # characters of token text so far (completions' text_offset)
        self._end = 0  # bytes of token text so far
        self._starts: list[int] = []  # byte offset of each waiting entry
        self._lead = 0  # leading bytes stripped from the content, and so from the tokens
        if chat:
            self.total: dict = {"content": [], "refusal": None}
            self._waiting: dict = {"content": []}
        else:
            self.total = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            self._waiting = {key: [] for key in self.total}

    def _strip(self, n: int) -> None:
        """Take the whitespace the reply lost off its first tokens, so that the tokens spell
        the content exactly (a token that was only that whitespace keeps its entry, empty).
        Entries wait while the stripping may go on, so these are all still waiting."""
        self._lead += n
        for entry in self._waiting["content"] if self._chat else ():
            if not n:
                break
            cut = min(n, len(entry["bytes"]))
            entry["bytes"] = entry["bytes"][cut:]
            entry["token"] = bytes(entry["bytes"]).decode("utf-8", "replace")
            n -= cut

    def _text(self, token: int) -> str:
        return self._tokenizer.piece(token).decode("utf-8", "replace")

    def add(self, piece: Piece) -> dict | None:
        """The entries this piece's text releases (None if there are none)."""
        if piece.tokens is not None:
            raw = [self._tokenizer.piece(t) for t in piece.tokens]
            if self._chat:
                part = chat_logprobs(raw, piece.logprobs, self._tokenizer.piece)
            else:
                texts = [self._text(t) for t in piece.tokens]
                part = completion_logprobs(texts, piece.logprobs, self._text, self._offset)
                self._offset += sum(len(t) for t in texts)
            for key in self._waiting:
                self._waiting[key].extend(part[key])
            for b in raw:
                self._starts.append(self._end)
                self._end += len(b)
        if piece.lead is None:  # leading whitespace, maybe more to come: no content yet
            return None
        if piece.lead > self._lead:
            self._strip(piece.lead - self._lead)
        ready = sum(1 for start in self._starts if start < piece.released)
        if piece.finish is not None:  # what is still waiting belongs to a stop string
            self._starts = self._starts[:ready]
        if not ready:
            return None
        out = {key: values[:ready] for key, values in self._waiting.items()}
        for key, values in self._waiting.items():
            del values[:ready]
            self.total[key].extend(out[key])
        del self._starts[:ready]
        return {**out, "refusal": None} if self._chat else out
