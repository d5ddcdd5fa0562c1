"""The CUDA caching allocator's rules, replayed on a stream of allocations and frees.

Each rule is ``DeviceCachingAllocator``'s in c10/cuda/CUDACachingAllocator.cpp (torch 2.14.1; the function is
named beside it), read from the source, not copied. Where torch 2.11 (the GPU runs') differs, it says so.

A request is rounded (``round_size``) and served from the small (<= 1 MiB) or large pool (``get_pool``): the
best-fitting free block on its stream (``get_free_block``), split where the rest is worth keeping
(``should_split``); else a new segment (``get_allocation_size``, ``alloc_block``; under expandable segments
pages mapped into one segment per pool and stream), after freeing cached segments where the device has no room
(``release_available_cached_blocks``, ``release_cached_blocks``), or out of memory. Frees merge neighbours.

Not simulated: CUDA graphs' private pools, blocks used on other streams (``record_stream``: a replay frees a
block when its free completed), the free-memory callbacks.
"""

from __future__ import annotations

import bisect
from typing import Callable

from memprof.allocator.config import NO_LIMIT, AllocatorConfig
from memprof.allocator.pool import Block, Expandable, Pool

MIN_BLOCK = 512  # kMinBlockSize: every block is a multiple of it
SMALL_SIZE = 1 << 20  # kSmallSize: the largest small-pool request
SMALL_BUFFER = 2 << 20  # kSmallBuffer: the small pool's segment (and expandable page)
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc: large requests below it share a large_segment_size segment
ROUND_LARGE = 2 << 20  # kRoundLarge: larger requests get their own segment, rounded up to it
ADDRESS_SPACE = 9 / 8  # an expandable segment reserves 1 1/8 of the device's memory in address space


