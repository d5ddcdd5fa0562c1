"""What the caching allocator reserves: an estimate's stream simulated, a real run's read from its history.

An estimate on fake tensors allocates nothing, yet a GPU run fails when the caching allocator cannot reserve
another segment, not when allocated bytes reach the card's size. ``simulate`` replays the estimate's
allocations and frees, in order, through ``memprof.allocator.simulator`` with the run's allocator settings
(``--alloc-conf``, else ``PYTORCH_CUDA_ALLOC_CONF``): the record gets what ``torch.cuda.max_memory_allocated``,
``max_memory_reserved`` and ``memory_reserved`` would say, the most reserved in each phase, the allocator row
(reserved − allocated at the peaks) and, where the run needs more than its budget (``--memory`` or the
``--gpu``'s capacity, less the CUDA context outside the allocator), the first allocation that would fail.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Sequence

from memprof.allocator.config import AllocatorConfig, from_environment, parse
from memprof.allocator.pool import Block
from memprof.allocator.replay import GROWS, SEGMENT_ACTIONS
from memprof.allocator.simulator import CachingAllocator, OutOfMemory
from memprof.measure.events import Allocation, PhaseMark
from memprof.record import PhasePeak, Row, RunRecord
from memprof.settings import Settings
from memprof.taxonomy import FRAGMENTATION


def allocator_settings(settings: Settings) -> str:
    """The allocator settings a run has: ``--alloc-conf``, else the environment's."""
    return settings.alloc_conf if settings.alloc_conf is not None else from_environment()


def config(settings: Settings) -> AllocatorConfig:
    return parse(allocator_settings(settings))


@dataclasses.dataclass
class Simulated:
    """One pass of the simulator over a stream."""

    allocator: CachingAllocator
    reserved: list[tuple[float, int]]  # (time, bytes reserved after it), at every change
    failed: Allocation | None = None  # the allocation that found no memory (with a capacity)


def run(allocations: Sequence[Allocation], allocator_config: AllocatorConfig, *, device_total: int,
        capacity: int | None = None) -> Simulated:
    """Replay ``allocations`` (each ``nbytes`` a rounded request, ``start``/``end`` on one clock, frees first
    at equal times) through a simulated allocator; with a ``capacity``, up to the first that fails."""
    events = [(a.start, 1, i) for i, a in enumerate(allocations)]
    events += [(a.end, 0, i) for i, a in enumerate(allocations) if a.end is not None]
    events.sort()
    allocator = CachingAllocator(allocator_config, capacity=capacity, device_total=device_total)
    blocks: dict[int, Block] = {}
    result = Simulated(allocator, [])
    for time, is_alloc, i in events:
        before = allocator.reserved
        if is_alloc:
            try:
                blocks[i] = allocator.malloc(allocations[i].nbytes)
            except OutOfMemory:
                result.failed = allocations[i]
                return result
        elif i in blocks:
            allocator.free(blocks.pop(i))
        if allocator.reserved != before:
            result.reserved.append((time, allocator.reserved))
    return result


def simulate(record: RunRecord, allocations: list[Allocation], marks: list[PhaseMark], settings: Settings, *,
             device_total: int, outside: int, budget: int | None) -> None:
    """Fill an estimate's allocator figures (see the module's docstring); ``outside``: the CUDA context outside
    the allocator, ``budget``: the memory the run must fit in (None: none). The whole model's stream: a
    deep model is not probed for a CUDA target (``memprof.measure.depth``)."""
    text = allocator_settings(settings)
    allocator_config = parse(text)
    record.environment["allocator_config"] = text
    try:
        free = run(allocations, allocator_config, device_total=device_total)
    except OutOfMemory as exc:  # only per_process_memory_fraction limits it
        record.status, record.failure = "oom", f"OOM in the simulated allocator: {exc}"
        return
    peaks, sim = record.peaks, free.allocator
    peaks.max_allocated, peaks.max_reserved = sim.max_allocated, sim.max_reserved
    peaks.allocated_end, peaks.reserved_end = sim.allocated, sim.reserved
    record.breakdown.append(Row(*FRAGMENTATION, sim.max_reserved - sim.max_allocated, "allocator"))
    record.phase_peaks = phase_reserved(record.phase_peaks, marks, free.reserved)
    if budget is not None and sim.max_reserved + outside > budget:
        limited = run(allocations, allocator_config, device_total=device_total, capacity=max(0, budget - outside))
        peaks.fails_at = describe_failure(limited.failed, marks) if limited.failed else ""


def phase_reserved(phase_peaks: list[PhasePeak], marks: list[PhaseMark],
                   reserved: list[tuple[float, int]]) -> list[PhasePeak]:
    """Each phase peak with the most bytes reserved from its phase's mark to the next (``reserved``: the total
    after each change, in time order)."""
    times = [t for t, _ in reserved]
    starts = {(m.phase, m.step, m.micro): m.time for m in marks}
    ordered = sorted(marks, key=lambda m: m.time)
    out = []
    for peak in phase_peaks:
        start = starts.get((peak.phase, peak.step, peak.micro))
        if start is None:
            out.append(peak)
            continue
        end = next((m.time for m in ordered if m.time > start), float("inf"))
        first, last = bisect.bisect_right(times, start), bisect.bisect_left(times, end)
        entering = reserved[first - 1][1] if first > 0 else 0
        out.append(dataclasses.replace(peak, reserved=max([entering, *(r for _, r in reserved[first:last])])))
    return out


def describe_failure(allocation: Allocation, marks: list[PhaseMark]) -> str:
    """Where and what the first allocation that fails is: "backward (step 1): 1,610,612,736 B for
    temporaries/backward (aten.mm.default)"."""
    times = [m.time for m in marks]
    i = bisect.bisect_right(times, allocation.start) - 1
    mark = marks[i] if i >= 0 else PhaseMark(0, "setup", 0)
    micro = f", micro-batch {mark.micro}" if mark.micro else ""
    step = f" (step {mark.step}{micro})" if mark.step else ""
    made_by = f" ({allocation.origin})" if allocation.origin else ""
    what = f"{allocation.category}/{allocation.component}" if allocation.category else "an allocation"
    return f"{mark.phase}{step}: {allocation.nbytes:,} B for {what}{made_by}"


def reserved_from_trace(trace: list[dict]) -> list[tuple[float, int]]:
    """A real run's reserved bytes after each segment event of its history (``time_us`` its clock)."""
    reserved, out = 0, []
    for entry in (e for e in trace if e["action"] in SEGMENT_ACTIONS):
        reserved += entry["size"] if entry["action"] in GROWS else -entry["size"]
        out.append((float(entry["time_us"]), reserved))
    return out

