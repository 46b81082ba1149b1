"""Saved KV state of token paths in two tiers below llama.cpp's KV cache: host memory and disk.

The engine hands in opaque snapshots (``llama_state_seq_get_data`` of one sequence, positions
``0..n-1``) keyed by their token path, and asks for the longest stored path that prefixes a
prompt. No llama_cpp here: bytes in, bytes out.

- Host tier: LRU by bytes. What falls out is demoted to disk by a background writer, or dropped
  when there is no disk tier or the writer is too far behind (never blocking the caller).
- Disk tier: one file per path, named by a hash of the fingerprint and the tokens, LRU by
  access, capped in bytes. The index is rebuilt from the files' headers at startup, so a
  restarted engine (or another one with the same fingerprint sharing the directory) finds what
  was saved. A file is verified in full before its bytes are handed out; a bad one is deleted
  and is a miss. A loaded file is promoted into the host tier and stays on disk.
- Any write error turns the disk tier off for good with one warning; the store goes on
  host-only.

Threads: the engine's step loop calls every public method; a writer and a reader thread do
file I/O only. Every change to the index happens under one lock.

File format: ``MAGIC``, a little-endian u32 header length, an orjson header
``{"fingerprint", "n_tokens", "tokens", "size", "crc32"}``, then ``size`` bytes of snapshot.
Files are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import logging
import os
import queue
import secrets
import struct
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import orjson

log = logging.getLogger("demesne.engine")

MAGIC = b"DEMESNE-KV 1\n"
_LEN = struct.Struct("<I")
SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"
MAX_HEADER = 64 << 20
STALE_TMP_S = 600.0  # a younger temp file may be another engine's write under way
MAX_PREFETCHED = 8  # prefetched snapshots waiting for load(); beyond that the oldest is let go
COUNTERS = ("host_hits", "disk_hits", "saves", "host_evictions", "disk_evictions",
            "disk_write_errors", "disk_corrupt", "demotions_dropped")
_HEADER_FIELDS = {"fingerprint": str, "n_tokens": int, "tokens": list, "size": int, "crc32": int}

# -- prefix hashes ---------------------------------------------------------------------------

_BASE = np.uint64(0xC2B2AE3D27D4EB4F)  # odd, so every power is a unit mod 2**64
_OFFSET = np.uint64(0x9E3779B97F4A7C15)
_powers = np.ones(1, np.uint64)


def _powers_upto(n: int) -> np.ndarray:
    global _powers
    if len(_powers) < n:
        base = np.full(max(n, 2 * len(_powers)), _BASE, np.uint64)
        base[0] = 1
        _powers = np.cumprod(base, dtype=np.uint64)
    return _powers[:n]


def _prefix_hashes(tokens: np.ndarray) -> np.ndarray:
    """``h[i]`` hashes ``tokens[:i]``: the sum of ``(t_j + c) * B**j`` mod 2**64, so one cumsum
    gives every prefix at once. Hashes only narrow the search; tokens are always compared."""
    out = np.zeros(len(tokens) + 1, np.uint64)
    np.cumsum((tokens.astype(np.uint64) + _OFFSET) * _powers_upto(len(tokens)), out=out[1:])
    return out


@dataclass(eq=False)
class Entry:
    """One stored path. ``tier`` says where its bytes are: "host", or "disk" (a file, or a
    write under way); the store keeps it current."""

    tokens: np.ndarray = field(repr=False)  # int32, read-only
    name: str  # the file name: a hash of the fingerprint and the tokens
    key: tuple[int, int] = field(repr=False)  # (n_tokens, prefix hash of the whole path)
    size: int
    tier: str = "host"

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


# -- the file format -------------------------------------------------------------------------


class _Corrupt(Exception):
    """A file that is not a whole snapshot of the path it is named for."""


def _header(fingerprint: str, tokens: np.ndarray, data: bytes) -> bytes:
    return orjson.dumps({"fingerprint": fingerprint, "n_tokens": len(tokens), "tokens": tokens,
                         "size": len(data), "crc32": zlib.crc32(data)},
                        option=orjson.OPT_SERIALIZE_NUMPY)


_stamp_lock = threading.Lock()
_last_stamp = 0


def _access_stamp() -> int:
    """A file time in ns, later than any this process gave before: files are ordered by
    mtime at a restart, and the kernel's own file times are coarse (a write and a later load
    in the same few milliseconds would tie)."""
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(time.time_ns(), _last_stamp + 1)
        return _last_stamp


def _touch(path: str) -> None:
    t = _access_stamp()
    os.utime(path, ns=(t, t))


def _write_file(directory: str, name: str, header: bytes, data: bytes) -> int:
    """Write one file under a temporary name, then rename it into place, so a crash never
    leaves half a file under a real name. Returns the file's size."""
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + _LEN.pack(len(header)) + header)
            f.write(data)
        _touch(tmp)
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return len(MAGIC) + _LEN.size + len(header) + len(data)


