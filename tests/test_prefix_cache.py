"""demesne.engine.prefix_cache.RadixTrie on a model of llama.cpp's unified KV cache
(tests/fake_kv.py). After every operation the trie is checked against the cache: every node's
seq id is on one cell per position of its path computed so far, holding the path's tokens, the
cells being its ancestors' very cells (shared, not copies), and ``n_cells`` is what the nodes'
seq ids hold."""

from __future__ import annotations

import random

import pytest

from demesne.engine.prefix_cache import Node, RadixTrie
from fake_kv import FakeKV, check_trie

NODE_IDS = range(8, 64)  # request seq ids are 0..7, as the scheduler splits them


class Harness:
    def __init__(self, n_cells: int = 512, node_ids: range = NODE_IDS, enabled: bool = True):
        self.kv = FakeKV(n_cells, 64)
        self.trie = RadixTrie(self.kv, node_ids, enabled=enabled)
        self.node_ids = node_ids
        self.locks: list[Node] = []

    def check(self) -> None:
        check_trie(self.trie, self.kv, self.node_ids, self.locks)
        ids = {n.seq_id for n in self.nodes()}
        held = sum(1 for c in self.kv.cells if c is not None and c.seqs & ids)
        assert held == self.trie.n_cells

    def nodes(self) -> list[Node]:
        out, stack = [], [self.trie.root]
        while stack:
            node = stack.pop()
            out += node.children.values()
            stack += node.children.values()
        return out + [n for n in self.locks if n not in out and n is not self.trie.root]

    def insert(self, tokens: list[int]) -> tuple[Node, int] | None:
        hit = self.trie.insert(tokens)
        if self.trie.enabled:  # disabled, a new node is nowhere to be found until it is locked
            self.check()
        return hit

    def lock(self, node: Node) -> None:
        self.trie.lock(node)
        self.locks.append(node)
        self.check()

    def unlock(self, node: Node) -> None:
        self.locks.remove(node)
        self.trie.unlock(node)
        self.check()

    def compute(self, node: Node, limit: int | None = None) -> None:
        """Compute the path to ``node`` as the scheduler does, ``limit`` tokens at most."""
        left = limit if limit is not None else 1 << 30
        while left and (todo := self.trie.next_to_compute(node)) is not None:
            n = min(len(todo.tokens) - todo.n_cached, left)
            self.trie.begin_chunk(todo)
            c = todo.n_cached
            self.kv.decode([(todo.seq_id, todo.start + c, todo.tokens[c : c + n], False)])
            self.trie.computed(todo, n)
            left -= n
            self.check()

    def request(self, tokens: list[int], seq_id: int = 0, keep: bool = True) -> Node:
        """A request's life: insert ``tokens[:-1]``, lock, compute, attach, decode the rest
        privately, retain (``keep``), drop its seq id, unlock. Returns its node."""
        node, _ = self.insert(tokens[:-1])
        self.lock(node)
        self.compute(node)
        if node is not self.trie.root:
            self.kv.copy(node.seq_id, seq_id, -1, node.end)
        self.kv.decode([(seq_id, node.end, tokens[node.end :], True)])
        assert self.kv.context(seq_id, len(tokens) - 1) == tokens
        if keep:
            self.trie.retain(seq_id, tokens)
        self.kv.remove(seq_id)
        self.unlock(node)
        return node

    def tokens_of(self, node: Node) -> list[int]:
        out = []
        while node is not self.trie.root:
            out = node.tokens + out
            node = node.parent
        return out


# --- insert --------------------------------------------------------------------------------------


def test_disjoint_token_lists_are_sibling_branches():
    h = Harness()
    a, matched_a = h.insert([1, 2, 3])
    b, matched_b = h.insert([4, 5])
    assert (matched_a, matched_b) == (0, 0)
    assert h.trie.root.children == {1: a, 4: b}
    assert (a.start, a.end, b.start, b.end) == (0, 3, 0, 2)
    assert h.trie.n_nodes == 2 and h.trie.n_cells == 0
    assert a.seq_id != b.seq_id and {a.seq_id, b.seq_id} <= set(NODE_IDS)


