"""Run records made by hand, as the runner would make them, for tests of what reads them (views, the gate,
run files, the pytest plugin): ``run_record("adam", rows=[("weights", "param", 4096)], peak=[...])``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from memprof.record import Peaks, Row, RunRecord
from memprof.settings import Settings


def run_record(spec: str = "adam", *, rows: Iterable[tuple] = (), peak: Iterable[tuple] = (),
               status: str = "ok", failure: str = "OOM in step (step 1)", environment: dict[str, str] | None = None,
               settings: Settings | None = None, **fields: Any) -> RunRecord:
    """A record of ``settings``, or of ``spec`` with setting ``fields`` (model gpt2 on cpu unless given).

    ``rows`` are its breakdown, each ``(category, component, bytes[, basis])`` (counted tensors unless a basis is
    given); ``peak`` the global peak's composition (allocator blocks unless a basis is given), which falls in
    step 1 and is the sum of those rows. A record whose status is not ok has no rows, only its ``failure``."""
    if settings is None:
        settings = Settings(**{"model": "gpt2", "device": "cpu", **fields}, optimizer=spec.split(":")[0], spec=spec)
    environment = {"memprof": "0.1.0"} if environment is None else dict(environment)
    record = RunRecord(settings=settings, environment=environment, status=status)
    if status != "ok":
        record.failure = failure
        return record
    record.breakdown = [Row(*figures) for figures in rows]
    record.peak = [Row(*figures) if len(figures) == 4 else Row(*figures, "allocator") for figures in peak]
    record.peaks = Peaks(allocated=sum(row.bytes for row in record.peak), phase="step", step=1)
    return record
