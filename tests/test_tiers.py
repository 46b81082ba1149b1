"""The trie's tiers below the KV cache on the real model: a conversation evicted to host memory,
and one restored from disk by a new engine, continue as a fresh computation would; only the new
turn is prefilled; a sliding-window model is never continued from inside a restored state's gap."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from demesne.engine.core import Engine
from demesne.protocol import Generate, SamplingParams

from conftest import make_engine, run_engine
from test_prefix_engine import STORY, teacher_forced_gap

GREEDY = SamplingParams(temperature=0.0)


def conversation(tokenizer, n: int = 600) -> tuple[list[int], list[int]]:
    """A long first turn and a short second user line."""
    first = tokenizer.encode(STORY * 20)[:n]
    return first, tokenizer.encode("\nUser: And then what happened?\nAssistant:", add_special=False)


def evict_all(engine: Engine) -> None:
    engine.scheduler.drop_cached()
    assert engine.stats()["prefix_cache_cells"] == 0


def turn(engine: Engine, rid: str, prompt: list[int], n: int = 8) -> tuple[list[int], dict, dict]:
    before = engine.stats()
    out = run_engine(engine, [Generate(rid, prompt, n, GREEDY)])[rid]
    return out, before, engine.stats()


def delta(before: dict, after: dict, name: str) -> float:
    return after[name] - before[name]


LAYOUTS = ["streams", "unified"]


@pytest.fixture(scope="module", params=LAYOUTS)
def tiered(model_path, request):
    engine = make_engine(model_path, batch_size=2048, host_cache=256 << 20, kv_layout=request.param)
    yield engine
    engine.close()
    engine.runner.close()


def test_conversation_evicted_to_host_memory_comes_back(tiered, tokenizer):
    """Teacher-forced: every greedy token of the second turn, restored from host memory, is the
    best token of a fresh one-sequence computation or within 0.5 logits of it."""
    first, line = conversation(tokenizer)
    out1, _, _ = turn(tiered, "h1", first)
    evict_all(tiered)  # the whole conversation leaves the KV cache...
    assert tiered.stats()["kv_saves_total"] >= 1  # ...for host memory
    second = first + out1 + line
    out2, before, after = turn(tiered, "h2", second)
    assert delta(before, after, "kv_restores_total") == 1
    assert delta(before, after, "kv_restored_tokens_total") >= len(first)
    # Only the new turn is prefilled (and the one private last token).
    assert delta(before, after, "prefill_tokens_total") <= len(line) + 1
    assert delta(before, after, "prompt_tokens_cached_total") >= len(first)
    assert teacher_forced_gap(tiered, second, out2) < 0.5


def test_short_paths_are_recomputed_not_saved(tiered, tokenizer):
    before = tiered.stats()
    turn(tiered, "short", tokenizer.encode("A short question?"))
    evict_all(tiered)
    assert delta(before, tiered.stats(), "kv_saves_total") == 0


def test_restore_is_exact_without_flash_attention(model_path, tokenizer):
    """With flash attention off llama.cpp's numbers do not depend on where cells lie: the
    next-token logits after a restore equal those before the eviction, bit for bit (same
    one-token batch both times). The restored leaf shares the cells its resident parent holds."""
    engine = make_engine(model_path, batch_size=2048, host_cache=256 << 20, flash_attn="off", kv_layout="unified")
    try:
        trie, runner, store = engine.scheduler.trie, engine.runner, engine.tiers.store
        first, _ = conversation(tokenizer, 1200)
        parent = compute(engine, first[:600])
        leaf = compute(engine, first)
        assert leaf.parent is parent and trie.n_cells == 1200
        before = next_logits(engine, first)
        trie.evict(1)  # the leaf alone, saved on its way out; the parent stays
        assert trie.n_cells == 600 and engine.stats()["kv_saves_total"] == 1
        entry = store.longest_prefix(first, 0)
        assert entry is not None and entry.n_tokens == len(first)
        restored = trie.restore(first, lambda seq_id: runner.restore_state(store.load(entry), seq_id))
        assert restored is not None and restored.parent is parent and trie.n_cells == 1200
        assert np.array_equal(next_logits(engine, first), before)
    finally:
        engine.close()
        engine.runner.close()


def test_streams_restore_and_copy_are_exact_without_flash_attention(model_path, tokenizer):
    """Per-sequence streams on the real llama.cpp: a saved state restored into another stream,
    and a whole-stream copy (applied at the next decode) cut back to a prefix, give the same
    next-token logits as the stream they came from, bit for bit (flash attention off; same
    one-token batch each time)."""
    engine = make_engine(model_path, batch_size=2048, host_cache=256 << 20, flash_attn="off")
    try:
        runner, batch = engine.runner, engine.runner.batch
        first, _ = conversation(tokenizer, 1200)

        def last_token_logits(seq_id: int) -> np.ndarray:
            batch.clear()
            batch.add_span([first[-1]], len(first) - 1, seq_id, True)
            logits = np.array(runner.decode()[0])
            runner.remove(seq_id, len(first) - 1, -1)
            return logits

        batch.clear()
        batch.add_span(first[:-1], 0, 0, False)
        runner.decode()
        state = runner.save_state(0)
        before = last_token_logits(0)
        runner.remove(0)
        assert runner.restore_state(state, 3)
        assert np.array_equal(last_token_logits(3), before)
        batch.clear()
        batch.add_span(first[-1:] * 5, len(first) - 1, 3, False)  # more tokens on the source...
        runner.decode()
        runner.copy_stream(3, 5)
        runner.remove(5, len(first) - 1, -1)  # ...cut off the copy
        assert np.array_equal(last_token_logits(5), before)
    finally:
        engine.close()
        engine.runner.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_branching_inside_a_restored_window_gap_recomputes(model_path, tokenizer, layout):
    """Gemma 3's saved state keeps only the last 512 cells of its sliding-window layers: a
    request that parts from a restored 1,200-token path at token 900 must not reuse the
    restored cells (its window would reach into cells the state lacks); it recomputes from
    the last point the state supports and matches a fresh computation."""
    engine = make_engine(model_path, batch_size=2048, host_cache=256 << 20, prefix_keep=1.0, kv_layout=layout)
    fresh = make_engine(model_path, batch_size=2048, prefix_cache=False)
    try:
        assert engine.runner.n_swa == 512
        first, line = conversation(tokenizer, 1200)
        # (streams save a slot's whole stream: the prompt is the path; unified saves the trie's
        # path, the prompt but its last token)
        run_engine(engine, [Generate("a", first if layout == "streams" else first + [first[0]], 1, GREEDY)])
        evict_all(engine)
        run_engine(engine, [Generate("b", first + line, 1, GREEDY)])  # restores the 1,200 tokens
        assert engine.stats()["kv_restores_total"] == 1
        if layout == "unified":
            assert deepest(engine.scheduler.trie, first).swa_gap == (0, len(first) - 512)
        else:
            assert [slot.gap for slot in engine.scheduler.slots if slot.owner is None and len(slot.held)] == [len(first) - 512]
        branch = first[:900] + line
        before = engine.stats()
        out = run_engine(engine, [Generate("c", branch, 8, GREEDY)])["c"]
        assert delta(before, engine.stats(), "prefill_tokens_total") >= 900  # recomputed
        expected = run_engine(fresh, [Generate("c", branch, 8, GREEDY)])["c"]
        if out != expected:
            assert teacher_forced_gap(engine, branch, out) < 0.5
    finally:
        for e in (engine, fresh):
            e.close()
            e.runner.close()


@pytest.fixture(scope="module")
def stopped_engine_disk(model_path, tokenizer, tmp_path_factory):
    """Per KV layout, made once: an engine's first turn of the conversation, and the directory
    its disk tier left when it stopped (each test works on a copy)."""
    made: dict[str, tuple[list[int], str]] = {}

    def get(layout: str) -> tuple[list[int], str]:
        if layout not in made:
            where = tmp_path_factory.mktemp(f"disk-{layout}")
            one = make_engine(model_path, batch_size=2048, host_cache=256 << 20, disk_cache=str(where), kv_layout=layout)
            try:
                out1, _, _ = turn(one, "d1", conversation(tokenizer)[0])
            finally:
                one.close()  # what the KV cache and host memory hold goes to disk
                one.runner.close()
            made[layout] = out1, str(where)
        return made[layout]

    return get


@pytest.mark.parametrize("damage", [None, "corrupt", "truncate", "foreign"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_disk_tier_survives_a_restart(model_path, layout, tokenizer, tmp_path, damage, stopped_engine_disk):
    """An engine stops, keeping what it held on disk; a new engine on the same directory restores it for the next turn. A damaged or foreign
    file is ignored and removed: the turn is recomputed and still right."""
    first, line = conversation(tokenizer)
    out1, saved = stopped_engine_disk(layout)
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    disk = dict(host_cache=256 << 20, disk_cache=str(tmp_path), kv_layout=layout)
    paths = [tmp_path / f for f in os.listdir(tmp_path) if not f.startswith(".")]
    assert paths  # the conversation, and its first turn's prompt
    for path in paths:
        data = bytearray(path.read_bytes())
        if damage == "corrupt":
            data[len(data) // 2] ^= 0xFF
        elif damage == "truncate":
            data = data[: len(data) // 2]
        path.write_bytes(bytes(data))
    two = make_engine(model_path, batch_size=2048, **disk, **({"cache_type_k": "q8_0"} if damage == "foreign" else {}))
    try:
        second = first + out1 + line
        out2, before, after = turn(two, "d2", second)
        if damage is None:
            assert delta(before, after, "kv_restores_disk_total") == 1
            assert delta(before, after, "prefill_tokens_total") <= len(line) + 1
        else:
            assert delta(before, after, "kv_restores_total") == 0
            assert delta(before, after, "prefill_tokens_total") >= len(second) - 1
            assert not any(path.exists() for path in paths)
        if damage is None:  # (the others were recomputed)
            assert teacher_forced_gap(two, second, out2) < 0.5
    finally:
        two.close()
        two.runner.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unwritable_disk_cache_degrades_to_host_only(model_path, layout, tokenizer, tmp_path, caplog):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    engine = make_engine(model_path, batch_size=2048, host_cache=256 << 20, disk_cache=str(blocked / "cache"), kv_layout=layout)
    try:
        first, line = conversation(tokenizer)
        out1, _, _ = turn(engine, "u1", first)
        evict_all(engine)
        _, before, after = turn(engine, "u2", first + out1 + line)
        assert delta(before, after, "kv_restores_total") == 1  # host memory still serves
        assert any("disk" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    finally:
        engine.close()
        engine.runner.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_host_cache_zero_turns_the_tiers_off(model_path, layout, tokenizer):
    engine = make_engine(model_path, batch_size=2048, host_cache=0, kv_layout=layout)
    try:
        first, line = conversation(tokenizer)
        out1, _, _ = turn(engine, "z1", first)
        evict_all(engine)
        _, before, after = turn(engine, "z2", first + out1 + line)
        assert engine.tiers is None and "kv_restores_total" not in after
        assert delta(before, after, "prefill_tokens_total") >= len(first)
    finally:
        engine.runner.close()


# -- helpers -----------------------------------------------------------------------------


def deepest(trie, tokens: list[int]):
    node, i = trie.root, 0
    while i < len(tokens) and tokens[i] in node.children:
        node = node.children[tokens[i]]
        i += len(node.tokens)
    return node


def compute(engine: Engine, tokens: list[int]):
    """Insert ``tokens`` into the trie and decode what it lacks, as the scheduler would."""
    trie, runner = engine.scheduler.trie, engine.runner
    node, _ = trie.insert(tokens)
    trie.begin_chunk(node)
    for i in range(node.start, node.end, 512):
        part = tokens[i : min(i + 512, node.end)]
        runner.batch.clear()
        runner.batch.add_span(part, i, node.seq_id, False)
        runner.decode()
        trie.computed(node, len(part))
    return node


def next_logits(engine: Engine, path: list[int]) -> np.ndarray:
    """Logits for the token after ``path``, decoded alone on a copy of the path's cells."""
    runner, trie = engine.runner, engine.scheduler.trie
    node = deepest(trie, path)
    scratch = 0  # a request seq id; none is running
    runner.copy(node.seq_id, scratch, -1, len(path))
    runner.batch.clear()
    runner.batch.add_span([path[-1]], len(path) - 1, scratch, True)
    runner.remove(scratch, len(path) - 1, -1)
    logits = np.array(runner.decode()[0])
    runner.remove(scratch)
    return logits