def test_a_shared_prefix_splits_the_node():
    h = Harness()
    first, _ = h.insert([1, 2, 3, 4])
    leaf, matched = h.insert([1, 2, 5])
    assert matched == 2 and h.trie.n_nodes == 3
    top = h.trie.root.children[1]
    assert top.tokens == [1, 2] and top.start == 0
    # The old object keeps the bottom, so whoever holds it still ends where it did.
    assert first.tokens == [3, 4] and first.start == 2 and first.end == 4 and first.parent is top
    assert leaf.tokens == [5] and leaf.parent is top and top.children == {3: first, 5: leaf}
    assert h.tokens_of(first) == [1, 2, 3, 4] and h.tokens_of(leaf) == [1, 2, 5]


def test_a_prefix_of_a_node_ends_at_the_top_of_a_split():
    h = Harness()
    h.insert([1, 2, 3, 4])
    node, matched = h.insert([1, 2])
    assert matched == 2 and node.tokens == [1, 2] and h.trie.n_nodes == 2
    assert node.children[3].tokens == [3, 4]


def test_identical_and_extending_token_lists():
    h = Harness()
    a, _ = h.insert([1, 2, 3])
    again, matched = h.insert([1, 2, 3])
    assert again is a and matched == 3 and h.trie.n_nodes == 1
    longer, matched = h.insert([1, 2, 3, 4, 5])
    assert matched == 3 and longer.parent is a and longer.tokens == [4, 5] and longer.start == 3
    assert h.trie.n_nodes == 2


def test_the_empty_token_list_is_the_root():
    h = Harness()
    node, matched = h.insert([])
    assert node is h.trie.root and matched == 0 and h.trie.n_nodes == 0


@pytest.mark.parametrize("computed", [0, 2, 3, 5, 6])
def test_splitting_a_partly_computed_node_keeps_its_cells(computed):
    h = Harness()
    first, _ = h.insert([1, 2, 3, 4, 5, 6])
    h.lock(first)
    h.compute(first, computed)
    used = h.kv.n_used()
    second, matched = h.insert([1, 2, 3, 9])  # splits after 3 tokens
    assert matched == 3 and h.kv.n_used() == used == h.trie.n_cells
    top = first.parent
    assert top.n_cached == min(3, computed) and first.n_cached == max(0, computed - 3)
    h.lock(second)
    h.compute(first)
    h.compute(second)
    assert h.kv.n_used() == 7 == h.trie.n_cells
    assert h.kv.context(first.seq_id, 5) == [1, 2, 3, 4, 5, 6]
    assert h.kv.context(second.seq_id, 3) == [1, 2, 3, 9]


# --- lock, unlock, evict --------------------------------------------------------------------------


def test_lock_and_unlock_count_holders_along_the_path():
    h = Harness()
    a, _ = h.insert([1, 2, 3, 4])
    b, _ = h.insert([1, 2, 5])
    top = a.parent
    h.lock(a)
    h.lock(b)
    h.lock(b)
    assert (top.refs, a.refs, b.refs) == (3, 1, 2)
    h.unlock(b)
    assert (top.refs, a.refs, b.refs) == (2, 1, 1)
    h.unlock(a)
    h.unlock(b)
    assert (top.refs, a.refs, b.refs) == (0, 0, 0)


def test_a_locked_node_is_never_evicted():
    h = Harness()
    a, _ = h.insert([1, 2, 3])
    b, _ = h.insert([7, 8])
    h.lock(a)
    h.compute(a)
    h.lock(b)
    h.compute(b)
    h.unlock(b)
    assert h.trie.evictable_cells() == 2
    assert h.trie.evict(100) == 2
    h.check()
    assert h.trie.root.children == {1: a} and h.kv.n_used() == 3
    assert h.trie.evict(100) == 0 and h.trie.n_nodes == 1


