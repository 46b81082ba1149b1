"""A model of llama.cpp's KV cache with one stream per sequence (``kv_unified=false``), for
the slot scheduler's tests.

Each stream is a buffer of ``n_cells`` cells indexed by position (``data``: the token decoded
there) and the positions it uses (llama_kv_cells' metadata). As in llama.cpp:

- ``copy_stream`` (``llama_memory_seq_cp`` across streams, p0 = p1 = -1) copies the metadata
  now and queues the data: the buffer moves at the start of the next ``decode``, in order;
- ``remove`` changes metadata only;
- ``save_state`` reads the buffer now (a queued copy into the stream is not there yet), and a
  restored state lacks the sliding-window layers' cells below its last ``n_swa`` positions;
- ``decode`` checks what llama_decode checks (each sequence's positions continuous, starting
  right after its last one, within its stream) and samples from what each token attends to:
  the buffer's tokens at its sequence's used positions, and a marker for every window
  position whose sliding-window cell is missing. So wrong KV samples a wrong token.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

from fake_kv import DecodeFailed, model


@dataclass
class Stream:
    data: list[int | None]
    used: set[int] = field(default_factory=set)
    no_swa: set[int] = field(default_factory=set)  # positions whose window-layer cells are missing


class FakeStreams:
    def __init__(self, n_streams: int, n_cells: int, n_swa: int = 0):
        self.n_cells = n_cells
        self.n_swa = n_swa
        self.streams = [Stream([None] * n_cells) for _ in range(n_streams)]
        self.pending: list[tuple[int, int]] = []
        self.n_stream_copies = 0

    def copy_stream(self, src: int, dst: int) -> None:
        assert src != dst
        s, d = self.streams[src], self.streams[dst]
        d.used, d.no_swa = set(s.used), set(s.no_swa)
        self.pending.append((src, dst))

    def remove(self, seq_id: int, p0: int = -1, p1: int = -1) -> None:
        st = self.streams[seq_id]
        gone = {p for p in st.used if (p0 < 0 or p >= p0) and (p1 < 0 or p < p1)}
        st.used -= gone
        st.no_swa -= gone

    def pos_max(self, seq_id: int) -> int:
        return max(self.streams[seq_id].used, default=-1)

    # -- saved state: what the runner's save_state / restore_state do --------------------

    def save_state(self, seq_id: int) -> bytes | None:
        st = self.streams[seq_id]
        if not st.used:
            return None
        return pickle.dumps(sorted((p, st.data[p]) for p in st.used))

    def restore_state(self, data: bytes, seq_id: int) -> bool:
        state = pickle.loads(data)
        st = self.streams[seq_id]
        st.used, st.no_swa = set(), set()
        end = max(p for p, _ in state) + 1
        if end > self.n_cells:
            return False
        for p, token in state:
            st.data[p] = token
            st.used.add(p)
            if self.n_swa and p < end - self.n_swa:
                st.no_swa.add(p)
        return True

    # -- decoding ------------------------------------------------------------------------

    def decode(self, spans: list[tuple[int, int, list[int], bool]]) -> list[int]:
        """Write ``(seq id, first position, tokens, output)`` spans; the sampled token of each
        span that asks for output, in order."""
        for src, dst in self.pending:  # llama_kv_cache::update, before the batch
            self.streams[dst].data = list(self.streams[src].data)
            self.n_stream_copies += 1
        self.pending = []
        seen: set[int] = set()
        for seq_id, pos0, tokens, _ in spans:
            assert tokens and seq_id not in seen, "one span per sequence"
            seen.add(seq_id)
            last = self.pos_max(seq_id)
            if pos0 != last + 1:
                raise DecodeFailed(-1, f"sequence {seq_id}: X = {last}, Y = {pos0}")
            if pos0 + len(tokens) > self.n_cells:
                raise DecodeFailed(1, f"stream {seq_id} is full")
        out = []
        for seq_id, pos0, tokens, want in spans:
            st = self.streams[seq_id]
            for k, token in enumerate(tokens):
                st.data[pos0 + k] = token
                st.used.add(pos0 + k)
            if want:
                out.append(model(self.context(seq_id, pos0 + len(tokens) - 1)))
        return out

    def context(self, seq_id: int, pos: int) -> list[int]:
        st = self.streams[seq_id]
        out = [st.data[p] for p in sorted(st.used) if p <= pos]
        if self.n_swa:
            out += [-1 - p for p in range(max(0, pos - self.n_swa + 1), pos + 1) if p in st.no_swa]
        return out
