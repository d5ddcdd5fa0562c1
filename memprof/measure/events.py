"""One event stream, two sources: allocations, identity tags and phase marks, replayed once.

Both trackers (CPU dispatch mode, CUDA allocator history) produce ``Allocation`` records with a
start and end time on a shared clock. The runner adds ``Tag``s (this storage pointer is a
parameter, a gradient, optimizer state, a saved activation…) and ``PhaseMark``s. ``replay``
matches tags to the allocation live at that pointer at the tag's time, gives each allocation one
category, and walks the stream once to get live bytes per category over time, each phase's
peak and the composition at the global peak.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Allocation:
    ptr: int
    nbytes: int  # allocator block bytes on CUDA, storage bytes on CPU
    start: float
    end: float | None = None  # None: still live when the capture stopped
    category: str | None = None
    component: str = ""
    tensor_bytes: int | None = None  # storage bytes of the tensor that owns it, when tagged
    origin: object = None  # the op that made it (a CPU or fake tensor's), where known


@dataclass(frozen=True)
class Tag:
    time: float
    ptr: int
    category: str
    component: str
    tensor_bytes: int


@dataclass(frozen=True)
class PhaseMark:
    time: float
    phase: str  # "setup", "warmup", "forward", "backward", "step", "end"
    step: int  # 0 for setup/warm-up
    micro: int = 0  # the micro-batch of the step (gradient accumulation: 0 … N-1)


@dataclass
class Replay:
    """What one pass over the stream yields."""

    peak_bytes: int = 0
    peak_time: float = 0.0
    peak_phase: tuple[str, int] = ("setup", 0)
    peak_micro: int = 0  # the micro-batch of the step (gradient accumulation)
    peak_composition: dict[tuple[str, str], int] = field(default_factory=dict)
    # {step, phase, micro, time, start_bytes, peak, end_bytes, peak_by_component: {(category, component): max live},
    #  composition: {(category, component): live at the phase's peak}}
    phase_peaks: list[dict] = field(default_factory=list)
    timeline: dict = field(default_factory=dict)
    times: list[float] = field(default_factory=list)  # with keep_totals: each event's time…
    totals: list[int] = field(default_factory=list)  # …and the live total after it

    def peak_between(self, start: float, end: float) -> int:
        """The most bytes live at any instant from ``start`` to ``end`` (needs ``keep_totals``)."""
        first, last = bisect.bisect_left(self.times, start), bisect.bisect_right(self.times, end)
        entering = self.totals[first - 1] if first > 0 else 0
        return max([entering, *self.totals[first:last]])


def replay(allocations: list[Allocation], marks: list[PhaseMark], *, timeline_points: int = 0,
           keep_totals: bool = False) -> Replay:
    """Walk allocations and frees in time order (allocations must already be assigned); ``keep_totals``:
    keep the live total after every event (``Replay.peak_between``)."""
    events: list[tuple[float, int, int, Allocation]] = []
    for i, alloc in enumerate(allocations):
        events.append((alloc.start, 1, i, alloc))
        if alloc.end is not None:
            events.append((alloc.end, 0, i, alloc))  # at equal times, frees first
    events.sort(key=lambda e: (e[0], e[1], e[2]))
    result = Replay()
    live: dict[tuple[str, str], int] = defaultdict(int)
    live_allocs: set[int] = set()
    total = 0
    mark_iter = iter(sorted(marks, key=lambda m: m.time))
    next_mark = next(mark_iter, None)
    current: dict | None = None
    samples: list[tuple[float, int, dict[str, int]]] = []

    def close_phase() -> None:
        if current is not None:
            current["end_bytes"] = total
            result.phase_peaks.append(current)

    def open_phase(mark: PhaseMark) -> dict:
        return {
            "step": mark.step,
            "phase": mark.phase,
            "micro": mark.micro,
            "time": mark.time,
            "start_bytes": total,
            "peak": total,
            "peak_by_component": {k: v for k, v in live.items() if v},
            "composition": {k: v for k, v in live.items() if v},  # at the phase's peak
        }

    for time, is_alloc, idx, alloc in events:
        while next_mark is not None and next_mark.time <= time:
            close_phase()
            current = open_phase(next_mark)
            next_mark = next(mark_iter, None)
        key = (alloc.category or "unattributed", alloc.component)
        if is_alloc:
            live[key] += alloc.nbytes
            live_allocs.add(idx)
            total += alloc.nbytes
        elif idx in live_allocs:
            live[key] -= alloc.nbytes
            live_allocs.discard(idx)
            total -= alloc.nbytes
        if current is not None:
            if total > current["peak"]:
                current["peak"], current["composition"] = total, {k: v for k, v in live.items() if v}
            by = current["peak_by_component"]
            by[key] = max(by.get(key, 0), live[key])
        if total > result.peak_bytes:
            result.peak_bytes, result.peak_time = total, time
            result.peak_phase = (current["phase"], current["step"]) if current else ("setup", 0)
            result.peak_micro = current["micro"] if current else 0
            result.peak_composition = {k: v for k, v in live.items() if v}
        if timeline_points:
            samples.append((time, total, _by_category(live)))
        if keep_totals:
            result.times.append(time)
            result.totals.append(total)
    while next_mark is not None:
        close_phase()
        current = open_phase(next_mark)
        next_mark = next(mark_iter, None)
    close_phase()
    result.phase_peaks = [p for p in result.phase_peaks if p["phase"] not in ("end",)]
    if timeline_points:
        result.timeline = _downsample(samples, timeline_points, marks)
    return result


def _by_category(live: dict[tuple[str, str], int]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for (category, _), nbytes in live.items():
        out[category] += nbytes
    return out


def _downsample(samples: list[tuple[float, int, dict[str, int]]], points: int, marks: list[PhaseMark]) -> dict:
    """Keep at most ``points`` samples, always including each bucket's maximum so peaks survive."""
    if not samples:
        return {}
    bucket = max(1, len(samples) // points)
    kept = [max(samples[i:i + bucket], key=lambda s: s[1]) for i in range(0, len(samples), bucket)]
    t0 = samples[0][0]
    categories = sorted({c for _, _, by in kept for c in by})
    return {
        "time": [s[0] - t0 for s in kept],
        "total": [s[1] for s in kept],
        "categories": {c: [s[2].get(c, 0) for s in kept] for c in categories},
        "marks": [{"time": m.time - t0, "phase": m.phase, "step": m.step} for m in marks],
    }