def test_eviction_is_lru_leaves_first_and_frees_exactly_the_nodes_cells():
    h = Harness()
    a, _ = h.insert([1, 2, 3, 4])
    b, _ = h.insert([1, 2, 5, 6, 7])
    c, _ = h.insert([9, 9])
    top = a.parent
    for node in (a, b, c):
        h.lock(node)
        h.compute(node)
        h.unlock(node)
    h.trie.lock(a)  # a touch: a is the most recently used now, then c, then b
    h.trie.unlock(a)
    assert h.kv.n_used() == h.trie.n_cells == 2 + 2 + 3 + 2
    evicted = []
    while h.trie.n_nodes:
        nodes = h.nodes()
        used, cached = h.kv.n_used(), {n: n.n_cached for n in nodes}
        freed = h.trie.evict(1)
        h.check()
        (gone,) = [n for n in nodes if n not in h.nodes()]
        assert freed == cached[gone] == used - h.kv.n_used()
        evicted.append(gone)
    # Leaves first (top only once both its children are gone), least recently used first.
    assert evicted == [b, c, a, top]


def test_evict_frees_at_least_what_it_is_asked_for_when_it_can():
    h = Harness()
    for i, base in enumerate((10, 20, 30)):
        h.request([base, base + 1, base + 2, base + 3], seq_id=i)
    # Three paths of a node of 3 and a kept leaf of 1 (its last token, decoded privately).
    assert h.trie.n_cells == 12 and h.trie.n_nodes == 6
    assert h.trie.evict(5) == 5  # leaf 10 (1), its parent (3), leaf 20 (1): whole nodes, LRU
    h.check()
    assert h.tokens_of(next(iter(h.trie.root.children.values()))) in ([20, 21, 22], [30, 31, 32])
    assert h.trie.evict(100) == 7 and h.trie.n_nodes == 0


# --- retain ---------------------------------------------------------------------------------------


def test_retain_keeps_a_finished_sequence_for_the_next_request():
    h = Harness()
    tokens = [1, 2, 3, 4, 5, 6]
    node = h.request(tokens, seq_id=0)
    assert h.trie.n_cells == 6 == h.kv.n_used()  # the path [1..5] and a leaf [6] from seq 0's cell
    leaf = node.children[6]
    assert leaf.tokens == [6] and leaf.computed
    hit, matched = h.insert(tokens)
    assert hit is leaf and matched == 6 and h.trie.next_to_compute(hit) is None
    assert h.kv.context(leaf.seq_id, 5) == tokens


def test_retain_drops_what_the_trie_already_has():
    h = Harness()
    h.request([1, 2, 3, 4, 5], seq_id=0)
    nodes, cells = h.trie.n_nodes, h.trie.n_cells
    h.request([1, 2, 3, 4, 5], seq_id=1)  # the same tokens again: the duplicate cell goes
    assert (h.trie.n_nodes, h.trie.n_cells) == (nodes, cells) == (2, 5)
    assert h.kv.n_used() == 5


def test_retain_after_a_longer_match_keeps_only_the_new_part():
    h = Harness()
    h.request([1, 2, 3, 4, 5, 6, 7], seq_id=0)  # trie: [1..6] + [7]
    node = h.request([1, 2, 3, 9], seq_id=1)  # splits [1..6] after 3; [9] was decoded privately
    assert node.tokens == [1, 2, 3]
    assert node.children[9].tokens == [9] and node.children[9].computed
    assert h.trie.n_cells == h.kv.n_used() == 8


def test_retain_below_an_uncomputed_node_keeps_nothing():
    h = Harness()
    other, _ = h.insert([1, 2, 3, 4])
    h.lock(other)  # someone else's prefill, not computed yet
    # A sequence that computed [1, 2] privately (preempted before attaching, say) and finishes.
    h.kv.decode([(0, 0, [1, 2, 3, 4, 5], False)])
    h.trie.retain(0, [1, 2, 3, 4, 5])
    h.kv.remove(0)
    h.check()
    assert h.trie.n_cells == 0 and h.kv.n_used() == 0 and other.children == {}


