"""Which engine gets a request: the one most likely to hold its prefix, weighed against load.

Each engine's prefix trie lives in the engine; the gateway keeps an approximate picture of
it, :class:`PrefixIndex`: chained hashes of fixed-size token blocks of the prompts it sent
there, least recently used dropped first. A prompt's *match* on an engine is how many of its
leading blocks that engine has seen. The picture is only a guess (the engine evicts on its
own, other gateways send it work too); a wrong guess costs a cache miss, never a failure.

:func:`choose`: among the engines with no more than ``slack`` requests in flight beyond the
least loaded one, the longest match wins, then the lighter load. So requests that share a
system prompt or a conversation go where it is already decoded, until that engine is
``slack`` requests busier than another, which then takes them and soon holds it too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

BLOCK = 32  # tokens per hashed block
CAPACITY = 1 << 15  # blocks remembered per engine (a million tokens at BLOCK 32)


def block_hashes(tokens: Sequence[int], block: int = BLOCK) -> list[int]:
    """Chained hashes of the prompt's full blocks: block i's hash covers tokens[: (i+1)*block]."""
    out, h = [], 0
    for start in range(0, len(tokens) - block + 1, block):
        h = hash((h, *tokens[start : start + block]))
        out.append(h)
    return out


class PrefixIndex:
    """The blocks of prompts routed to one engine, LRU-bounded."""

    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: list[int]) -> int:
        """How many leading blocks of the prompt this engine has been sent."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def add(self, hashes: list[int]) -> None:
        for h in hashes:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()


class Routable(Protocol):
    prefix: PrefixIndex

    @property
    def load(self) -> int: ...


def choose(engines: Sequence[Routable], hashes: list[int], slack: int) -> tuple[Routable, int]:
    """(engine, matched blocks) for a prompt with these block hashes; records the choice."""
    least = min(e.load for e in engines)
    eligible = [e for e in engines if e.load <= least + slack]
    scored = [(e.prefix.match(hashes), -e.load, -i) for i, e in enumerate(eligible)]
    matched, _, index = max(scored)  # ties go to the first engine listed
    engine = eligible[-index]
    engine.prefix.add(hashes)
    return engine, matched
