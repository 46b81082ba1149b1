"""Radix trie over token spans: the KV cells that in-flight and recent sequences share.

Each node holds a span of tokens at fixed positions ``[start, end)`` and owns a llama.cpp
sequence id (a *node seq*). Invariant: a node's seq id is on every KV cell of its whole
path from the root that has been computed, its own span's computed prefix included. So

- a request whose prompt ends at node ``L`` attaches with one metadata-only
  ``copy(L.seq_id, S, -1, L.end)`` (a unified KV cache lets one cell carry many sequence
  ids), then decodes privately under its own seq id ``S``;
- a node's tokens are computed under its own seq id, once, however many requests wait on it;
  before its first chunk it takes its parent's path (``copy(parent.seq_id, seq_id, ...)``);
- evicting a leaf is ``remove(seq_id)``: its own cells are freed, its ancestors' cells stay
  (their own seq ids hold them).

The contract:

- :meth:`RadixTrie.insert` walks ``tokens`` from the root, splitting a node where they part
  from it, and adds a leaf for the rest; returns the node that ends at ``len(tokens)``.
- :meth:`RadixTrie.lock` / :meth:`RadixTrie.unlock` count the requests holding a path; a
  locked node is never evicted.
- :meth:`RadixTrie.retain` keeps a finished (or preempted) sequence's tokens: what the trie
  lacks becomes a leaf that takes the sequence's cells before the caller drops its seq id.
- :meth:`RadixTrie.evict` frees unlocked leaves, least recently used first, until enough
  cells are free.

Below the KV cache (kv_store.py): :meth:`RadixTrie.evict` hands each leaf to ``on_evict``
first, which may save its path's state to host memory; :meth:`RadixTrie.restore` puts a saved
path back as a computed leaf. On an SWA model a saved state keeps only the last ``n_swa``
cells of the sliding-window layers, so a restored leaf longer than the window has a *gap*:
it may be continued from its end (or branched at its start), not from a point inside. A
split inside the gap gives the top part to a new node that recomputes it; the bottom keeps its
state (continued from its end, as before).

With ``enabled=False`` (``--no-prefix-cache``) nothing is matched or kept: every insert is a
fresh branch from the root and a node is evicted as soon as nobody holds it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Protocol


class KVOps(Protocol):
    def copy(self, src: int, dst: int, p0: int, p1: int) -> None: ...
    def remove(self, seq_id: int, p0: int = -1, p1: int = -1) -> None: ...


class IdPool:
    """Hands out ids from a range, lowest free first."""

    def __init__(self, ids: range):
        self._free = sorted(ids, reverse=True)

    def acquire(self) -> int | None:
        return self._free.pop() if self._free else None

    def release(self, seq_id: int) -> None:
        self._free.append(seq_id)
        self._free.sort(reverse=True)

    @property
    def n_free(self) -> int:
        return len(self._free)


@dataclass(eq=False)
class Node:
    tokens: list[int]
    start: int  # position of tokens[0]
    parent: Node | None
    seq_id: int = -1  # -1 for the root
    n_cached: int = 0  # leading tokens of the span whose KV exists
    refs: int = 0  # requests holding this node or a descendant
    last_used: int = 0
    children: dict[int, Node] = field(default_factory=dict)
    # Positions [g0, g1) whose sliding-window cells a restored state lacks (see the module doc).
    swa_gap: tuple[int, int] | None = None
    # Cells the seq id holds just above ``start``, its own copies, where a split in the gap
    # gave the top part to a node that recomputes it (the cells still serve this node).
    n_extra: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def computed(self) -> bool:
        return self.n_cached == len(self.tokens)


def _union(a: tuple[int, int] | None, b: tuple[int, int] | None) -> tuple[int, int] | None:
    if a is None or b is None:
        return a or b
    return (min(a[0], b[0]), max(a[1], b[1]))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class RadixTrie:
    def __init__(
        self,
        kv: KVOps,
        seq_ids: range,
        enabled: bool = True,
        n_swa: int = 0,
        on_evict: Callable[[Node], None] | None = None,
    ):
        self.kv = kv
        self.ids = IdPool(seq_ids)
        self.enabled = enabled
        self.n_swa = n_swa
        self.on_evict = on_evict  # called with an unheld leaf before its cells are freed
        self.root = Node([], 0, None)
        self.n_cells = 0  # computed cells held by nodes
        self.n_nodes = 0
        self._clock = itertools.count(1)

    # -- matching and inserting ------------------------------------------------------

    def insert(self, tokens: list[int]) -> tuple[Node, int] | None:
        """The node ending at ``len(tokens)``, creating what is missing, and how many leading
        tokens were already in the trie. None when no seq id can be had for a new node."""
        node, matched = (self._walk(tokens) if self.enabled else (self.root, 0))
        if node is None:
            return None
        if matched < len(tokens):
            leaf = self._new_node(tokens[matched:], matched, node)
            if leaf is None:
                return None
            node = leaf
        self._touch(node)
        return node, matched

    def _walk(self, tokens: list[int]) -> tuple[Node | None, int]:
        """Follow ``tokens`` down the trie, splitting a node where they part from it."""
        node, i = self.root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            k = _common_prefix(child.tokens, tokens[i:])
            if k < len(child.tokens):
                child = self._split(child, k)
                if child is None:
                    return None, 0
            node, i = child, i + k
        return node, i

    def _split(self, node: Node, k: int) -> Node | None:
        """Cut ``node`` after ``k`` tokens; the new top part is returned (the old node object
        keeps the bottom, so whoever points at it still does)."""
        seq_id = self._acquire_id(protect=node)
        if seq_id is None:
            return None
        if not self._can_branch(node, node.start + k):
            if node.computed:
                return self._split_in_gap(node, k, seq_id)
            self._uncompute(node)
        top = Node(node.tokens[:k], node.start, node.parent, seq_id, min(k, node.n_cached), node.refs, node.last_used)
        top.swa_gap = node.swa_gap if node.swa_gap and node.swa_gap[0] < top.end else None
        self.kv.copy(node.seq_id, seq_id, -1, node.start + top.n_cached)
        # The top's seq id now holds the node's own copies above its start too, and outlives
        # the node (a parent is removed only after its children): it accounts for them.
        top.n_extra, node.n_extra = node.n_extra, 0
        self._put_above(node, top, k)
        node.n_cached = max(0, node.n_cached - k)
        return top

    def _split_in_gap(self, node: Node, k: int, seq_id: int) -> Node:
        """Cut a restored node inside its window gap: new tokens after the top part would
        attend to sliding-window cells the state lacks, so the top part is recomputed (a new
        node, no cells yet); the bottom keeps its state, whose cells above its new start
        become its ``n_extra``: it can still be continued from its end."""
        top = Node(node.tokens[:k], node.start, node.parent, seq_id, 0, node.refs, node.last_used)
        self._put_above(node, top, k)
        node.n_cached -= k
        node.n_extra += k
        return top

    def _put_above(self, node: Node, top: Node, k: int) -> None:
        """Link ``top`` (``node``'s first ``k`` tokens) in ``node``'s place, above it."""
        node.parent.children[top.tokens[0]] = top
        node.tokens = node.tokens[k:]
        node.start += k
        node.parent = top
        top.children[node.tokens[0]] = node
        self.n_nodes += 1

    def _new_node(self, tokens: list[int], start: int, parent: Node) -> Node | None:
        seq_id = self._acquire_id(protect=parent)
        if seq_id is None:
            return None
        node = Node(list(tokens), start, parent, seq_id, refs=0)
        if self.enabled:  # disabled: private branches, never matched, so never indexed
            parent.children[node.tokens[0]] = node
        self.n_nodes += 1
        return node

    def _acquire_id(self, protect: Node) -> int | None:
        """A free node seq id, evicting the least recently used leaf if need be (never
        ``protect``, the node about to be split or given a child)."""
        seq_id = self.ids.acquire()
        if seq_id is None and (self._evict_one(protect) is not None or self._merge_one(protect)):
            seq_id = self.ids.acquire()
        return seq_id

    def _merge_one(self, protect: Node) -> bool:
        """Fold an unheld node with one child into that child, freeing a seq id and keeping
        every cell (a long conversation is a chain of such nodes, none of them a leaf)."""
        for parent in self._nodes():
            if len(parent.children) != 1:
                continue
            (child,) = parent.children.values()
            if protect in (parent, child) or parent.refs != child.refs:
                continue
            if (not parent.computed and child.n_cached) or (parent.n_extra and child.n_extra):
                continue
            if child.n_cached == 0:  # the child's seq id must cover the parent's cells too
                self.kv.copy(parent.seq_id, child.seq_id, -1, parent.start + parent.n_cached)
            if child.n_extra:  # the child's own copies of (the bottom of) the parent's span:
                # the parent's cells there are freed; above them the two seq ids share cells
                self.n_cells -= min(child.n_extra, parent.n_cached)
                child.n_extra = max(0, child.n_extra - len(parent.tokens))
            else:  # the parent's own copies above its start are the child's too
                child.n_extra = parent.n_extra
            self.kv.remove(parent.seq_id)
            self.ids.release(parent.seq_id)
            parent.parent.children[parent.tokens[0]] = child
            child.tokens = parent.tokens + child.tokens
            child.start = parent.start
            child.n_cached += parent.n_cached
            child.parent = parent.parent
            child.last_used = max(child.last_used, parent.last_used)
            child.swa_gap = _union(parent.swa_gap, child.swa_gap)
            self.n_nodes -= 1
            return True
        return False

    # -- holding, computing ------------------------------------------------------------

    def lock(self, node: Node) -> None:
        self._touch(node)
        while node is not self.root:
            node.refs += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        self._touch(node)
        leaf = node
        while node is not self.root:
            node.refs -= 1
            node = node.parent
        if not self.enabled:
            self._drop_unheld(leaf)

    def _touch(self, node: Node) -> None:
        now = next(self._clock)
        while node is not self.root:
            node.last_used = now
            node = node.parent

    def needed(self, node: Node) -> list[Node]:
        """The nodes on the path to ``node``, root first, whose cells a request ending there
        still lacks. A computed node's seq id holds its whole path, so nothing above the
        deepest computed one is needed (above a restored node split in its window gap sits a
        part that is recomputed for whoever branches there, not for requests through it)."""
        path = []
        while node is not self.root and not node.computed:
            path.append(node)
            node = node.parent
        path.reverse()
        return path

    def next_to_compute(self, node: Node) -> Node | None:
        """The first node a request ending at ``node`` still needs computed, if any."""
        needed = self.needed(node)
        return needed[0] if needed else None

    def begin_chunk(self, node: Node) -> None:
        """Before computing a node's first tokens: take the parent's path (computed now)."""
        if node.n_cached == 0 and node.parent is not self.root:
            self.kv.copy(node.parent.seq_id, node.seq_id, -1, node.parent.end)

    def computed(self, node: Node, n: int) -> None:
        node.n_cached += n
        self.n_cells += n

    # -- keeping finished sequences ------------------------------------------------------

    def retain(self, seq_id: int, tokens: list[int]) -> None:
        """Keep ``tokens``, whose KV sequence ``seq_id`` holds at positions 0..len-1.

        What the trie already has is only refreshed; the rest becomes a leaf that takes
        ``seq_id``'s cells. The caller removes ``seq_id`` afterwards.
        """
        if not self.enabled or not tokens:
            return
        node, matched = self._walk(tokens)
        if node is None or matched == len(tokens) or not node.computed:
            if node is not None:
                self._touch(node)
            return
        leaf = self._new_node(tokens[matched:], matched, node)
        if leaf is None:
            return
        if node is not self.root:
            self.kv.copy(node.seq_id, leaf.seq_id, -1, node.end)
        self.kv.copy(seq_id, leaf.seq_id, matched, len(tokens))
        self.computed(leaf, len(leaf.tokens))
        self._touch(leaf)

    # -- the tiers below: restoring saved paths ------------------------------------------

    def computed_match(self, tokens: list[int]) -> tuple[int, Node | None]:
        """How many leading tokens of ``tokens`` the trie holds computed, and the node in the
        way beyond them (one that holds more of ``tokens``, not computed yet), if any.
        Changes nothing."""
        node, i = self.root, 0
        while i < len(tokens) and self.enabled:
            child = node.children.get(tokens[i])
            if child is None:
                break
            k = _common_prefix(child.tokens, tokens[i:])
            if child.n_cached < k:
                return i + child.n_cached, child
            if k < len(child.tokens):
                return i + k, None
            node, i = child, i + k
        return i, None

    def restore(self, tokens: list[int], load: Callable[[int], bool]) -> Node | None:
        """Put a saved path back: a computed leaf for what the trie lacks of ``tokens``.

        ``load(seq_id)`` writes the saved state of the whole path under ``seq_id`` (new
        cells); the part the trie already holds is then given back in favour of the trie's
        own cells, so nothing is held twice. None when a request is computing part of the
        path (sharing that is cheaper), when no seq id can be had, or when ``load`` fails.
        What nobody holds in the way (a path inserted by a request that was not admitted)
        is dropped first.
        """
        done, blocker = self.computed_match(tokens)
        if blocker is not None:
            if blocker.refs:
                return None
            self._drop_subtree(blocker)
        if done >= len(tokens):
            return None
        node, matched = self._walk(tokens)
        if node is None or matched != done or not (node is self.root or node.computed):
            return None
        leaf = self._new_node(tokens[matched:], matched, node)
        if leaf is None:
            return None
        if not load(leaf.seq_id):
            self._remove(leaf)
            return None
        if matched:
            self.kv.remove(leaf.seq_id, 0, matched)
            self.kv.copy(node.seq_id, leaf.seq_id, -1, matched)
        if self.n_swa and len(tokens) - self.n_swa > matched:
            leaf.swa_gap = (matched, len(tokens) - self.n_swa)
        self.computed(leaf, len(leaf.tokens))
        self._touch(leaf)
        return leaf

    def _can_branch(self, node: Node, pos: int) -> bool:
        """Whether new tokens may follow ``node``'s cells before ``pos``: their sliding
        window must not reach into a restored state's gap."""
        gap = node.swa_gap
        return gap is None or node.n_cached == 0 or pos <= gap[0] or pos - self.n_swa >= gap[1]

    def _uncompute(self, node: Node) -> None:
        """Drop the cells of ``node`` and of everything below it (they will be recomputed).
        Requests already attached keep theirs: their own seq ids hold them."""
        stack = [node]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if n.n_cached or n.n_extra:
                self.kv.remove(n.seq_id)
                self.n_cells -= n.n_cached + n.n_extra
                n.n_cached = n.n_extra = 0
            n.swa_gap = None

    def path_tokens(self, node: Node) -> list[int]:
        """The tokens from the root to the end of ``node``'s computed part."""
        parts = [node.tokens[: node.n_cached]]
        up = node.parent
        while up is not self.root:
            parts.append(up.tokens)
            up = up.parent
        return [t for part in reversed(parts) for t in part]

    # -- eviction ----------------------------------------------------------------------

    def evict(self, n_cells: int) -> int:
        """Free at least ``n_cells`` cells if unlocked leaves allow; returns cells freed."""
        freed = 0
        while freed < n_cells:
            got = self._evict_one()
            if got is None:
                break
            freed += got
        return freed

    def _evict_one(self, protect: Node | None = None) -> int | None:
        leaves = [n for n in self._nodes() if not n.children and n.refs == 0 and n is not protect]
        if not leaves:
            return None
        victim = min(leaves, key=lambda n: n.last_used)
        if self.on_evict is not None and victim.n_cached:
            self.on_evict(victim)
        return self._remove(victim)

    def _drop_subtree(self, node: Node) -> None:
        """Remove ``node`` and everything below it (nobody holds any of it)."""
        for child in list(node.children.values()):
            self._drop_subtree(child)
        self._remove(node)

    def prune(self, node: Node) -> None:
        """Drop ``node`` and its ancestors while nobody holds them and they hold no cells
        (a request inserted its path but could not be admitted). With the cache off the unlock
        has dropped them already (removing a node twice would free its seq id twice)."""
        if self.enabled:
            self._drop_unheld(node, empty_only=True)

    def _drop_unheld(self, node: Node, empty_only: bool = False) -> None:
        while node is not self.root and node.refs == 0 and not node.children:
            if empty_only and (node.n_cached or node.n_extra):
                return
            parent = node.parent
            self._remove(node)
            node = parent

    def _remove(self, node: Node) -> int:
        self.kv.remove(node.seq_id)
        if node.parent.children.get(node.tokens[0]) is node:
            del node.parent.children[node.tokens[0]]
        self.ids.release(node.seq_id)
        self.n_cells -= node.n_cached + node.n_extra
        self.n_nodes -= 1
        return node.n_cached + node.n_extra

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def evictable_cells(self) -> int:
        """Cells that eviction could free now (nodes no request holds)."""
        return sum(n.n_cached + n.n_extra for n in self._nodes() if n.refs == 0)