def round_size(size: int, config: AllocatorConfig) -> int:
    """The block size a request of ``size`` bytes asks for (``round_size``)."""
    if size < MIN_BLOCK:
        return MIN_BLOCK
    divisions = config.divisions(size)
    if divisions > 1 and size > MIN_BLOCK * divisions:
        return _next_division(size, divisions)
    return -(-size // MIN_BLOCK) * MIN_BLOCK


def _next_division(size: int, divisions: int) -> int:
    """``size`` rounded up to the next of ``divisions`` equal steps between its powers of two
    (``roundup_power2_next_division``; a power of two stays as it is)."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


def allocation_size(size: int, config: AllocatorConfig) -> int:
    """The segment a new ``size``-byte block is carved from (``get_allocation_size``; torch 2.11 has no
    ``large_segment_size_mb``: always 20 MiB there)."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return config.large_segment_size
    return -(-size // ROUND_LARGE) * ROUND_LARGE


def should_split(block_size: int, size: int, small: bool, config: AllocatorConfig) -> bool:
    """Whether a free block of ``block_size`` handed out for ``size`` keeps its remainder as a free block
    (``should_split``): in the small pool and under expandable segments any remainder of 512 B; in the large
    pool only one above 1 MiB, and never from an oversize block. Otherwise the whole block is handed out."""
    remaining = block_size - size
    if small or config.expandable_segments:
        return remaining >= MIN_BLOCK
    return size < config.max_split_size and remaining > SMALL_SIZE


def block_for(requested: int, free_extent: int | None, config: AllocatorConfig) -> int:
    """The bytes a block for ``requested`` counts as allocated when carved from a free run of ``free_extent``
    bytes (None: unknown, the rounded request)."""
    size = round_size(requested, config)
    if free_extent is None or free_extent <= size:
        return size
    return size if should_split(free_extent, size, size <= SMALL_SIZE, config) else free_extent


class OutOfMemory(Exception):
    """No block, no segment, even after freeing cached ones: where torch raises ``OutOfMemoryError``."""

    def __init__(self, requested: int, segment: int, reserved: int, allocated: int) -> None:
        super().__init__(f"out of memory: {requested:,} B requested (a {segment:,}-B segment) with {reserved:,} B "
                         f"reserved, {allocated:,} B allocated")
        self.requested, self.segment, self.reserved, self.allocated = requested, segment, reserved, allocated


class CachingAllocator:
    """One device's caching allocator. ``capacity``: the bytes segments may take in all (the device's memory
    less what lives outside the allocator; None: unlimited); ``device_total``: the device's memory (the base
    of ``per_process_memory_fraction`` and of an expandable segment's address space); ``new_address``: where
    a new segment of a size lies (a replay's recorded addresses; default: one after another)."""

    def __init__(self, config: AllocatorConfig, *, capacity: int | None = None, device_total: int = 1 << 40,
                 new_address: Callable[[int], int] | None = None) -> None:
        self.config, self.capacity, self.device_total = config, capacity, device_total
        self.allowed = int(config.memory_fraction * device_total) if config.memory_fraction is not None else None
        self.pools = {True: Pool(True), False: Pool(False)}
        self.allocated = self.reserved = self.max_allocated = self.max_reserved = 0
        self.events: list[tuple[str, int, int]] = []  # (segment_alloc|segment_free|segment_map|segment_unmap, addr, size)
        self._next = 1 << 44
        self._new_address = new_address or self._bump

    # -- the public calls ----------------------------------------------------------------------------------
    def malloc(self, requested: int, stream: int = 0) -> Block:
        """A block for ``requested`` bytes (``DeviceCachingAllocator::malloc``); OutOfMemory where torch raises."""
        size = round_size(requested, self.config)
        pool = self.pools[size <= SMALL_SIZE]
        segment = allocation_size(size, self.config)
        block = self._free_block_for(pool, size, stream)
        if block is None:
            if self._collecting():
                self._collect_garbage()
            block = (self._new_block(pool, size, segment, stream)
                     or (self._release_oversize(pool, size, stream) and self._new_block(pool, size, segment, stream))
                     or (self.release_cached() and self._new_block(pool, size, segment, stream)))
        if not block:
            raise OutOfMemory(requested, segment, self.reserved, self.allocated)
        return self._hand_out(block, pool, size)

    def free(self, block: Block) -> None:
        """``free`` then ``free_block``: the block back to its pool, merged with free neighbours."""
        block.allocated = False
        self.allocated -= block.size
        pool = self.pools[block.small]
        for neighbour in (block.prev, block.next):
            self._merge(block, neighbour, pool)
        pool.insert(block)

    def release_cached(self) -> bool:
        """``release_cached_blocks`` (and ``torch.cuda.empty_cache``): every cached unsplit segment freed, every
        free page of an expandable segment unmapped; large pool first."""
        for small in (False, True):
            self._release_pool(self.pools[small])
        return True

    # -- finding a block -----------------------------------------------------------------------------------
    def _free_block_for(self, pool: Pool, size: int, stream: int) -> Block | None:
        """``get_free_block``: the best fit on ``stream``, or None."""
        config = self.config
        if self._collecting():
            pool.lookups += 1
        i = bisect.bisect_left(pool.keys, (stream, size, 0))
        if i == len(pool.keys) or pool.keys[i][0] != stream:
            return None
        block = pool.blocks[pool.keys[i]]
        if block.segment is not None:
            if config.expandable_segments:
                # An expandable block's size for best fit is what it can grow to: the unmapped range after it.
                while (block.segment is not None and i + 1 < len(pool.keys) and pool.keys[i + 1][0] == stream
                       and _expandable_size(pool.blocks[pool.keys[i + 1]]) < _expandable_size(block)):
                    i += 1
                    block = pool.blocks[pool.keys[i]]
            else:  # expandable segments turned off since: only classic blocks
                i += 1
                while i < len(pool.keys) and pool.keys[i][0] == stream and pool.blocks[pool.keys[i]].segment:
                    i += 1
                if i == len(pool.keys) or pool.keys[i][0] != stream:
                    return None
                block = pool.blocks[pool.keys[i]]
        if size < config.max_split_size <= block.size:
            return None  # an oversize block is not handed out for a smaller request
        if size >= config.max_split_size and block.size >= size + config.max_non_split_rounding:
            return None  # nor one much larger than an oversize request (max_non_split_rounding_mb)
        pool.remove(block)
        return block

    def _hand_out(self, block: Block, pool: Pool, size: int) -> Block:
        """``alloc_found_block``: split off the remainder where ``should_split`` says so."""
        if should_split(block.size, size, pool.small, self.config):
            remaining = block
            block = Block(remaining.ptr, size, remaining.stream, pool.small, remaining.segment)
            block.splice(remaining.prev, remaining)
            remaining.ptr += size
            remaining.size -= size
            pool.insert(remaining)
        block.allocated = True
        self.allocated += block.size
        self.max_allocated = max(self.max_allocated, self.allocated)
        return block

    # -- new segments --------------------------------------------------------------------------------------
    def _new_block(self, pool: Pool, size: int, segment: int, stream: int) -> Block | None:
        """``alloc_block``: a new segment (or newly mapped pages), None where the device has no room."""
        if self.allowed is not None and self.reserved + segment > self.allowed:
            return None
        if self.config.expandable_segments:
            return self._expand(pool, size, stream)
        if self.capacity is not None and self.reserved + segment > self.capacity:
            return None
        block = Block(self._new_address(segment), segment, stream, pool.small)
        self._reserve(segment, ("segment_alloc", block.ptr, segment))
        return block

    def _bump(self, size: int) -> int:
        """The next free address (a new segment's where no one says otherwise)."""
        address, self._next = self._next, self._next + -(-size // ROUND_LARGE) * ROUND_LARGE
        return address

    def _reserve(self, nbytes: int, event: tuple[str, int, int]) -> None:
        self.reserved += nbytes
        self.max_reserved = max(self.max_reserved, self.reserved)
        self.events.append(event)

    # -- freeing cached segments ---------------------------------------------------------------------------
    def _release_oversize(self, pool: Pool, size: int, stream: int) -> bool:
        """``release_available_cached_blocks`` (only with max_split_size_mb): one cached oversize block at least
        as large as the request, else the largest ones until as many bytes are freed."""
        if self.config.max_split_size == NO_LIMIT:
            return False
        want = max(size, self.config.max_split_size)
        i = bisect.bisect_left(pool.keys, (stream, want, 0))
        if i < len(pool.keys) and pool.keys[i][0] == stream and pool.blocks[pool.keys[i]].segment is None:
            self._release_segment(pool.blocks[pool.keys[i]], pool)
            return True
        released = 0
        i -= 1
        while i >= 0 and released < want:
            block = pool.blocks[pool.keys[i]]
            if block.size < self.config.max_split_size or block.stream != stream:
                break
            if block.segment is None:
                released += block.size
                self._release_segment(block, pool)  # only later keys move: index i - 1 is still the next
            i -= 1
        return released >= want

    def _release_pool(self, pool: Pool) -> None:
        """``release_blocks``: free every cached unsplit segment; unmap the whole free pages of expandable ones
        (and drop an expandable segment left with nothing mapped)."""
        expandable = []
        for key in list(pool.keys):
            block = pool.blocks[key]
            if block.segment is not None:
                expandable.append(block)
            elif not block.is_split():
                self._release_segment(block, pool)
        for block in expandable:
            self._unmap(block, pool)
            if not block.is_split() and not block.mapped:
                pool.remove_unmapped(block)

    def _release_segment(self, block: Block, pool: Pool) -> None:
        """``release_block``: cudaFree of a whole cached segment."""
        pool.remove(block)
        self.reserved -= block.size
        self.events.append(("segment_free", block.ptr, block.size))

    def _collecting(self) -> bool:
        return self.allowed is not None and self.config.garbage_collection_threshold > 0

    def _collect_garbage(self) -> None:
        """``garbage_collect_cached_blocks``: past the threshold (a share of the allowed memory), free the cached
        unsplit large segments at least as old as the average (age: best-fit lookups since cached), repeatedly,
        until as much as the excess is freed."""
        threshold = int(self.config.garbage_collection_threshold * self.allowed)
        if self.reserved <= threshold:
            return
        pool, target, reclaimed = self.pools[False], self.reserved - threshold, 0
        candidates = [b for b in pool.blocks.values() if not b.is_split()]
        total_age, count = sum(pool.lookups - b.gc_base for b in candidates), len(candidates)
        freed = True
        while reclaimed < target and freed and count > 0:
            average, freed = total_age / count, False
            for key in list(pool.keys):
                block = pool.blocks.get(key)
                age = pool.lookups - block.gc_base if block else -1
                if block and not block.is_split() and block.segment is None and age >= average:
                    freed, reclaimed, total_age, count = True, reclaimed + block.size, total_age - age, count - 1
                    self._release_segment(block, pool)

    # -- expandable segments -------------------------------------------------------------------------------
    def _expand(self, pool: Pool, size: int, stream: int) -> Block | None:
        """``try_allocate_expandable_block``: map pages after (or into) the lowest free range of an expandable
        segment of this pool and stream that can hold ``size``, a new segment where none can."""
        candidate = self._expandable_range(pool, size, stream)
        if not candidate.mapped and not self._map(candidate, min(candidate.size, size), pool):
            return None
        while candidate.size < size:
            following = candidate.next
            if not self._map(following, min(size - candidate.size, following.size), pool):
                return None
            candidate = following  # the newly mapped block merged the one before it
        pool.remove(candidate)
        return candidate

    def _expandable_range(self, pool: Pool, size: int, stream: int) -> Block:
        """``find_expandable_block``: the lowest address where free and unmapped blocks add up to ``size``."""
        i = bisect.bisect_left(pool.unmapped, (stream, 0))
        for key in pool.unmapped[i:]:
            if key[0] != stream:
                break
            block = pool.unmapped_blocks[key]
            if block.prev is not None and not block.prev.allocated:
                block = block.prev
            if _room_from(block, size):
                return block
        page = SMALL_BUFFER if pool.small else self.config.large_segment_size
        pages = -(-int(self.device_total * ADDRESS_SPACE) // page)
        segment = Expandable(self._new_address(pages * page), page, pages)
        block = Block(segment.base, pages * page, stream, pool.small, segment, mapped=False)
        pool.add_unmapped(block)
        return block

    def _map(self, block: Block, size: int, pool: Pool) -> bool:
        """``map_block``: back the first ``size`` bytes of an unmapped block with whole pages (False where the
        device has no room for them all), merged with free mapped neighbours."""
        segment = block.segment
        first = (block.ptr - segment.base) // segment.page
        last = -(-(block.ptr + size - segment.base) // segment.page)
        mapped = (last - first) * segment.page
        if self.capacity is not None and self.reserved + mapped > self.capacity:
            return False  # cuMemCreate fails on some page: the ones created are released
        segment.mapped.update(range(first, last))
        pool.remove_unmapped(block)
        block.mapped = True
        if mapped < block.size:
            rest = Block(block.ptr + mapped, block.size - mapped, block.stream, block.small, segment, mapped=False)
            rest.splice(block, block.next)
            pool.add_unmapped(rest)
            block.size = mapped
        self._merge(block, block.prev, pool)
        self._merge(block, block.next, pool)
        pool.insert(block)
        self._reserve(mapped, ("segment_map", segment.base + first * segment.page, mapped))
        return True

    def _unmap(self, block: Block, pool: Pool) -> None:
        """``unmap_block``: give back the whole pages inside a free block; its ends stay mapped and free."""
        segment = block.segment
        first = -(-(block.ptr - segment.base) // segment.page)
        last = (block.ptr + block.size - segment.base) // segment.page
        if first >= last:
            return
        pool.remove(block)
        start, length = segment.base + first * segment.page, (last - first) * segment.page
        segment.mapped.difference_update(range(first, last))
        if start > block.ptr:
            before = Block(block.ptr, start - block.ptr, block.stream, block.small, segment)
            before.splice(block.prev, block)
            pool.insert(before)
        if block.ptr + block.size > start + length:
            after = Block(start + length, block.ptr + block.size - start - length, block.stream, block.small, segment)
            after.splice(block, block.next)
            pool.insert(after)
        block.ptr, block.size, block.mapped = start, length, False
        self._merge(block, block.prev, pool)
        self._merge(block, block.next, pool)
        pool.add_unmapped(block)
        self.reserved -= length
        self.events.append(("segment_unmap", start, length))

    def _merge(self, block: Block, other: Block | None, pool: Pool) -> None:
        """``try_merge_blocks``: absorb a free neighbour in the same mapped state."""
        if other is None or other.allocated or other.mapped != block.mapped:
            return
        if other.mapped:
            pool.remove(other)
        else:
            pool.remove_unmapped(other)
        if block.prev is other:
            block.ptr = other.ptr
            block.prev = other.prev
            if block.prev is not None:
                block.prev.next = block
        else:
            block.next = other.next
            if block.next is not None:
                block.next.prev = block
        block.size += other.size


def _expandable_size(block: Block) -> int:
    following = block.next
    return block.size + (following.size if following is not None and not following.mapped else 0)


def _room_from(block: Block | None, size: int) -> bool:
    """Whether free and unmapped blocks from ``block`` on add up to ``size`` bytes."""
    room = 0
    while room < size and block is not None and not block.allocated:
        room += block.size
        block = block.next
    return room >= size
