"""Prefix-aware routing across engines: the block index and the choice, without sockets."""

from __future__ import annotations

from dataclasses import dataclass, field

from demesne.gateway.routing import BLOCK, PrefixIndex, block_hashes, choose


@dataclass
class FakeEngine:
    name: str
    load: int = 0
    prefix: PrefixIndex = field(default_factory=PrefixIndex)


SYSTEM = list(range(1000, 1000 + 10 * BLOCK))  # a shared prefix of 10 blocks
OTHER = list(range(5000, 5000 + 10 * BLOCK))


def test_hashes_cover_full_blocks_and_chain():
    assert block_hashes(list(range(BLOCK - 1))) == []
    a = block_hashes(SYSTEM + [1, 2, 3])
    assert len(a) == 10
    b = block_hashes([7] + SYSTEM[1:])  # the first token differs: no block may match
    assert not set(a) & set(b)
    assert block_hashes(SYSTEM[: 4 * BLOCK]) == a[:4]


def test_match_counts_leading_blocks_and_lru_bounds_it():
    index = PrefixIndex(capacity=12)
    index.add(block_hashes(SYSTEM))
    assert index.match(block_hashes(SYSTEM + [1] * BLOCK)) == 10
    assert index.match(block_hashes(OTHER)) == 0
    index.add(block_hashes(OTHER[: 4 * BLOCK]))  # 14 blocks > 12: the oldest go
    assert len(index) == 12 and index.match(block_hashes(SYSTEM)) == 0
    assert index.match(block_hashes(OTHER)) == 4


def test_a_shared_prefix_goes_where_it_was_sent():
    e0, e1 = FakeEngine("e0"), FakeEngine("e1")
    assert choose([e0, e1], block_hashes(SYSTEM + [1]), slack=4) == (e0, 0)  # ties: the first
    e0.load = 1
    assert choose([e0, e1], block_hashes(OTHER + [1]), slack=4) == (e1, 0)  # no match: lighter
    e1.load = 1
    assert choose([e0, e1], block_hashes(OTHER + [2]), slack=4) == (e1, 10)
    assert choose([e0, e1], block_hashes(SYSTEM + [2]), slack=4) == (e0, 10)


def test_load_outweighs_a_match_beyond_the_slack():
    e0, e1 = FakeEngine("e0", load=6), FakeEngine("e1", load=1)
    e0.prefix.add(block_hashes(SYSTEM))
    engine, matched = choose([e0, e1], block_hashes(SYSTEM + [1]), slack=4)
    assert engine is e1 and matched == 0
    assert e1.prefix.match(block_hashes(SYSTEM)) == 10  # and now e1 holds it too
    e0.load = 5
    assert choose([e0, e1], block_hashes(SYSTEM + [1]), slack=4)[0] is e1  # longest match, then load
    assert choose([FakeEngine("a", 3), FakeEngine("b", 0)], [], slack=0)[0].name == "b"