# --- disabled -------------------------------------------------------------------------------------


def test_disabled_never_matches_and_drops_a_node_when_unlocked():
    h = Harness(enabled=False)
    hits = []
    for tokens in ([1, 5, 6], [1, 5, 6], [1, 7]):  # identical ones, and every prompt shares BOS
        node, matched = h.insert(tokens)
        h.lock(node)  # the scheduler locks what it inserts at once
        h.compute(node)
        hits.append((node, matched))
    (a, _), (b, _), (c, _) = hits
    assert len({a, b, c}) == 3 and all(matched == 0 for _, matched in hits)
    assert h.trie.n_nodes == 3 and h.trie.root.children == {}
    assert h.kv.n_used() == 8 == h.trie.n_cells
    h.unlock(b)
    assert h.trie.n_nodes == 2 and h.kv.n_used() == 5
    h.trie.retain(0, [1, 5, 6])  # keeps nothing
    h.unlock(a)
    h.unlock(c)
    assert h.trie.n_nodes == 0 and h.trie.n_cells == 0 and h.kv.n_used() == 0


def test_disabled_request_keeps_nothing():
    h = Harness(enabled=False)
    h.request([1, 2, 3, 4], seq_id=0)
    h.request([1, 2, 3, 4], seq_id=1)
    assert h.trie.n_nodes == 0 and h.kv.n_used() == 0


# --- node seq ids ---------------------------------------------------------------------------------


def test_running_out_of_node_ids_evicts_the_least_recently_used_leaf():
    h = Harness(node_ids=range(8, 10))
    h.request([1, 2, 3], seq_id=0)  # [1, 2] and the kept [3]: both ids
    h.request([1, 2, 3], seq_id=1)  # touches them again
    assert h.trie.ids.n_free == 0
    node, matched = h.insert([7, 8])  # a new branch: the LRU leaf [3] gives its id
    assert matched == 0 and h.trie.n_nodes == 2 and h.kv.n_used() == 2
    assert h.tokens_of(h.trie.root.children[1]) == [1, 2]


def test_insert_returns_none_when_every_node_is_locked():
    h = Harness(node_ids=range(8, 10))
    a, _ = h.insert([1, 2])
    b, _ = h.insert([3, 4])
    h.lock(a)
    h.lock(b)
    assert h.insert([5, 6]) is None
    assert h.insert([1, 7]) is None  # a split needs an id too
    assert h.trie.n_nodes == 2 and a.tokens == [1, 2]


def test_an_unheld_chain_never_blocks_an_insert():
    h = Harness(node_ids=range(8, 11))
    h.request([1, 2, 3], seq_id=0)  # [1, 2] + [3]
    h.request([1, 2, 3, 4, 5], seq_id=1)  # [4] below [3], [5] dropped: no id left for it
    assert h.trie.n_nodes == 3 and h.trie.ids.n_free == 0
    assert all(n.refs == 0 for n in h.nodes())
    assert h.insert([1, 2, 3, 4, 9]) is not None  # extends the chain's leaf


