"""Machine-readable views of run records: tidy long DataFrame, CSV and JSON, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from memprof.record import RunRecord

if TYPE_CHECKING:
    import pandas as pd

ID_COLUMNS = ("model", "optimizer", "spec", "device", "dtype", "amp", "batch_size", "seq_len", "image_size", "steps")
CSV_COLUMNS = (*ID_COLUMNS, "status", "measure", "category", "component", "bytes", "basis")
"""``measure`` is ``steady`` (after the last step; the breakdown) or ``peak`` (at the global peak)."""


def record_rows(record: RunRecord) -> list[dict]:
    ids = {name: getattr(record.settings, name) for name in ID_COLUMNS}
    rows = []
    for measure, items in (("steady", record.breakdown), ("peak", record.peak)):
        for row in items:
            rows.append({**ids, "status": record.status, "measure": measure, "category": row.category,
                         "component": row.component, "bytes": row.bytes, "basis": row.basis})
    if not rows:  # a failed run still gets a row, so nothing silently disappears
        rows.append({**ids, "status": record.status, "measure": "steady", "category": "", "component": "", "bytes": None, "basis": ""})
    return rows


def records_to_frame(records: Sequence[RunRecord]) -> "pd.DataFrame":
    import pandas as pd

    return pd.DataFrame([row for record in records for row in record_rows(record)], columns=list(CSV_COLUMNS))


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def to_csv(records: Sequence[RunRecord]) -> str:
    return records_to_frame(records).to_csv(index=False)


def to_json(records: Sequence[RunRecord]) -> str:
    return json.dumps({"records": [r.to_dict() for r in records]}, indent=1, default=str)
