"""demesne.engine.kv_store.KVStore: exact longest-prefix lookup, the host tier's LRU by bytes,
demotion to disk and promotion back, restarts on the same directory, rejecting and deleting
bad files, the disk cap, and falling back to host-only on write errors. No model: snapshots
are plain bytes."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

import numpy as np
import pytest

from demesne.engine import kv_store
from demesne.engine.kv_store import MAGIC, KVStore

FP = "model-sha:ctx=4096:type_k=f16"


def wait_until(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"condition not met within {timeout}s")


def written(store: KVStore, n: int) -> None:
    wait_until(lambda: store.stats()["disk_entries"] == n)


def kv_files(path) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".kv"))


def blob(i: int, size: int = 60) -> bytes:
    return bytes([i % 256]) * size


@pytest.fixture
def disk_store(tmp_path):
    """A store that keeps nothing in host memory: every put is written to disk."""
    stores = []

    def make(host_bytes: int = 0, disk_bytes: int = 1 << 20, fingerprint: str = FP, **kw) -> KVStore:
        stores.append(KVStore(host_bytes, fingerprint, str(tmp_path / "kv"), disk_bytes, **kw))
        return stores[-1]

    yield make
    for s in stores:
        s.close()


def saved(make, paths: list[list[int]]) -> None:
    """Write ``paths`` to disk through one store and close it."""
    store = make()
    for i, p in enumerate(paths):
        store.put(p, blob(i))
    written(store, len(paths))
    store.close()


# -- lookup ------------------------------------------------------------------------------------


def test_longest_prefix_is_exact_and_longest():
    s = KVStore(1 << 20, FP)
    s.put([1, 2, 3], b"short")
    s.put([1, 2, 3, 4, 5], b"long")
    s.put([7, 8], b"other")
    assert s.load(s.longest_prefix([1, 2, 3, 4, 5, 6], 0)) == b"long"
    assert s.load(s.longest_prefix([1, 2, 3, 4, 5], 0)) == b"long"
    assert s.load(s.longest_prefix([1, 2, 3, 4, 9], 0)) == b"short"
    assert s.longest_prefix([1, 2], 0) is None
    assert s.longest_prefix([2, 3, 4, 5, 6], 0) is None
    assert s.longest_prefix([], 0) is None
    e = s.longest_prefix(np.array([7, 8, 9], dtype=np.int32), 0)
    assert (e.n_tokens, e.tier, e.size) == (2, "host", 5)


def test_min_len_is_exclusive():
    s = KVStore(1 << 20, FP)
    s.put([1, 2, 3], b"a")
    s.put([1, 2, 3, 4, 5], b"b")
    assert s.longest_prefix([1, 2, 3, 4, 5, 6], 4).n_tokens == 5
    assert s.longest_prefix([1, 2, 3, 4, 5, 6], 5) is None
    assert s.longest_prefix([1, 2, 3, 9], 2).n_tokens == 3
    assert s.longest_prefix([1, 2, 3, 9], 3) is None


def test_hash_collisions_are_ruled_out_by_the_tokens(monkeypatch):
    monkeypatch.setattr(kv_store, "_prefix_hashes", lambda t: np.zeros(len(t) + 1, np.uint64))
    s = KVStore(1 << 20, FP)
    s.put([1, 2, 3], b"a")
    s.put([4, 5, 6], b"b")
    s.put([4, 5], b"c")
    assert s.load(s.longest_prefix([4, 5, 6, 7], 0)) == b"b"
    assert s.load(s.longest_prefix([1, 2, 3], 0)) == b"a"
    assert s.load(s.longest_prefix([4, 5, 9], 0)) == b"c"
    assert s.longest_prefix([7, 8, 9], 0) is None


def test_matches_brute_force_over_many_entries():
    rng = np.random.default_rng(7)
    trunk = rng.integers(0, 50_000, 12_000)
    s = KVStore(1 << 30, FP)
    paths = []
    for _ in range(1000):
        n = int(rng.integers(1, 12_000))
        p = trunk[:n] if rng.random() < 0.7 else np.concatenate([trunk[: n // 2], rng.integers(0, 50_000, n - n // 2)])
        paths.append(p)
        s.put(p.tolist(), b"x")
    for _ in range(50):
        q = np.concatenate([trunk[: rng.integers(0, 12_000)], rng.integers(0, 50_000, rng.integers(0, 500))])
        min_len = int(rng.integers(0, 3000))
        fits = (len(p) for p in paths if min_len < len(p) <= len(q) and np.array_equal(q[: len(p)], p))
        best = max(fits, default=None)
        got = s.longest_prefix(q.tolist(), min_len)
        assert (got.n_tokens if got else None) == best
        if got:
            assert np.array_equal(got.tokens, q[: got.n_tokens])


# -- host tier ---------------------------------------------------------------------------------


def test_put_replaces_an_equal_path():
    s = KVStore(1000, FP)
    s.put([1, 2], b"old!")
    s.put([1, 2], b"new")
    assert s.load(s.longest_prefix([1, 2], 0)) == b"new"
    st = s.stats()
    assert (st["host_entries"], st["host_bytes"], st["saves"], st["host_hits"]) == (1, 3, 2, 1)


def test_host_tier_is_lru_by_bytes():
    s = KVStore(100, FP)
    s.put([1], blob(1, 40))
    s.put([2], blob(2, 40))
    s.load(s.longest_prefix([1], 0))  # [1] is now the most recent
    s.put([3], blob(3, 40))
    assert s.longest_prefix([2], 0) is None
    assert s.longest_prefix([1], 0) is not None and s.longest_prefix([3], 0) is not None
    st = s.stats()
    assert (st["host_entries"], st["host_bytes"], st["host_evictions"]) == (2, 80, 1)


def test_entry_bigger_than_host_is_not_kept_without_disk():
    s = KVStore(10, FP)
    s.put([1], blob(1, 5))
    s.put([2], blob(2, 20))
    assert s.longest_prefix([2], 0) is None
    assert s.load(s.longest_prefix([1], 0)) == blob(1, 5)
    assert s.stats()["saves"] == 1
    none = KVStore(0, FP)
    none.put([1], b"x")
    assert none.longest_prefix([1], 0) is None and none.stats()["saves"] == 0


def test_discard_forgets_in_both_tiers(disk_store, tmp_path):
    s = disk_store(host_bytes=100)
    s.put([1], blob(1))
    s.put([2], blob(2))  # demotes [1]
    written(s, 1)
    s.discard(s.longest_prefix([1], 0))
    s.discard(s.longest_prefix([2], 0))
    assert s.longest_prefix([1], 0) is None and s.longest_prefix([2], 0) is None
    assert kv_files(tmp_path / "kv") == []
    assert s.stats()["host_entries"] == 0 and s.stats()["disk_entries"] == 0


# -- disk tier ---------------------------------------------------------------------------------


def test_demotion_to_disk_and_promotion_back(disk_store, tmp_path):
    s = disk_store(host_bytes=100)
    s.put([1, 2], blob(1))
    s.put([3, 4], blob(2))  # over 100 bytes: [1, 2] goes to disk
    written(s, 1)
    e = s.longest_prefix([1, 2, 5], 0)
    assert (e.tier, e.n_tokens) == ("disk", 2) and not s.ready(e)
    assert len(kv_files(tmp_path / "kv")) == 1
    assert s.load(e) == blob(1)
    assert e.tier == "host"  # promoted, which demotes [3, 4]
    written(s, 2)
    assert s.longest_prefix([3, 4], 0).tier == "disk"
    assert s.load(e) == blob(1)
    st = s.stats()
    assert (st["disk_hits"], st["host_hits"], st["host_evictions"], st["host_entries"]) == (1, 1, 2, 1)


def test_an_entry_bigger_than_host_goes_straight_to_disk(disk_store):
    s = disk_store(host_bytes=10)
    s.put([1], blob(1, 50))
    written(s, 1)
    e = s.longest_prefix([1], 0)
    assert e.tier == "disk" and s.load(e) == blob(1, 50)
    assert e.tier == "disk" and s.stats()["host_entries"] == 0  # too big to promote


def test_file_format(disk_store, tmp_path):
    saved(disk_store, [[5, 6, 7]])
    (name,) = kv_files(tmp_path / "kv")
    raw = (tmp_path / "kv" / name).read_bytes()
    assert raw.startswith(MAGIC)
    n = int.from_bytes(raw[len(MAGIC) : len(MAGIC) + 4], "little")
    header = kv_store.orjson.loads(raw[len(MAGIC) + 4 : len(MAGIC) + 4 + n])
    assert header["fingerprint"] == FP and header["tokens"] == [5, 6, 7] and header["n_tokens"] == 3
    assert header["size"] == 60 and raw[len(MAGIC) + 4 + n :] == blob(0)
    assert not [f for f in os.listdir(tmp_path / "kv") if f.endswith(".tmp")]


def test_restart_finds_the_files(disk_store):
    saved(disk_store, [[1, 2, 3], [1, 2, 3, 4]])
    s = disk_store(host_bytes=1000)
    assert s.stats()["disk_entries"] == 2
    e = s.longest_prefix([1, 2, 3, 4, 5], 0)
    assert (e.n_tokens, e.tier) == (4, "disk")
    assert s.load(e) == blob(1) and e.tier == "host"
    assert s.load(s.longest_prefix([1, 2, 3], 0)) == blob(0)


def test_close_flushes_queued_writes(disk_store):
    s = disk_store()
    for i in range(10):
        s.put([i, i], blob(i))
    s.close()
    again = disk_store()
    assert again.stats()["disk_entries"] == 10
    assert again.load(again.longest_prefix([7, 7, 7], 0)) == blob(7)


def test_foreign_fingerprint_is_deleted(disk_store, tmp_path):
    saved(disk_store, [[1, 2, 3]])
    s = disk_store(fingerprint="another-model")
    assert s.longest_prefix([1, 2, 3], 0) is None
    assert kv_files(tmp_path / "kv") == [] and s.stats()["disk_corrupt"] == 1


def test_truncated_header_is_deleted_at_startup(disk_store, tmp_path):
    saved(disk_store, [[1, 2, 3], [4, 5]])
    bad, good = (tmp_path / "kv" / f for f in kv_files(tmp_path / "kv"))
    bad.write_bytes(bad.read_bytes()[: len(MAGIC) + 10])
    s = disk_store()
    assert s.stats()["disk_entries"] == 1 and s.stats()["disk_corrupt"] == 1
    assert kv_files(tmp_path / "kv") == [good.name]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_payload_is_rejected_at_load(disk_store, tmp_path, caplog, damage):
    saved(disk_store, [[1, 2, 3]])
    s = disk_store(host_bytes=1000)
    (f,) = (tmp_path / "kv" / n for n in kv_files(tmp_path / "kv"))
    raw = bytearray(f.read_bytes())
    if damage == "truncate":
        del raw[-1]
    else:
        raw[-7] ^= 0x01
    f.write_bytes(bytes(raw))
    caplog.set_level(logging.WARNING, logger="demesne.engine")
    e = s.longest_prefix([1, 2, 3], 0)
    assert s.load(e) is None
    assert not f.exists() and s.longest_prefix([1, 2, 3], 0) is None
    assert s.stats()["disk_corrupt"] == 1 and s.stats()["disk_entries"] == 0
    assert any("rejected" in r.getMessage() for r in caplog.records)


def test_a_file_removed_by_another_engine_is_a_miss(disk_store, tmp_path):
    saved(disk_store, [[1, 2, 3]])
    s = disk_store(host_bytes=1000)
    e = s.longest_prefix([1, 2, 3], 0)
    for n in kv_files(tmp_path / "kv"):
        os.unlink(tmp_path / "kv" / n)
    assert s.load(e) is None and s.stats()["disk_corrupt"] == 0
    assert s.longest_prefix([1, 2, 3], 0) is None


def test_stale_temp_files_are_cleaned(disk_store, tmp_path):
    d = tmp_path / "kv"
    d.mkdir()
    stale, fresh = d / ".abc.kv.1.ff.tmp", d / ".def.kv.2.ee.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")  # another engine may be writing it right now
    old = time.time() - kv_store.STALE_TMP_S - 60
    os.utime(stale, (old, old))
    disk_store()
    assert not stale.exists() and fresh.exists()


def test_disk_cap_deletes_least_recently_used_files(disk_store, tmp_path):
    probe = disk_store()
    probe.put([9], blob(9))
    written(probe, 1)
    size = probe.stats()["disk_bytes"]
    probe.discard(probe.longest_prefix([9], 0))
    probe.close()
    s = disk_store(disk_bytes=int(size * 2.5))
    for i in range(4):
        s.put([i], blob(i))
        wait_until(lambda i=i: s.stats()["disk_entries"] + s.stats()["disk_evictions"] == i + 1)
    st = s.stats()
    assert (st["disk_entries"], st["disk_evictions"], st["disk_bytes"]) == (2, 2, 2 * size)
    assert [e is None for e in (s.longest_prefix([i], 0) for i in range(4))] == [True, True, False, False]
    assert len(kv_files(tmp_path / "kv")) == 2
    s.load(s.longest_prefix([2], 0))  # [3] is now the least recently used
    s.close()
    smaller = disk_store(disk_bytes=int(size * 1.5))
    assert smaller.longest_prefix([3], 0) is None and smaller.longest_prefix([2], 0) is not None
    assert len(kv_files(tmp_path / "kv")) == 1


def test_prefetch_and_ready(disk_store, tmp_path):
    saved(disk_store, [[1, 2], [3, 4]])
    s = disk_store(host_bytes=1000)
    e = s.longest_prefix([1, 2], 0)
    assert not s.ready(e)
    s.prefetch(e)
    wait_until(lambda: s.ready(e))
    os.unlink(tmp_path / "kv" / e.name)  # the prefetched bytes are served, not the file
    assert s.load(e) == blob(0) and s.stats()["disk_hits"] == 1
    bad = s.longest_prefix([3, 4], 0)
    (tmp_path / "kv" / bad.name).write_bytes(MAGIC + b"garbage")
    s.prefetch(bad)
    wait_until(lambda: s.ready(bad))
    assert s.load(bad) is None and s.stats()["disk_corrupt"] == 1


def test_a_pending_write_is_served_and_a_full_queue_drops(disk_store, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real = kv_store._write_file

    def slow(*args):
        started.set()
        release.wait(5)
        return real(*args)

    monkeypatch.setattr(kv_store, "_write_file", slow)
    s = disk_store(host_bytes=0, write_queue=1)
    s.put([1], blob(1))
    started.wait(5)  # the writer holds [1]; the queue is empty again
    s.put([2], blob(2))
    s.put([3], blob(3))
    assert s.stats()["demotions_dropped"] == 1 and s.longest_prefix([3], 0) is None
    e = s.longest_prefix([1], 0)
    assert e.tier == "disk" and s.ready(e) and s.load(e) == blob(1)
    release.set()
    written(s, 2)
    assert s.stats()["saves"] == 2


# -- write errors ------------------------------------------------------------------------------


def test_unwritable_dir_means_host_only(tmp_path, caplog):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        if os.access(d, os.W_OK):
            pytest.skip("running as a user the directory's mode does not stop")
        caplog.set_level(logging.WARNING, logger="demesne.engine")
        s = KVStore(100, FP, str(d), 1 << 20)
        for i in range(4):
            s.put([i], blob(i))
        s.close()
    finally:
        d.chmod(0o700)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "disabled" in warnings[0].getMessage()
    st = s.stats()
    assert (st["disk_write_errors"], st["disk_entries"], st["host_entries"]) == (1, 0, 1)
    assert s.load(s.longest_prefix([3], 0)) == blob(3)


def test_a_dir_that_cannot_be_made_means_host_only(tmp_path, caplog):
    (tmp_path / "file").write_bytes(b"")
    caplog.set_level(logging.WARNING, logger="demesne.engine")
    s = KVStore(100, FP, str(tmp_path / "file" / "kv"), 1 << 20)
    s.put([1], blob(1))
    s.put([2], blob(2))
    s.close()
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    st = s.stats()
    assert (st["disk_write_errors"], st["host_entries"], st["host_evictions"]) == (1, 1, 1)
    assert s.longest_prefix([1], 0) is None and s.load(s.longest_prefix([2], 0)) == blob(2)


def test_missing_parent_is_created(tmp_path):
    s = KVStore(0, FP, str(tmp_path / "a" / "b"), 1 << 20)
    s.put([1], b"x")
    written(s, 1)
    s.close()


def test_disk_full_means_host_only_with_one_warning(disk_store, monkeypatch, caplog):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    caplog.set_level(logging.WARNING, logger="demesne.engine")
    s = disk_store(host_bytes=100)
    monkeypatch.setattr(kv_store, "_write_file", full)
    for i in range(6):
        s.put([i], blob(i))
    wait_until(lambda: s.stats()["disk_write_errors"] == 1)
    s.close()
    for i in range(6, 9):
        s.put([i], blob(i))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()
    st = s.stats()
    assert (st["disk_write_errors"], st["disk_entries"], st["host_entries"]) == (1, 0, 1)
    assert s.load(s.longest_prefix([8], 0)) == blob(8)
    assert all(s.longest_prefix([i], 0) is None for i in range(8))
