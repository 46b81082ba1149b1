"""A model of llama.cpp's unified KV cache for the scheduler and prefix-trie tests.

Cells carry a position, the token decoded there and a set of sequence ids, as in
``llama_kv_cells``. ``copy`` and ``remove`` follow ``llama_memory_seq_cp`` /
``llama_memory_seq_rm`` on a unified cache (membership only; a cell nobody holds is free),
and ``decode`` follows what ``llama_decode`` checks before it writes a batch: seq ids below
``n_seq_max``, each sequence's positions in the batch consecutive and starting right after the
last position the cache holds for it (``Y = X + 1``), and a free cell for every token, all or
nothing. A token attends to every cell of its sequence at positions up to its own; ``model``
turns that context into the "sampled" token, so a sequence that sees other tokens than its own
samples something else.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from demesne.engine.prefix_cache import Node, RadixTrie


class DecodeFailed(AssertionError):
    def __init__(self, code: int, why: str):
        super().__init__(f"llama_decode would return {code}: {why}")
        self.code = code


def model(context: list[int]) -> int:
    """The token a deterministic "model" samples after ``context``."""
    return 1000 + zlib.crc32(repr(context).encode()) % 9000


@dataclass(eq=False)
class Cell:
    pos: int
    token: int
    seqs: set[int] = field(default_factory=set)
    swa: bool = True  # the sliding-window layers have this cell too (not so below a restored window)


def _in(pos: int, p0: int, p1: int) -> bool:
    return (p0 < 0 or pos >= p0) and (p1 < 0 or pos < p1)


class FakeKV:
    def __init__(self, n_cells: int, n_seq_max: int = 256, n_swa: int = 0):
        self.cells: list[Cell | None] = [None] * n_cells
        self.n_seq_max = n_seq_max
        # A sliding window (llama_kv_cache_iswa): a restored state has the window layers' cells
        # for its last n_swa positions only; a sequence's last position is the window cache's.
        self.n_swa = n_swa
        self.n_copies = 0

    def _check_id(self, seq_id: int) -> None:
        assert 0 <= seq_id < self.n_seq_max, f"seq id {seq_id} outside [0, {self.n_seq_max})"

    # -- the KVOps protocol --------------------------------------------------------------

    def copy(self, src: int, dst: int, p0: int, p1: int) -> None:
        self._check_id(src)
        self._check_id(dst)
        self.n_copies += 1
        if src == dst:
            return
        for cell in self.cells:
            if cell is not None and src in cell.seqs and _in(cell.pos, p0, p1):
                cell.seqs.add(dst)

    def remove(self, seq_id: int, p0: int = -1, p1: int = -1) -> None:
        self._check_id(seq_id)
        for i, cell in enumerate(self.cells):
            if cell is not None and seq_id in cell.seqs and _in(cell.pos, p0, p1):
                cell.seqs.discard(seq_id)
                if not cell.seqs:
                    self.cells[i] = None

    # -- decoding ------------------------------------------------------------------------

    def decode(self, spans: list[tuple[int | list[int], int, list[int], bool]]) -> list[int]:
        """Write a batch of ``(seq id or ids, first position, tokens, output)`` spans; returns
        the sampled token of each span that asks for output, in order (the first seq id's)."""
        spans = [([s] if isinstance(s, int) else list(s), p, t, o) for s, p, t, o in spans]
        starts: dict[int, list[int]] = {}
        for seq_ids, pos0, tokens, _ in spans:
            assert tokens, "an empty span"
            for seq_id in seq_ids:
                self._check_id(seq_id)
                starts.setdefault(seq_id, []).extend(range(pos0, pos0 + len(tokens)))
        for seq_id, positions in starts.items():
            if positions != list(range(positions[0], positions[0] + len(positions))):
                raise DecodeFailed(-1, f"sequence {seq_id} positions are not continuous")
            last = self.pos_max(seq_id)
            if last >= 0 and positions[0] != last + 1:
                raise DecodeFailed(-1, f"sequence {seq_id}: X = {last}, Y = {positions[0]}")
        n = sum(len(t) for _, _, t, _ in spans)
        free = [i for i, c in enumerate(self.cells) if c is None]
        if len(free) < n:
            raise DecodeFailed(1, f"no slot for {n} tokens, {len(free)} cells free")
        slots = iter(free)
        for seq_ids, pos0, tokens, _ in spans:
            for k, token in enumerate(tokens):
                self.cells[next(slots)] = Cell(pos0 + k, token, set(seq_ids))
        return [model(self.context(s[0], p0 + len(t) - 1)) for s, p0, t, out in spans if out]

    # -- saved state (llama_state_seq_get_data / set_data) ---------------------------------

    def save_state(self, seq_id: int) -> list[tuple[int, int]]:
        return sorted((c.pos, c.token) for c in self.cells if c is not None and seq_id in c.seqs)

    def restore_state(self, state: list[tuple[int, int]], seq_id: int) -> bool:
        """New cells for ``seq_id`` (none shared), all or nothing; with a sliding window,
        those below the state's last ``n_swa`` positions lack the window layers' cells."""
        free = [i for i, c in enumerate(self.cells) if c is None]
        if len(free) < len(state):
            return False
        self.remove(seq_id)  # llama_state_seq_set_data clears the destination first
        end = max((pos for pos, _ in state), default=-1) + 1
        for i, (pos, token) in zip(free, state):
            self.cells[i] = Cell(pos, token, {seq_id}, swa=not self.n_swa or pos >= end - self.n_swa)
        return True

    # -- looking inside ------------------------------------------------------------------

    def context(self, seq_id: int, pos: int) -> list[int]:
        """The tokens a query of ``seq_id`` at ``pos`` attends to, in position order."""
        seen = [c for c in self.cells if c is not None and seq_id in c.seqs and c.pos <= pos]
        out = [c.token for c in sorted(seen, key=lambda c: c.pos)]
        if self.n_swa:  # a window position the window layers lack changes what is sampled
            window = {c.pos for c in seen if c.swa and c.pos > pos - self.n_swa}
            out += [-1 - p for p in range(max(0, pos - self.n_swa + 1), pos + 1) if p not in window]
        return out

    def pos_max(self, seq_id: int) -> int:
        """The last position of ``seq_id`` (the window layers' cache's, as llama.cpp reads it)."""
        cells = (c for c in self.cells if c is not None and seq_id in c.seqs and (c.swa or not self.n_swa))
        return max((c.pos for c in cells), default=-1)

    def n_used(self) -> int:
        return sum(c is not None for c in self.cells)

    def held(self, seq_id: int) -> dict[int, list[int]]:
        """Position -> indices of the cells ``seq_id`` is on."""
        out: dict[int, list[int]] = {}
        for i, cell in enumerate(self.cells):
            if cell is not None and seq_id in cell.seqs:
                out.setdefault(cell.pos, []).append(i)
        return out

    def seq_ids(self) -> set[int]:
        return {s for c in self.cells if c is not None for s in c.seqs}


# -- the prefix trie against the cache -------------------------------------------------------


def path_cells(kv: FakeKV, node: Node, n: int) -> dict[int, int]:
    """Position -> the one cell ``node``'s seq id has there, for positions 0..n-1; fails when a
    position has no cell or several."""
    held = kv.held(node.seq_id)
    out = {}
    for p in range(n):
        cells = held.get(p, [])
        assert len(cells) == 1, f"node seq {node.seq_id} has {len(cells)} cells at position {p}"
        out[p] = cells[0]
    return out


def check_trie(trie: RadixTrie, kv: FakeKV, id_range: range, holders=()) -> dict:
    """The trie's structure, counters and KV invariant (c). ``id_range`` is the trie's seq ids,
    ``holders`` the nodes requests have locked (one entry per lock). Returns each node's path:
    position -> cell."""
    paths: dict[Node, dict[int, int]] = {trie.root: {}}
    ids: set[int] = set()
    n_cells = n_nodes = 0
    refs: dict[Node, int] = {}
    for node in holders:
        while node is not trie.root:
            refs[node] = refs.get(node, 0) + 1
            node = node.parent
    # Every indexed node, and the nodes requests hold (unindexed when the cache is disabled).
    nodes, stack = [], [trie.root]
    while stack:
        parent = stack.pop()
        for key, node in parent.children.items():
            assert node.tokens and key == node.tokens[0] and node.parent is parent
            nodes.append(node)
            stack.append(node)
    nodes += [n for n in refs if n not in set(nodes)]
    for node in sorted(nodes, key=_depth):
        parent = node.parent
        assert parent in paths, "a node whose parent left the trie"
        n_nodes += 1
        n_cells += node.n_cached
        assert node.tokens and node.start == parent.end, "a child starts where its parent ends"
        assert 0 <= node.n_cached <= len(node.tokens)
        assert node.refs == refs.get(node, 0), f"refs {node.refs}, holders {refs.get(node, 0)}"
        assert node.seq_id in id_range and node.seq_id not in ids
        ids.add(node.seq_id)
        n_cells += node.n_extra
        if node.n_cached and not node.n_extra:
            assert parent is trie.root or parent.computed, "computed below an uncomputed parent"
        _check_node_cells(kv, node, paths[parent], paths)
    assert n_nodes == trie.n_nodes, f"{n_nodes} nodes reachable, the trie counts {trie.n_nodes}"
    assert n_cells == trie.n_cells, f"nodes hold {n_cells} cells, the trie counts {trie.n_cells}"
    free = set(trie.ids._free)
    assert not free & ids and free | ids == set(id_range), "node seq ids leak"
    return paths


def _path_tokens(node: Node) -> list[int]:
    out = []
    while node.parent is not None:
        out = node.tokens + out
        node = node.parent
    return out


def _depth(node: Node) -> int:
    depth = 0
    while node.parent is not None:
        node, depth = node.parent, depth + 1
    return depth


def _check_node_cells(kv: FakeKV, node: Node, parent_path: dict[int, int], paths) -> None:
    held = kv.held(node.seq_id)
    for p, cells in held.items():
        assert len(cells) == 1, f"node seq {node.seq_id} has {len(cells)} cells at position {p}"
    end = node.start + node.n_cached
    if node.n_cached == 0:
        # Not begun (or the bottom of a split that had not reached it): a prefix of the path.
        assert all(p < node.start and held[p][0] == parent_path.get(p) for p in held), (
            f"node seq {node.seq_id} holds cells off its path"
        )
        assert sorted(held) == list(range(len(held))), "positions with a gap"
        paths[node] = {**parent_path}
        return
    assert sorted(held) == list(range(end)), f"node {node.seq_id}: {sorted(held)}, not 0..{end - 1}"
    below = node.start - node.n_extra  # above it: the node's own copies (a split in a gap)
    for p in range(below):
        assert held[p][0] == parent_path[p], f"node seq {node.seq_id} at {p}: not its parent's cell"
    tokens = _path_tokens(node)
    own = {}
    for p in range(below, node.start):
        assert kv.cells[held[p][0]].token == tokens[p], f"node {node.seq_id}: token at {p}"
        own[p] = held[p][0]
    for p in range(node.start, end):
        cell = kv.cells[held[p][0]]
        assert cell.token == node.tokens[p - node.start], f"node {node.seq_id}: token at {p}"
        own[p] = held[p][0]
    paths[node] = {**parent_path, **own}
