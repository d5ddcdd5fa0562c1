"""The caching allocator's bookkeeping: blocks of segments, the pools of cached blocks, expandable segments.

``Block``, ``BlockPool`` and ``ExpandableSegment`` of c10/cuda/CUDACachingAllocator.cpp, as far as the rules in
``memprof.allocator.simulator`` read them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


class Block:
    """A range of one segment: handed out (``allocated``), cached free, or (expandable) not mapped."""

    __slots__ = ("ptr", "size", "stream", "small", "allocated", "mapped", "prev", "next", "segment", "gc_base")

    def __init__(self, ptr: int, size: int, stream: int, small: bool, segment: "Expandable | None" = None,
                 mapped: bool = True) -> None:
        self.ptr, self.size, self.stream, self.small = ptr, size, stream, small
        self.allocated, self.mapped, self.segment = False, mapped, segment
        self.prev: Block | None = None
        self.next: Block | None = None
        self.gc_base = 0

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None

    def splice(self, before: "Block | None", after: "Block | None") -> None:
        """Put this block between ``before`` and ``after`` (``Block::splice``)."""
        if before is not None:
            before.next = self
        self.prev = before
        if after is not None:
            after.prev = self
        self.next = after


@dataclass
class Expandable:
    """One expandable segment's address space and the pages mapped in it (``ExpandableSegment``)."""

    base: int
    page: int
    pages: int
    mapped: set[int] = field(default_factory=set)


class Pool:
    """A pool's cached free blocks, ordered by (stream, size, address), and (expandable) its unmapped ranges
    ordered by (stream, address) (``BlockPool``)."""

    def __init__(self, small: bool) -> None:
        self.small = small
        self.keys: list[tuple[int, int, int]] = []
        self.blocks: dict[tuple[int, int, int], Block] = {}
        self.unmapped: list[tuple[int, int]] = []
        self.unmapped_blocks: dict[tuple[int, int], Block] = {}
        self.lookups = 0  # get_free_blocks_call_count: the garbage collector's clock

    def insert(self, block: Block) -> None:
        """``insert_into_blocks``: cached, its age counted from now."""
        key = (block.stream, block.size, block.ptr)
        block.gc_base = self.lookups
        bisect.insort(self.keys, key)
        self.blocks[key] = block

    def remove(self, block: Block) -> None:
        key = (block.stream, block.size, block.ptr)
        del self.keys[bisect.bisect_left(self.keys, key)]
        del self.blocks[key]

    def add_unmapped(self, block: Block) -> None:
        bisect.insort(self.unmapped, (block.stream, block.ptr))
        self.unmapped_blocks[(block.stream, block.ptr)] = block

    def remove_unmapped(self, block: Block) -> None:
        del self.unmapped[bisect.bisect_left(self.unmapped, (block.stream, block.ptr))]
        del self.unmapped_blocks[(block.stream, block.ptr)]