# --- randomized -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("tiers", [None, 0, 3], ids=["no-tiers", "tiers", "tiers-swa3"])
def test_random_requests_keep_the_trie_and_the_cache_in_step(seed, tiers):
    """``tiers``: evicted leaves are saved and some inserts first restore a saved path; with
    a sliding window of 3 (whose gaps the fake cache does not model, but the trie's structure
    and counts must hold)."""
    rng = random.Random(seed)
    h = Harness(n_cells=1024, node_ids=range(8, 8 + rng.choice([6, 12, 56])))
    saved: dict[tuple[int, ...], list] = {}
    if tiers is not None:
        h.trie.n_swa = tiers
        h.trie.on_evict = lambda node: saved.__setitem__(tuple(h.trie.path_tokens(node)), h.kv.save_state(node.seq_id))
    stems = [[rng.randrange(1, 20) for _ in range(rng.randrange(1, 8))] for _ in range(4)]
    held: list[tuple[Node, int]] = []  # (node, seq id) of requests in flight
    free_ids = list(range(8))
    for _ in range(300):
        op = rng.random()
        if op < 0.45 and free_ids:
            tail = [rng.randrange(1, 20) for _ in range(rng.randrange(0, 6))]
            tokens = list(rng.choice(stems)) + tail
            if saved and rng.random() < 0.5:
                path = list(rng.choice(list(saved)))
                h.trie.restore(path, lambda seq_id: h.kv.restore_state(saved[tuple(path)], seq_id))
                h.check()
                tokens = path + tail if rng.random() < 0.5 else tokens
            hit = h.insert(tokens)
            if hit is None:
                continue
            node, matched = hit
            assert h.tokens_of(node) == tokens and matched <= len(tokens)
            h.lock(node)
            if rng.random() < 0.7:
                h.compute(node, rng.randrange(1, 12))
            held.append((node, free_ids.pop()))
        elif op < 0.8 and held:
            node, seq_id = held.pop(rng.randrange(len(held)))
            h.compute(node)
            extra = [rng.randrange(1, 20) for _ in range(rng.randrange(1, 5))]
            tokens = h.tokens_of(node) + extra
            if node is not h.trie.root:
                h.kv.copy(node.seq_id, seq_id, -1, node.end)
            h.kv.decode([(seq_id, node.end, extra, True)])
            if rng.random() < 0.8:
                h.trie.retain(seq_id, tokens)
            h.kv.remove(seq_id)
            h.unlock(node)
            free_ids.append(seq_id)
        else:
            h.trie.evict(rng.randrange(1, 20))
            h.check()
    for node, seq_id in held:
        h.unlock(node)
    h.trie.evict(1 << 30)
    h.check()
    assert h.trie.n_nodes == 0 and h.kv.n_used() == 0


# --- the tiers below: saved paths restored, sliding-window gaps ---------------------------------


def tiered(n_swa: int = 0) -> tuple[Harness, dict]:
    """A harness whose evictions save the path's state into ``saved`` (by token tuple)."""
    h = Harness()
    saved: dict[tuple[int, ...], list] = {}
    h.trie.n_swa = n_swa
    h.trie.on_evict = lambda node: saved.__setitem__(tuple(h.trie.path_tokens(node)), h.kv.save_state(node.seq_id))
    return h, saved


def restore(h: Harness, saved: dict, tokens: list[int]) -> Node | None:
    node = h.trie.restore(tokens, lambda seq_id: h.kv.restore_state(saved[tuple(tokens)], seq_id))
    h.check()
    return node


def test_an_evicted_path_is_saved_and_restored_as_a_computed_leaf():
    h, saved = tiered()
    path = list(range(1, 21))
    h.request(path + [99])
    h.trie.evict(10**9)
    assert h.trie.n_cells == 0 and h.kv.n_used() == 0
    assert tuple(path + [99]) in saved  # the whole computed path of the evicted leaf
    leaf = restore(h, saved, path + [99])
    assert leaf is not None and leaf.computed and leaf.start == 0 and h.trie.n_cells == 21
    assert h.kv.context(leaf.seq_id, 20) == path + [99]


def test_a_restore_below_a_resident_prefix_shares_its_cells():
    h, saved = tiered()
    shared = list(range(1, 11))
    h.request(shared + [50, 51, 52, 53])
    h.request(shared + [60, 61, 62, 63])  # shared is now a resident inner node
    h.trie.evict(4)  # the least recently used leaf: [50..53]
    key = tuple(shared + [50, 51, 52, 53])
    assert key in saved
    leaf = restore(h, saved, list(key))
    assert leaf.start == 10 and leaf.parent.end == 10  # check() proved the cells below 10 shared
    assert h.kv.n_used() == h.trie.n_cells == 18


