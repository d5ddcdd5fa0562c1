"""A torch memory snapshot of a run the CUDA allocator did not record: a CPU run or an estimate.

PyTorch's memory_viz (pytorch.org/memory_viz, ``torch.cuda._memory_viz``) reads the pickle that
``torch.cuda.memory._snapshot()`` returns: ``segments`` (what is allocated when the snapshot is taken,
each segment's ``blocks``) and ``device_traces`` (every ``segment_alloc``, ``alloc``, ``free_requested``,
``free_completed`` and ``segment_free`` in order). This module writes that format from the tracker's
allocations once they have their categories (``memprof.measure.attribution.assign``): each entry's
frames name the allocation's category and component, and the phase and step that made it.

No caching allocator is modelled: every allocation is a segment of its own, at an address of its own
(never reused), so reserved equals allocated at every instant. Sizes are the tracker's: storage bytes on
CPU, 512-B blocks for a CUDA estimate. A distributed run's ranks each write their own file.
"""

from __future__ import annotations

import bisect
import pickle
from pathlib import Path
from typing import Any

from memprof.measure.events import Allocation, PhaseMark
from memprof.settings import Settings

BASE_ADDRESS = 1 << 32
"""Where the made-up address space starts (memory_viz shows addresses in hex)."""
ALIGNMENT = 512


def snapshot_file(settings: Settings) -> str | None:
    """Where this run's snapshot goes: ``settings.snapshot``, with ``-rank<R>`` before the suffix for one
    rank of a launched distributed run (a simulated rank is the only one measured: it keeps the name)."""
    if settings.snapshot is None or settings.nproc == 1 or settings.estimate:
        return settings.snapshot
    path = Path(settings.snapshot)
    return str(path.with_name(f"{path.stem}-rank{settings.rank}{path.suffix}"))


def snapshot(allocations: list[Allocation], marks: list[PhaseMark], *, device: int = 0) -> dict[str, Any]:
    """The snapshot of ``allocations`` (categories assigned), phases from ``marks``: what
    ``torch.cuda.memory._snapshot()`` returns, for ``device``."""
    mark_times = [m.time for m in sorted(marks, key=lambda m: m.time)]
    ordered_marks = sorted(marks, key=lambda m: m.time)
    frames_of: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}  # shared: pickled once each

    def frames(alloc: Allocation) -> list[dict[str, Any]]:
        i = bisect.bisect_right(mark_times, alloc.start) - 1
        phase, step = (ordered_marks[i].phase, ordered_marks[i].step) if i >= 0 else ("setup", 0)
        key = (alloc.category or "unattributed", alloc.component, phase, step)
        if key not in frames_of:
            frames_of[key] = [
                {"filename": "memprof/category", "line": 0, "name": f"{key[0]} · {key[1]}" if key[1] else key[0]},
                {"filename": "memprof/phase", "line": step, "name": f"{phase} (step {step})" if step else phase},
            ]
        return frames_of[key]

    # (time, group, index, action, addr, size, frames); group 0: a free, 1: an allocation, 2: the free of an
    # allocation made at the same time. At equal times frees come first, as in memprof.measure.events.replay.
    events: list[tuple[float, int, int, str, int, int, list]] = []
    segments = []
    address = BASE_ADDRESS
    for index, alloc in enumerate(a for a in allocations if a.nbytes > 0):
        addr, size, where = address, alloc.nbytes, frames(alloc)
        address += -(-size // ALIGNMENT) * ALIGNMENT
        events += [(alloc.start, 1, index, action, addr, size, where) for action in ("segment_alloc", "alloc")]
        if alloc.end is None:
            segments.append(_segment(device, addr, size, where))
            continue
        group = 0 if alloc.end > alloc.start else 2
        events += [(alloc.end, group, index, action, addr, size, where)
                   for action in ("free_requested", "free_completed", "segment_free")]
    events.sort(key=lambda e: e[:3])  # stable: each allocation's own events keep their order
    trace = [{"action": action, "addr": addr, "size": size, "stream": 0, "time_us": int(time), "frames": where}
             for time, _, _, action, addr, size, where in events]
    return {"segments": segments, "device_traces": [[] for _ in range(device)] + [trace]}


def _segment(device: int, addr: int, size: int, frames: list[dict[str, Any]]) -> dict[str, Any]:
    """A segment holding one allocated block, as ``torch.cuda.memory._snapshot()`` describes one."""
    block = {"address": addr, "size": size, "requested_size": size, "state": "active_allocated", "frames": frames}
    return {"device": device, "address": addr, "total_size": size, "allocated_size": size, "active_size": size,
            "requested_size": size, "stream": 0, "segment_type": "large", "segment_pool_id": (0, 0),
            "is_expandable": False, "frames": frames, "blocks": [block]}


def write(path: str, allocations: list[Allocation], marks: list[PhaseMark]) -> None:
    """Write the snapshot of ``allocations`` to ``path`` (atomically), as a pickle."""
    from memprof.files import write_atomic

    write_atomic(path, pickle.dumps(snapshot(allocations, marks), protocol=pickle.HIGHEST_PROTOCOL))