def _read_header(f) -> tuple[dict, int]:
    """The header of an open file and the offset of its payload; checks the file's length."""
    lead = f.read(len(MAGIC) + _LEN.size)
    if len(lead) < len(MAGIC) + _LEN.size or not lead.startswith(MAGIC):
        raise _Corrupt("bad magic")
    (n,) = _LEN.unpack_from(lead, len(MAGIC))
    try:
        header = orjson.loads(f.read(n) if n <= MAX_HEADER else b"")
    except orjson.JSONDecodeError:
        raise _Corrupt("unreadable header") from None
    if not isinstance(header, dict) or not all(isinstance(header.get(k), t) for k, t in _HEADER_FIELDS.items()):
        raise _Corrupt("malformed header")
    offset = len(lead) + n
    if header["n_tokens"] != len(header["tokens"]) or offset + header["size"] != os.fstat(f.fileno()).st_size:
        raise _Corrupt("truncated")
    return header, offset


def _read_file(path: str, fingerprint: str, tokens: np.ndarray) -> bytes:
    """The verified payload of the file for ``tokens``; raises _Corrupt or OSError."""
    with open(path, "rb") as f:
        header, _ = _read_header(f)
        if header["fingerprint"] != fingerprint or not np.array_equal(np.asarray(header["tokens"]), tokens):
            raise _Corrupt("another model or path")
        data = f.read()
    if len(data) != header["size"] or zlib.crc32(data) != header["crc32"]:
        raise _Corrupt("checksum mismatch")
    return data


class _Worker:
    """A daemon thread working through a bounded queue; submit() refuses rather than blocks."""

    def __init__(self, name: str, handle: Callable, maxsize: int):
        self._handle = handle
        self._jobs: queue.Queue = queue.Queue(maxsize)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job) -> bool:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            return False
        return True

    def stop(self, deadline: float) -> None:
        """Finish what is queued (the stop mark goes behind it), waiting until ``deadline``."""
        with contextlib.suppress(queue.Full):
            self._jobs.put(None, timeout=max(0.0, deadline - time.monotonic()))
            self._thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._handle(job)
            except Exception:  # a thread that dies silently would stall every later job
                log.exception("KV store %s failed", self._thread.name)


