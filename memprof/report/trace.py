"""The memory timeline as a Chrome/Perfetto trace (the Trace Event Format's JSON), for ui.perfetto.dev and
chrome://tracing. Measures nothing.

One process per record (an optimizer, or one rank of one): a counter of live bytes by category (chrome
stacks them; Perfetto gives each category its own track) and of the total, the training steps and their
phases as slices, and the global peak as an instant event holding its composition. The timestamps are the
tracker's clock: host microseconds on CUDA; on CPU and in estimates one tick per allocation or free, shown
as one microsecond. A record without a timeline (an estimate extrapolated from probes, a failed run) is a
process with one instant event saying why.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from memprof.record import RunRecord
from memprof.runfile import joined, reproduce_commands
from memprof.taxonomy import CATEGORIES

STEPS_THREAD, PHASES_THREAD = 1, 2
PHASE_SLICES = ("setup", "warmup", "forward", "backward", "step")


def record_label(record: RunRecord) -> str:
    """How a record is named in views: its spec, and its rank in a distributed run."""
    s = record.settings
    return s.spec + (f" · rank {s.rank} of {s.nproc}" if s.nproc > 1 else "")


def to_trace(records: Sequence[RunRecord]) -> str:
    """The records' timelines as Trace Event Format JSON."""
    events: list[dict[str, Any]] = []
    for pid, record in enumerate(records, start=1):
        events += _process(record, pid)
    cuda = [r for r in records if r.settings.device.startswith("cuda") and not r.settings.estimate]
    clock = ("host microseconds" if len(cuda) == len(records) else
             "CPU runs and estimates: one tick per allocation or free, shown as 1 us" if not cuda else
             "CUDA runs: host microseconds; CPU runs and estimates: one tick per allocation or free")
    other = {"memprof": joined(r.environment.get("memprof") for r in records), "clock": clock,
             "reproduce": " ; ".join(reproduce_commands(records))}
    return json.dumps({"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}, separators=(",", ":"))


def _process(record: RunRecord, pid: int) -> list[dict[str, Any]]:
    timeline = record.timeline
    events: list[dict[str, Any]] = [
        _meta("process_name", pid, 0, record_label(record) + ("" if timeline.time else " (no timeline)")),
        _meta("process_sort_index", pid, 0, pid, key="sort_index"),
    ]
    if not timeline.time:
        why = record.failure or next((n for n in record.notes if "no timeline" in n), "the record has no timeline")
        return [*events, {"name": "no timeline", "ph": "i", "s": "p", "pid": pid, "tid": 0, "ts": 0,
                          "args": {"why": why}}]
    events += [_meta("thread_name", pid, STEPS_THREAD, "steps"), _meta("thread_name", pid, PHASES_THREAD, "phases")]
    categories = [c for c in CATEGORIES if any(timeline.categories.get(c, ()))]
    origin = min([timeline.time[0], *(m["time"] for m in timeline.marks)])  # a mark may precede the first event
    for i, time in enumerate(timeline.time):
        ts = round(time - origin, 3)
        events.append({"name": "live bytes by category", "ph": "C", "pid": pid, "tid": 0, "ts": ts,
                       "args": {c: timeline.categories[c][i] for c in categories}})
        events.append({"name": "allocated", "ph": "C", "pid": pid, "tid": 0, "ts": ts,
                       "args": {"bytes": timeline.total[i]}})
    events += _slices([{**m, "time": m["time"] - origin} for m in timeline.marks], pid)
    top = max(range(len(timeline.total)), key=timeline.total.__getitem__)
    composition = {f"{r.category} · {r.component}": r.bytes for r in record.peak if r.bytes}
    events.append({"name": "global peak", "ph": "i", "s": "p", "pid": pid, "tid": 0,
                   "ts": round(timeline.time[top] - origin, 3),
                   "args": {"bytes": record.peaks.allocated, "phase": record.peaks.phase, "step": record.peaks.step,
                            **composition}})
    return events


def _slices(marks: list[dict[str, Any]], pid: int) -> list[dict[str, Any]]:
    """Each phase from its mark to the next; each step from its forward mark to the next step's (or the end)."""
    marks = sorted(marks, key=lambda m: m["time"])
    slices = []
    for mark, following in zip(marks, marks[1:]):
        if mark["phase"] in PHASE_SLICES:
            slices.append(_slice(mark["phase"], pid, PHASES_THREAD, mark["time"], following["time"],
                                 {"step": mark["step"]}))
    starts = [m for m in marks if m["phase"] == "forward"]
    ends = [*starts[1:], next((m for m in marks if m["phase"] == "end"), marks[-1])]
    for start, end in zip(starts, ends):
        slices.append(_slice(f"step {start['step']}", pid, STEPS_THREAD, start["time"], end["time"], {}))
    return slices


def _slice(name: str, pid: int, tid: int, start: float, end: float, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "X", "pid": pid, "tid": tid, "ts": round(start, 3),
            "dur": round(max(end - start, 0.0), 3), "args": args}


def _meta(kind: str, pid: int, tid: int, value: Any, key: str = "name") -> dict[str, Any]:
    return {"name": kind, "ph": "M", "pid": pid, "tid": tid, "args": {key: value}}
