"""The prefix trie's tiers below the KV cache: what is saved when a leaf leaves the KV cache,
and what is restored when a request comes back for it.

- **Save**: the trie hands every leaf it evicts to :meth:`Tiers.on_evict`; the path's state
  (``llama_state_seq_get_data`` of the leaf's seq id, which is on every cell of its path) goes
  to the store (kv_store.py: host memory, demoted to disk). A path the store already holds is
  not saved again.
- **Restore**: before a request is admitted, :meth:`Tiers.before_admit` looks for the longest
  saved prefix of its prompt that reaches well beyond what the KV cache holds, and restores
  it as a computed trie leaf. Restoring copies the whole path and recomputing only the
  missing part, so a restore must gain at least ``max(MIN_GAIN, path / GAIN_SHARE)`` tokens:
  measured here, restoring costs ~2 us a token against ~1.3 ms to prefill one on a CPU, and
  a GPU's prefill is still well over 16 times the cost of a host-to-device copy.
- A saved path on disk is read by a background thread first; the request waits for it in
  the queue (others go ahead), so no disk read happens on the step thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from .kv_store import Entry, KVStore
from .prefix_cache import Node, RadixTrie

log = logging.getLogger("demesne.engine")

MIN_SAVE = 64  # paths shorter than this are cheaper to recompute than to keep
MIN_GAIN = 32  # a restore must save at least this many tokens of prefill...
GAIN_SHARE = 16  # ...and at least this share of the path it copies


@dataclass(slots=True)
class TierCounters:
    restores: int = 0
    restores_from_disk: int = 0
    restored_tokens: int = 0
    restore_seconds: float = 0.0
    restore_failures: int = 0
    saves: int = 0
    saved_tokens: int = 0
    save_seconds: float = 0.0


class Tiers:
    def __init__(self, runner, store: KVStore):
        self.runner = runner  # save_state(seq_id) / restore_state(data, seq_id)
        self.store = store
        self.trie: RadixTrie | None = None  # set by the scheduler that owns the trie
        self.counters = TierCounters()

    # -- out of the KV cache -----------------------------------------------------------

    def on_evict(self, node: Node) -> None:
        if node.start + node.n_cached >= MIN_SAVE:
            self.save(self.trie.path_tokens(node), node.seq_id)

    def save(self, tokens, seq_id: int) -> None:
        """Save the state of ``seq_id``, which holds ``tokens`` (positions 0..n-1), unless it
        is too short to be worth it or the store has it already."""
        n = len(tokens)
        if n < MIN_SAVE or self.store.longest_prefix(tokens, n - 1) is not None:
            return
        t0 = time.perf_counter()
        data = self.runner.save_state(seq_id)
        if data is None:
            return
        self.store.put(tokens, data)
        c = self.counters
        c.saves += 1
        c.saved_tokens += n
        c.save_seconds += time.perf_counter() - t0

    # -- back into it ------------------------------------------------------------------

    def lookup(self, tokens, have: int) -> tuple[bool, Entry | None]:
        """The saved prefix of ``tokens`` worth restoring when ``have`` tokens are in KV
        already, if any; (False, entry) while its file is read in the background (started
        here): the request should wait."""
        entry = self.store.longest_prefix(tokens, have + MIN_GAIN - 1)
        if entry is None or entry.n_tokens - have < entry.n_tokens // GAIN_SHARE:
            return True, None
        if not self.store.ready(entry):
            self.store.prefetch(entry)
            return False, entry
        return True, entry

    def restore_into(self, entry: Entry, seq_id: int) -> int:
        """Write a saved state into ``seq_id`` (holding nothing); the tokens restored, 0 on
        failure (a file gone bad, a state llama.cpp refuses)."""
        tier = entry.tier  # (a disk entry moves to host memory as it loads)
        t0 = time.perf_counter()
        data = self.store.load(entry)
        if data is None:
            return 0
        if not self.runner.restore_state(data, seq_id):
            self.counters.restore_failures += 1
            log.debug("restoring %d saved tokens failed; recomputing them", entry.n_tokens)
            return 0
        self._count_restore(entry.n_tokens, tier, time.perf_counter() - t0)
        return entry.n_tokens

    def before_admit(self, tokens: list[int], make_room: Callable[[int], bool]) -> bool:
        """Restore the best saved prefix of ``tokens`` into the trie if one is worth it. False
        while the request should wait for a disk read (started here)."""
        done, blocker = self.trie.computed_match(tokens)
        if blocker is not None and blocker.refs:  # a request computes the path now: share that
            return True
        ready, entry = self.lookup(tokens, done)
        if entry is None or not ready:
            return ready
        if not make_room(entry.n_tokens):  # the state lands whole before the shared part is given back
            return True
        tier = entry.tier
        data = self.store.load(entry)
        if data is None:
            return True
        self._restore(tokens[: entry.n_tokens], data, tier)
        return True

    def _restore(self, path: list[int], data: bytes, tier: str) -> None:
        t0 = time.perf_counter()
        leaf = self.trie.restore(path, lambda seq_id: self.runner.restore_state(data, seq_id))
        if leaf is None:
            self.counters.restore_failures += 1
            log.debug("restoring %d saved tokens failed; recomputing them", len(path))
            return
        self._count_restore(len(leaf.tokens), tier, time.perf_counter() - t0)

    def _count_restore(self, n_tokens: int, tier: str, seconds: float) -> None:
        c = self.counters
        c.restores += 1
        c.restores_from_disk += tier == "disk"
        c.restored_tokens += n_tokens
        c.restore_seconds += seconds

    # -- reporting ---------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        c = self.counters
        out = {
            "kv_restores_total": c.restores,
            "kv_restores_disk_total": c.restores_from_disk,
            "kv_restored_tokens_total": c.restored_tokens,
            "kv_restore_seconds_total": c.restore_seconds,
            "kv_restore_failures_total": c.restore_failures,
            "kv_saves_total": c.saves,
            "kv_saved_tokens_total": c.saved_tokens,
            "kv_save_seconds_total": c.save_seconds,
        }
        out.update({f"kv_store_{k}": float(v) for k, v in self.store.stats().items()})
        return out

    def close(self, spill: Callable[[], None], persist_seconds: float = 20.0) -> None:
        """At shutdown, with a disk tier: what the KV cache (``spill`` saves it) and host
        memory hold goes to disk (for ``persist_seconds`` at most), so a restarted engine
        starts warm."""
        if self.store.disk_dir:
            spill()
            n = self.store.persist(persist_seconds)
            if n:
                log.info("kept %d saved prefixes on disk for the next start", n)
        self.store.close()
