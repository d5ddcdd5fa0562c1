"""Tab-separated tidy rows (a dummy format: proves a format is a renderer and a table row)."""

from __future__ import annotations

from typing import Sequence

from memprof.record import RunRecord
from memprof.runfile import CSV_COLUMNS, record_rows


def to_tsv(records: Sequence[RunRecord]) -> str:
    lines = ["\t".join(CSV_COLUMNS)]
    lines += ["\t".join("" if row[c] is None else str(row[c]) for c in CSV_COLUMNS)
              for record in records for row in record_rows(record)]
    return "\n".join(lines) + "\n"
