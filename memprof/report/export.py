"""What the views share: the tidy DataFrame and the per-optimizer summary rows that the Markdown and
LaTeX tables render. Reading and writing run files, and the provenance every export carries, are
``memprof.runfile``'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from memprof.gpus import need
from memprof.record import RunRecord
from memprof.runfile import CSV_COLUMNS, record_rows
from memprof.taxonomy import order_roles

if TYPE_CHECKING:
    import pandas as pd


def records_to_frame(records: Sequence[RunRecord]) -> "pd.DataFrame":
    """The tidy long table: the CSV's rows as a DataFrame."""
    import pandas as pd

    frame = pd.DataFrame([row for record in records for row in record_rows(record)], columns=list(CSV_COLUMNS))
    for column in ("bytes", "num_classes"):  # integers even where a failed run or a default leaves a gap
        frame[column] = frame[column].astype("Int64")
    return frame


# -- the per-optimizer summary that Markdown and LaTeX render -----------------------------
def state_components(records: Sequence[RunRecord]) -> list[str]:
    """Optimizer-state components present in any record, in role order."""
    return order_roles(c for r in records for c in r.components("optimizer_state"))


def summary_rows(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One dict per record: ``label``, ``model``, ``failure`` (or None) and byte counts keyed
    ``weights``, ``gradients``, ``state``, ``state:<component>``, ``activations``,
    ``step_transient``, ``peak`` (the global peak of allocated bytes), ``reserved`` (the most the CUDA caching
    allocator reserved: None on CPU) and ``needs`` (``memprof.gpus.need``)."""

    components = state_components(records)
    rows = []
    for r in records:
        parts = r.components("optimizer_state")
        rows.append({
            "label": r.settings.spec + (f" · rank {r.settings.rank}" if r.settings.nproc > 1 else ""),
            "model": r.settings.model,
            "failure": None if r.status == "ok" else (r.failure or r.status),
            "weights": r.total("weights"),
            "gradients": r.total("gradients"),
            "state": r.total("optimizer_state"),
            **{f"state:{c}": parts.get(c, 0) for c in components},
            "activations": r.total("activations"),
            "step_transient": r.total("step_transient"),
            "peak": r.peaks.allocated,
            "reserved": r.peaks.max_reserved,
            "needs": need(r),
        })
    return rows