class KVStore:
    """Snapshots of token paths in host memory (LRU by bytes) and, optionally, on disk.

    A disk tier exists when ``disk_dir`` is given and ``disk_bytes > 0``. ``write_queue`` and
    ``pending_bytes`` bound the writer's backlog (demotions beyond it are dropped); bytes
    waiting to be written are not counted in ``host_bytes``.
    """

    def __init__(self, host_bytes: int, fingerprint: str, disk_dir: str | None = None,
                 disk_bytes: int = 0, *, write_queue: int = 64, pending_bytes: int | None = None):
        self.fingerprint = fingerprint
        self.disk_dir = disk_dir
        self._host_cap = max(0, host_bytes)
        self._disk_cap = max(0, disk_bytes)
        self._pending_cap = max(self._host_cap // 4, 256 << 20) if pending_bytes is None else pending_bytes
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._buckets: dict[tuple[int, int], list[Entry]] = {}
        self._lengths: list[int] = []  # the distinct path lengths, sorted
        self._n_at_length: dict[int, int] = {}
        self._host: OrderedDict[str, bytes] = OrderedDict()  # least recently used first
        self._disk: OrderedDict[str, int] = OrderedDict()  # file sizes, least recently used first
        self._writing: dict[str, tuple[Entry, bytes]] = {}
        self._fetching: dict[str, Future] = {}
        self._host_used = self._disk_used = self._writing_used = 0
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._fp_hash = hashlib.sha256(fingerprint.encode() + b"\0")
        self._closed = False
        self._disk_on = bool(disk_dir) and self._disk_cap > 0
        self._writer = self._reader = None
        if self._disk_on:
            self._open_disk()
        if self._disk_on:
            self._writer = _Worker("kv-writer", self._write_job, write_queue)
            self._reader = _Worker("kv-reader", self._prefetch_job, MAX_PREFETCHED)

    # -- the engine's calls ----------------------------------------------------------------

    def put(self, tokens: Sequence[int], data: bytes) -> None:
        """Store ``data`` for the path ``tokens`` as the most recently used host entry,
        replacing an equal path's; too big for the host tier, it goes straight to disk."""
        if self._host_cap == 0 and not self._disk_on:
            return
        path = np.array(tokens, dtype=np.int32)
        if not len(path):
            return
        path.flags.writeable = False
        name = self._name(path)
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                entry = Entry(path, name, (len(path), int(_prefix_hashes(path)[-1])), len(data))
                self._index(entry)
            entry.size = len(data)
            if len(data) <= self._host_cap:
                self._to_host(entry, data)
            else:
                self._drop_host(entry)
                entry.tier = "disk"
                self._demote(entry, data)
            if self._live(entry):
                self._counts["saves"] += 1

    def longest_prefix(self, tokens: Sequence[int], min_len: int) -> Entry | None:
        """The entry with the longest path ``P``, ``min_len < len(P) <= len(tokens)``, that
        ``tokens`` starts with. Only the lengths some entry has are looked up."""
        with self._lock:
            lo = bisect.bisect_right(self._lengths, min_len)
            hi = bisect.bisect_right(self._lengths, len(tokens))
            if lo >= hi:
                return None
            toks = np.asarray(tokens, dtype=np.int32)
            hashes = _prefix_hashes(toks[: self._lengths[hi - 1]])
            for n in reversed(self._lengths[lo:hi]):
                for entry in self._buckets.get((n, int(hashes[n])), ()):
                    if np.array_equal(entry.tokens, toks[:n]):
                        return entry
        return None

    def load(self, entry: Entry) -> bytes | None:
        """The snapshot, or None when it is gone or its file fails verification."""
        with self._lock:
            if not self._live(entry):
                return None
            data = self._host.get(entry.name)
            if data is not None:
                self._host.move_to_end(entry.name)
                self._counts["host_hits"] += 1
                return data
            job = self._writing.get(entry.name)
            fut = self._fetching.pop(entry.name, None)
        data = job[1] if job is not None else self._fetched(entry, fut)
        if data is not None:
            self._promote(entry, data)
        return data

    def prefetch(self, entry: Entry) -> None:
        """Start reading a disk entry's file in the background (see ready())."""
        with self._lock:
            if (self._closed or self._reader is None or not self._live(entry)
                    or entry.name in self._host or entry.name in self._writing or entry.name in self._fetching):
                return
            fut: Future = Future()
            if not self._reader.submit((entry, fut)):
                return
            self._fetching[entry.name] = fut
            while len(self._fetching) > MAX_PREFETCHED:
                self._fetching.pop(next(iter(self._fetching))).cancel()

    def ready(self, entry: Entry) -> bool:
        """Whether load() would answer without reading a file now."""
        with self._lock:
            if not self._live(entry) or entry.name in self._host or entry.name in self._writing:
                return True
            fut = self._fetching.get(entry.name)
            return fut is not None and fut.done()

    def discard(self, entry: Entry) -> None:
        """Forget ``entry`` in both tiers and delete its file."""
        with self._lock:
            if not self._live(entry):
                return
            self._drop_host(entry)
            self._release_write(entry)  # a write under way deletes its file when done
            size = self._disk.pop(entry.name, None)
            if size is not None:
                self._disk_used -= size
            self._forget(entry)
        if size is not None:
            self._unlink([entry.name])

    def stats(self) -> dict[str, float]:
        with self._lock:
            out = {"host_bytes": self._host_used, "host_entries": len(self._host),
                   "disk_bytes": self._disk_used, "disk_entries": len(self._disk), **self._counts}
        return {k: float(v) for k, v in out.items()}

    def persist(self, timeout: float) -> int:
        """Write every host entry the disk lacks, most recent first, for ``timeout`` seconds
        at most (at shutdown: a restarted engine finds them); how many were written."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if not self._disk_on:
                return 0
            todo = [(self._entries[n], d) for n, d in reversed(self._host.items()) if n not in self._disk and n not in self._writing]
        written = 0
        for entry, data in todo:
            if time.monotonic() > deadline or not self._disk_on:
                break
            try:
                size = _write_file(self.disk_dir, entry.name, _header(self.fingerprint, entry.tokens, data), data)
            except OSError as exc:
                self._disable_disk(exc)
                break
            with self._lock:
                doomed = []
                if self._live(entry) and self._disk_on:
                    self._add_file(entry.name, size)
                    doomed = self._shrink_disk()
            self._unlink(doomed)
            written += 1
        return written

    def close(self, timeout: float = 5.0) -> None:
        """Finish queued writes (waiting at most ``timeout`` seconds) and stop the threads."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closed = True
            for fut in self._fetching.values():
                fut.cancel()  # one not started yet is read by load() itself
        for worker in (self._writer, self._reader):
            if worker is not None:
                worker.stop(deadline)

    # -- the index (under the lock) --------------------------------------------------------

    def _name(self, tokens: np.ndarray) -> str:
        h = self._fp_hash.copy()
        h.update(tokens.astype("<i4", copy=False).tobytes())
        return h.hexdigest() + SUFFIX

    def _live(self, entry: Entry) -> bool:
        return self._entries.get(entry.name) is entry

    def _index(self, entry: Entry) -> None:
        self._entries[entry.name] = entry
        self._buckets.setdefault(entry.key, []).append(entry)
        n = entry.n_tokens
        if n not in self._n_at_length:
            bisect.insort(self._lengths, n)
        self._n_at_length[n] = self._n_at_length.get(n, 0) + 1

    def _forget(self, entry: Entry) -> None:
        if not self._live(entry):
            return
        del self._entries[entry.name]
        bucket = self._buckets[entry.key]
        bucket.remove(entry)
        if not bucket:
            del self._buckets[entry.key]
        n = entry.n_tokens
        self._n_at_length[n] -= 1
        if not self._n_at_length[n]:
            del self._n_at_length[n]
            self._lengths.pop(bisect.bisect_left(self._lengths, n))
        fut = self._fetching.pop(entry.name, None)
        if fut is not None:
            fut.cancel()

    def _forget_if_unheld(self, entry: Entry | None) -> None:
        if entry is not None and not any(entry.name in d for d in (self._host, self._disk, self._writing)):
            self._forget(entry)

    def _to_host(self, entry: Entry, data: bytes) -> None:
        """Make ``data`` the most recent host entry; demote the least recent ones over budget."""
        self._drop_host(entry)
        self._host[entry.name] = data
        self._host_used += len(data)
        entry.tier = "host"
        while self._host_used > self._host_cap:
            name, old = self._host.popitem(last=False)
            self._host_used -= len(old)
            self._counts["host_evictions"] += 1
            victim = self._entries[name]
            victim.tier = "disk"
            self._demote(victim, old)

    def _drop_host(self, entry: Entry) -> None:
        data = self._host.pop(entry.name, None)
        if data is not None:
            self._host_used -= len(data)
            entry.tier = "disk"

    def _demote(self, entry: Entry, data: bytes) -> None:
        """``entry`` leaves host memory: a file (or a write) keeps it, or it is forgotten."""
        if entry.name not in self._disk and entry.name not in self._writing and not self._queue_write(entry, data):
            self._forget(entry)

    def _queue_write(self, entry: Entry, data: bytes) -> bool:
        if not self._disk_on or self._closed:
            return False
        behind = self._writing and self._writing_used + len(data) > self._pending_cap
        if len(data) > self._disk_cap or behind or not self._writer.submit(entry):
            self._counts["demotions_dropped"] += 1
            return False
        self._writing[entry.name] = (entry, data)  # load() serves these bytes until written
        self._writing_used += len(data)
        return True

    def _release_write(self, entry: Entry) -> None:
        job = self._writing.get(entry.name)
        if job is not None and job[0] is entry:
            del self._writing[entry.name]
            self._writing_used -= len(job[1])

    def _add_file(self, name: str, size: int) -> None:
        self._disk_used += size - self._disk.pop(name, 0)
        self._disk[name] = size

    def _shrink_disk(self) -> list[str]:
        """Drop the least recently used files over the cap from the index; their names."""
        doomed = []
        while self._disk_used > self._disk_cap and self._disk:
            name, size = self._disk.popitem(last=False)
            self._disk_used -= size
            self._counts["disk_evictions"] += 1
            doomed.append(name)
            self._forget_if_unheld(self._entries.get(name))
        return doomed

    def _promote(self, entry: Entry, data: bytes) -> None:
        with self._lock:
            self._counts["disk_hits"] += 1
            if not self._live(entry):
                return
            if entry.name in self._disk:
                self._disk.move_to_end(entry.name)
            entry.size = len(data)
            if len(data) <= self._host_cap:
                self._to_host(entry, data)

    # -- disk I/O (no lock held while a file is read or written) ---------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.disk_dir, name)

    def _unlink(self, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(self._path(name))

    def _open_disk(self) -> None:
        try:
            os.makedirs(self.disk_dir, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.disk_dir, prefix=".probe.", suffix=TMP_SUFFIX)
            os.close(fd)
            os.unlink(probe)
            self._scan()
        except OSError as exc:
            self._disable_disk(exc)

    def _scan(self) -> None:
        """Index the files already in the directory, reading headers only, oldest first."""
        found, rejected = [], []
        with os.scandir(self.disk_dir) as it:
            for item in it:
                if item.name.endswith(TMP_SUFFIX):
                    self._remove_stale_tmp(item)
                elif item.name.endswith(SUFFIX):
                    got = self._scan_one(item)
                    if got is None:
                        rejected.append(item.name)
                    elif got:
                        found.append(got)
        for _, entry, size in sorted(found, key=lambda f: f[0]):
            self._index(entry)
            self._add_file(entry.name, size)
        self._counts["disk_corrupt"] += len(rejected)
        self._unlink(rejected + self._shrink_disk())
        if rejected:
            log.warning("KV disk tier %s: deleted %d corrupt or foreign files", self.disk_dir, len(rejected))

    def _scan_one(self, item: os.DirEntry):
        """(mtime, entry, file size) for a good file, None for a bad one, False for a vanished
        or unreadable one (left alone)."""
        try:
            with open(item.path, "rb") as f:
                header, offset = _read_header(f)
            if header["fingerprint"] != self.fingerprint:
                return None
            tokens = np.array(header["tokens"], dtype=np.int32)
            tokens.flags.writeable = False
            if not len(tokens) or self._name(tokens) != item.name:
                return None
            entry = Entry(tokens, item.name, (len(tokens), int(_prefix_hashes(tokens)[-1])), header["size"], "disk")
            return item.stat().st_mtime_ns, entry, offset + header["size"]
        except (_Corrupt, ValueError, TypeError, OverflowError):
            return None
        except OSError:
            return False

    def _remove_stale_tmp(self, item: os.DirEntry) -> None:
        with contextlib.suppress(OSError):
            if item.stat().st_mtime < time.time() - STALE_TMP_S:
                os.unlink(item.path)

    def _disable_disk(self, exc: OSError) -> None:
        """After a write error: one warning, and host only from now on."""
        with self._lock:
            if not self._disk_on:
                return
            self._disk_on = False
            self._counts["disk_write_errors"] += 1
            self._disk.clear()
            self._writing.clear()
            self._disk_used = self._writing_used = 0
            for entry in list(self._entries.values()):
                self._forget_if_unheld(entry)
        log.warning("KV disk tier %s disabled, keeping saved KV state in host memory only: %s", self.disk_dir, exc)

    def _write_job(self, entry: Entry) -> None:
        with self._lock:
            job = self._writing.get(entry.name)
            if not self._disk_on or job is None or job[0] is not entry:
                return  # discarded, or the tier was turned off, while it waited
            data = job[1]
        try:
            size = _write_file(self.disk_dir, entry.name, _header(self.fingerprint, entry.tokens, data), data)
        except OSError as exc:
            self._disable_disk(exc)
            return
        with self._lock:
            self._release_write(entry)
            if self._live(entry) and self._disk_on:
                self._add_file(entry.name, size)
                doomed = self._shrink_disk()
            else:
                doomed = [] if entry.name in self._disk else [entry.name]
        self._unlink(doomed)

    def _prefetch_job(self, job: tuple[Entry, Future]) -> None:
        entry, fut = job
        if not fut.set_running_or_notify_cancel():
            return
        data = None
        try:
            data = self._read(entry)
        finally:  # load() may be waiting on it
            fut.set_result(data)

    def _fetched(self, entry: Entry, fut: Future | None) -> bytes | None:
        """A prefetch's answer if it has started (waiting for it), else a read here."""
        if fut is not None and not fut.cancel():
            return fut.result()
        return self._read(entry)

    def _read(self, entry: Entry) -> bytes | None:
        """The verified bytes of ``entry``'s file; None (and the entry gone) when it fails."""
        path = self._path(entry.name)
        try:
            data = _read_file(path, self.fingerprint, entry.tokens)
        except FileNotFoundError:  # another engine sharing the directory removed it
            self._lost(entry, corrupt=False)
            return None
        except (_Corrupt, ValueError, TypeError, OverflowError) as exc:
            log.warning("KV disk file %s rejected and deleted: %s", path, exc)
            self._lost(entry, corrupt=True)
            return None
        except OSError as exc:
            log.warning("KV disk file %s unreadable: %s", path, exc)
            self._lost(entry, corrupt=False)
            return None
        with contextlib.suppress(OSError):
            _touch(path)  # a restart orders files by mtime: make it the access order
        return data

    def _lost(self, entry: Entry, corrupt: bool) -> None:
        with self._lock:
            size = self._disk.pop(entry.name, None)
            if size is not None:
                self._disk_used -= size
            if self._live(entry):
                self._forget_if_unheld(entry)
            if corrupt:
                self._counts["disk_corrupt"] += 1
        if corrupt:
            self._unlink([entry.name])