def test_no_restore_where_the_path_is_being_computed():
    h, saved = tiered()
    path = list(range(1, 21))
    h.request(path)
    h.trie.evict(10**9)
    node, _ = h.insert(path[:15])  # someone waits on a part of the path, not computed yet
    h.lock(node)
    assert restore(h, saved, path[:-1]) is None


def test_a_restore_drops_an_unheld_uncomputed_path_in_its_way():
    """A request that inserted its path but was not admitted leaves an empty leaf: it must not
    pass for work under way, or the saved path would never come back."""
    h, saved = tiered()
    path = list(range(1, 21))
    h.request(path)
    h.trie.evict(10**9)
    node, _ = h.insert(path[:-1] + [7, 8])
    h.trie.prune(node)  # what the scheduler does when it cannot admit
    assert h.trie.n_nodes == 0
    h.insert(path[:-1] + [7, 8])  # and if something is left anyway
    leaf = restore(h, saved, path[:-1])
    assert leaf is not None and leaf.computed and h.trie.n_cells == 19


def test_branching_inside_a_restored_window_gap_recomputes_the_top_only():
    """n_swa 4: a restored 20-token path holds sliding-window cells for positions 17..20 only.
    It may be continued from its end; a branch at 12 would attend to 8..11, which it lacks:
    the first 12 tokens become a node of their own, recomputed, and the restored bottom keeps
    its cells (its own copies of 0..11 as n_extra) for whoever continues from its end."""
    h, saved = tiered(n_swa=4)
    path = list(range(1, 21))
    h.request(path + [99])
    h.trie.evict(10**9)
    leaf = restore(h, saved, path + [99])
    assert leaf.swa_gap == (0, 21 - 4)
    child, _ = h.insert(path + [99, 7, 8])  # continuing from the end is fine
    h.lock(child)
    h.compute(child)
    assert leaf.computed and leaf.n_cached == 21
    h.unlock(child)
    branch, matched = h.insert(path[:12] + [500])
    h.check()
    assert matched == 12
    top = branch.parent
    assert top.n_cached == 0 and top.children[path[12]] is leaf
    assert (leaf.start, leaf.n_cached, leaf.n_extra) == (12, 9, 12) and h.trie.n_cells == 21 + 2
    h.lock(branch)
    h.compute(branch)
    assert h.kv.context(branch.seq_id, 12) == path[:12] + [500]
    h.unlock(branch)
    again, _ = h.insert(path + [99, 7, 8, 9])  # the restored bottom still serves its end
    assert again.parent is child and child.computed
    h.trie.evict(10**9)
    h.check()
    assert h.trie.n_cells == 0 and h.kv.n_used() == 0


def test_a_gap_split_merges_back_when_ids_run_short():
    h, saved = tiered(n_swa=4)
    path = list(range(1, 21))
    h.request(path + [99])
    h.trie.evict(10**9)
    leaf = restore(h, saved, path + [99])
    branch, _ = h.insert(path[:12] + [500])
    top = branch.parent
    h.lock(top)
    h.compute(top)
    h.unlock(top)
    h.trie._remove(branch)  # the branch goes; top has one child, the restored bottom
    h.check()
    assert h.trie._merge_one(protect=None)
    h.check()
    assert leaf.start == 0 and leaf.n_extra == 0 and leaf.n_cached == 21 and h.trie.n_cells == 21


def test_a_branch_before_the_gap_keeps_the_cells():
    h, saved = tiered(n_swa=4)
    shared = list(range(1, 11))
    h.request(shared + [1])
    h.request(shared + list(range(40, 60)))
    h.trie.evict(20)  # the 20-token tail of the second path goes
    key = next(k for k in saved if len(k) == 30)
    leaf = restore(h, saved, list(key))
    assert leaf.start == 10 and leaf.swa_gap == (10, 26)
    branch, matched = h.insert(shared + [77])  # parts at 10: the gap's start, outside it
    assert matched == 10 and leaf.n_cached == 20
