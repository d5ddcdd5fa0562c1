"""A real run's allocator history replayed through the simulator: do its rules reproduce the run's segments?

The history is ``torch.cuda.memory._snapshot()["device_traces"][device]`` (``_record_memory_history``): each
``alloc`` is handed to the simulator with its requested size and stream, each ``free_completed`` frees that
block; the segments the simulator allocates and frees (``segment_alloc``/``segment_free``, under expandable
segments ``segment_map``/``segment_unmap``) are compared with the recorded ones, in order, and the most
reserved at once with the recorded most. A new segment takes the address the run's next recorded segment of
that size had (cudaMalloc's choice, which no rule predicts), so that ties between equal free blocks (broken by
address) fall as they fell. A run with room to spare never frees a segment to make room: a recorded
``segment_free`` is then an ``empty_cache`` call, and the simulator empties its cache there too.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from memprof.allocator.config import AllocatorConfig
from memprof.allocator.pool import Block
from memprof.allocator.simulator import CachingAllocator

SEGMENT_ACTIONS = ("segment_alloc", "segment_free", "segment_map", "segment_unmap")
GROWS = ("segment_alloc", "segment_map")


@dataclass
class TraceReplay:
    """The recorded and the simulated segment events, (action, size) in order, and what they add up to."""

    recorded: list[tuple[str, int]]
    simulated: list[tuple[str, int]]
    recorded_max_reserved: int
    simulated_max_reserved: int
    allocs: int
    other_address: int  # allocations the simulator placed at another address than the run did

    @property
    def same_segments(self) -> bool:
        return self.recorded == self.simulated

    def first_difference(self) -> int | None:
        """The index of the first segment event that differs (None: none)."""
        pairs = zip(self.recorded, self.simulated)
        at = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        if at is None and len(self.recorded) != len(self.simulated):
            return min(len(self.recorded), len(self.simulated))
        return at


def most_reserved(events: list[tuple[str, int]]) -> int:
    """The most bytes reserved at once by a sequence of segment events (from none)."""
    reserved = most = 0
    for action, size in events:
        reserved += size if action in GROWS else -size
        most = max(most, reserved)
    return most


def replay_trace(trace: list[dict], config: AllocatorConfig, device_total: int = 1 << 40) -> TraceReplay:
    """Replay one device's recorded history (``trace``) with the settings the run had (``config``)."""
    recorded = [(e["action"], e["size"]) for e in trace if e["action"] in SEGMENT_ACTIONS]
    addresses = deque((e["size"], e["addr"]) for e in trace if e["action"] == "segment_alloc")

    def new_address(size: int) -> int:
        if addresses and addresses[0][0] == size:
            return addresses.popleft()[1]
        return allocator._bump(size)

    allocator = CachingAllocator(config, device_total=device_total, new_address=new_address)
    live: dict[int, Block] = {}
    allocs = other = released = 0
    for entry in trace:
        action = entry["action"]
        if action == "alloc":
            block = allocator.malloc(entry["size"], entry.get("stream", 0))
            live[entry["addr"]] = block
            allocs += 1
            other += block.ptr != entry["addr"] and not config.expandable_segments
        elif action == "free_completed" and entry["addr"] in live:
            allocator.free(live.pop(entry["addr"]))
        elif action in ("segment_free", "segment_unmap"):
            released += 1
            if released > sum(a in ("segment_free", "segment_unmap") for a, _, _ in allocator.events):
                allocator.release_cached()  # an empty_cache call: the simulator has freed nothing it had to
    simulated = [(action, size) for action, _, size in allocator.events]
    return TraceReplay(recorded, simulated, most_reserved(recorded), allocator.max_reserved, allocs, other)

