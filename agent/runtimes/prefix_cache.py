"""The prefix cache of the simulated runtime: prompt KV kept in the pool, as SGLang's radix cache.

A prompt is described by the hashes of its consecutive blocks of ``block_tokens`` tokens, each
hash chained over every block before it, so that equal hashes mean equal prefixes. The blocks of
one prompt are then a path from the root of a tree: SGLang's radix tree, at the granularity of a
page (SGLang's ``--page-size``) instead of a token. A node is one block; it knows its parent (the
block before it) and counts its children and the running requests that use it (SGLang's
``lock_ref``).

The cache owns no memory of its own: its blocks live in the KV pool of
:class:`~agent.runtimes.simulated_model.BatchingModel`, which asks it how much of a prompt is
cached (:meth:`PrefixCache.match`), locks what a new request reuses (:meth:`PrefixCache.lock`),
adds the blocks a request has prefilled (:meth:`PrefixCache.insert`), unlocks them when the
request ends (:meth:`PrefixCache.release`) and, when an admission needs room, evicts unlocked
blocks (:meth:`PrefixCache.evict`): leaves first, least recently used first, as SGLang does.
Recency is a counter of operations, not a clock, so the same calls always evict the same blocks.

A block whose hash is already in the tree under another parent (a hash collision, or input that
is not chained) is treated as a miss and never inserted: the tree stays a tree.

This module must stay free of I/O, randomness and wall-clock reads.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class _Node:
    parent: int | None
    refs: int = 0  # running requests that use this block
    children: int = 0
    tick: int = 0  # when last used (an operation counter)


class PrefixCache:
    """Cached prompt blocks by chained hash; every block is ``block_tokens`` tokens of KV."""

    def __init__(self, block_tokens: int) -> None:
        if block_tokens < 1:
            raise ValueError("prefix cache blocks must hold at least one token")
        self.block_tokens = block_tokens
        self._nodes: dict[int, _Node] = {}
        self._locked = 0  # nodes with refs > 0
        self._tick = 0
        self._seq = 0
        # Candidates for eviction: (tick, seq, hash). An entry is stale unless its node still
        # exists, is an unlocked leaf and was last used at that tick; stale ones are skipped.
        self._heap: list[tuple[int, int, int]] = []

    @property
    def cached_tokens(self) -> int:
        """Tokens of KV the cache holds, in use by running requests or not."""
        return len(self._nodes) * self.block_tokens

    @property
    def locked_tokens(self) -> int:
        """Tokens of cached KV that running requests use; these cannot be evicted."""
        return self._locked * self.block_tokens

    @property
    def evictable_tokens(self) -> int:
        return (len(self._nodes) - self._locked) * self.block_tokens

    def match(self, blocks: Sequence[int], limit: int) -> tuple[int, int]:
        """How many leading ``blocks`` (at most ``limit``) are cached, and how many tokens of
        those no running request uses yet (locking them takes that much evictable room)."""
        count = unlocked = 0
        parent: int | None = None
        for block in blocks[: max(0, limit)]:
            node = self._nodes.get(block)
            if node is None or node.parent != parent:
                break
            count += 1
            if node.refs == 0:
                unlocked += 1
            parent = block
        return count, unlocked * self.block_tokens

    def lock(self, blocks: Sequence[int], count: int) -> None:
        """A request uses the first ``count`` blocks, all cached (as :meth:`match` found)."""
        tick = self._next_tick()
        for block in blocks[:count]:
            node = self._nodes[block]
            if node.refs == 0:
                self._locked += 1
            node.refs += 1
            node.tick = tick

    def insert(self, blocks: Sequence[int], start: int, stop: int) -> int:
        """A request that holds ``blocks[:start]`` has prefilled up to ``blocks[stop - 1]``:
        cache (or, where another request got there first, share) and lock the blocks between.
        Returns how many leading blocks the request now holds: ``stop``, or fewer when a block
        is in the tree under another parent."""
        tick = self._next_tick()
        parent = blocks[start - 1] if start else None
        for index in range(start, stop):
            block = blocks[index]
            node = self._nodes.get(block)
            if node is None:
                node = _Node(parent)
                self._nodes[block] = node
                if parent is not None:
                    self._nodes[parent].children += 1
            elif node.parent != parent:
                return index
            if node.refs == 0:
                self._locked += 1
            node.refs += 1
            node.tick = tick
            parent = block
        return stop

    def release(self, blocks: Sequence[int], count: int) -> None:
        """A request that held the first ``count`` blocks has ended; they stay cached."""
        tick = self._next_tick()
        for block in blocks[:count]:
            node = self._nodes[block]
            node.refs -= 1
            node.tick = tick
            if node.refs == 0:
                self._locked -= 1
                if node.children == 0:
                    self._push(block, node)

    def evict(self, tokens: int) -> int:
        """Drop unlocked blocks, least recently used leaf first, until ``tokens`` are free (or
        nothing is left to drop); returns the tokens freed."""
        freed = 0
        while freed < tokens and self._heap:
            tick, _, block = heapq.heappop(self._heap)
            node = self._nodes.get(block)
            if node is None or node.refs or node.children or node.tick != tick:
                continue  # stale: gone, used again, or no longer a leaf
            del self._nodes[block]
            freed += self.block_tokens
            if node.parent is not None:
                parent = self._nodes[node.parent]
                parent.children -= 1
                if parent.children == 0 and parent.refs == 0:
                    self._push(node.parent, parent)
        return freed

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _push(self, block: int, node: _Node) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (node.tick, self._seq, block))
        if len(self._heap) > 2 * len(self._nodes) + 64:
            self._compact()

    def _compact(self) -> None:
        """Drop stale heap entries (keeping the order of the live ones)."""
        kept: list[tuple[int, int, int]] = []
        seen: set[int] = set()
        for entry in sorted(self._heap):
            tick, _, block = entry
            node = self._nodes.get(block)
            if node is None or node.refs or node.children or node.tick != tick:
                continue
            if block not in seen:
                seen.add(block)
                kept.append(entry)
        self._heap = kept  # a sorted list is a heap
