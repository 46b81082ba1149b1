"""Tokenize, detokenize incrementally, and match stop strings across token boundaries.

The gateway loads only the vocabulary of the engine's GGUF (``vocab_only``): the engine
speaks token ids, the gateway turns them into text.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import re

import llama_cpp

from ..llama_logs import quiet_llama_logs


class Tokenizer:
    def __init__(self, path: str):
        llama_cpp.llama_backend_init()
        quiet_llama_logs()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not self._model:
            raise OSError(f"cannot load the vocabulary of {path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._pieces: list[bytes | None] = [None] * self.n_vocab
        self._buf = ctypes.create_string_buffer(256)

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``. ``parse_special``: control-token text (``<bos>``,
        ``<start_of_turn>``…) becomes those tokens; off, it is spelled as ordinary text."""
        raw = text.encode("utf-8")
        capacity = len(raw) + 8
        while True:
            out = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), out, capacity, add_special, parse_special)
            if n >= 0:
                return out[:n]
            capacity = -n

    def encode_segments(self, segments: list[tuple[str, bool]], add_special: bool = True) -> list[int]:
        """Token ids of text in segments, each ``(text, markup)``: control-token text becomes
        control tokens only in markup segments (the chat template's own). Each segment is
        tokenized on its own, so no token spans a join between segments."""
        ids: list[int] = []
        for i, (text, markup) in enumerate(segments):
            ids += self.encode(text, add_special=add_special and i == 0, parse_special=markup)
        return ids

    @functools.cached_property
    def control_pattern(self) -> re.Pattern | None:
        """A regex for the text of every token that only special-token parsing produces
        (control and unknown tokens: ``<start_of_turn>``, ``<|im_start|>``, ``[INST]``…);
        None if the vocabulary has none."""
        attr = llama_cpp.llama_vocab_get_attr
        hidden = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        texts = set()
        for token in range(self.n_vocab):
            if attr(self._vocab, token) & hidden:
                text = llama_cpp.llama_vocab_get_text(self._vocab, token)
                if text:
                    texts.add(text.decode("utf-8", "replace"))
        return re.compile(_trie_regex(texts)) if texts else None

    def one_token(self, text: str) -> int | None:
        """The id of the one token that is exactly ``text`` (special tokens included), if any."""
        ids = self.encode(text, add_special=False)
        return ids[0] if len(ids) == 1 and len(text) > 1 else None

    def render_special(self, markers: tuple[str, ...]) -> None:
        """Let these control tokens through as their text (a tool-call marker such as
        ``[TOOL_CALLS]`` is one in Mistral's vocabulary, and the parser must see it)."""
        for marker in markers:
            token = self.one_token(marker)
            if token is not None:
                self._pieces[token] = marker.encode()

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes a token stands for (empty for control tokens such as ``<eos>``, unless
        ``special``: then their text)."""
        if special:
            return self._to_piece(token, True)
        cached = self._pieces[token]
        if cached is None:
            cached = self._pieces[token] = self._to_piece(token, False)
        return cached

    def _to_piece(self, token: int, special: bool) -> bytes:
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, special)
        if n < 0:  # longer than the buffer: -n is the size it needs
            self._buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, special)
        return self._buf.raw[: max(n, 0)]

    def decode(self, tokens: list[int], special: bool = False) -> str:
        return b"".join(self.piece(t, special) for t in tokens).decode("utf-8", "replace")


def _trie_regex(words: set[str]) -> str:
    """One regex for many literal words, their common prefixes factored out (a scan then
    tries a few characters per position, not every word), longest match first."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        alts = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body  # a word ends here: the longer ones first

    return emit(trie)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text, never emitting half a UTF-8 character.

    A character split over several tokens (byte-fallback tokens, say) is held back until its
    last byte arrives; invalid bytes become U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, tokens: list[int]) -> str:
        piece = self._tokenizer.piece
        return self._decoder.decode(b"".join(piece(t) for t in tokens))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds the first stop string in streamed text, even when it spans several chunks.

    :meth:`feed` returns the text that is safe to emit: everything before a match, or, while
    no match is found, everything except a tail that could still begin a stop string.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._pending + text
        found = [(i, n) for n, i in enumerate(buf.find(s) for s in self.stops) if i >= 0]
        cut = min(found)[0] if found else -1
        if cut >= 0:
            self.stopped = True
            self.matched = self.stops[min(found)[1]]
            self._pending = ""
            return buf[:cut]
        keep = self._partial_tail(buf)
        self._pending = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def _partial_tail(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        for n in range(min(self._hold, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        """Text held back at the end of generation (it turned out not to be a stop string)."""
        rest, self._pending = self._pending, ""
        return "" if self.stopped else rest
