"""A reproduction's cells set against what was measured: one row per cell, and the coverage of the
paper cells by table (how many reproduced, within 2 %, within 10 %, off, missing, and why)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from memprof.report.papers.model import BUCKETS, UNITS, Cell, Run, agreement_text, bucket, printed

COLUMNS = ("table", "model", "optimizer", "quantity", "paper", "memprof", "diff", "diff_pct", "cell", "source",
           "note", "reason")
PAPER_CELL = "paper"  # the ``cell`` column of the row that stands for a printed number


@dataclass(frozen=True)
class Reading:
    """One record's quantities (``memprof.report.papers.model.quantities``) and where they come from:
    ``kind`` "cpu" (measured on CPU), "gpu" (a committed CUDA run) or "estimate" (fake tensors for a GPU);
    ``label`` says so in words."""

    kind: str
    label: str
    values: Mapping[str, int | None]


Measured = Mapping[tuple, Mapping[str, Reading]]
"""Per record key (``Run.key``), its readings by kind."""

PREFERENCE = {"peak": ("gpu", "estimate")}
"""Which reading a quantity takes first: a peak from a committed GPU run, else an estimate for the paper's
GPU (a CPU run's peak is simulated, with other kernels); the rest (exact bytes) from the CPU run first."""
DEFAULT_PREFERENCE = ("cpu", "estimate", "gpu")


def reading_for(cell: Cell, run: Run, measured: Measured) -> Reading | None:
    readings = measured.get(run.key, {})
    for kind in PREFERENCE.get(cell.quantity, DEFAULT_PREFERENCE):
        if kind in readings and readings[kind].values.get(cell.quantity) is not None:
            return readings[kind]
    return None


def value_of(cell: Cell, measured: Measured) -> tuple[float | None, str]:
    """memprof's number for a cell in the cell's unit and the source(s) it came from; None when a run
    is missing (the source then names what is missing)."""
    values, sources = [], []
    for run in cell.runs:
        reading = reading_for(cell, run, measured)
        if reading is None:
            what = "GPU run or estimate" if cell.quantity == "peak" else "run"
            return None, f"no {what} of {run.spec} on {run.model}"
        values.append(reading.values[cell.quantity])
        sources.append(reading.label)
    source = " / ".join(dict.fromkeys(sources))
    if cell.ratio:
        return values[0] / values[1], source
    return sum(sign * v for (sign, _), v in zip(cell.terms, values)) / UNITS[cell.unit], source


def compare(cells: Sequence[Cell], measured: Measured, missing: Mapping[tuple, str] = {}) -> list[dict]:
    """One row per cell (``COLUMNS``): paper, memprof, diff (memprof − paper), diff_pct, whether it is the
    paper's cell, the source, a note (agreement and the cell's note) and, where it is needed, the reason.
    ``missing`` gives why a record has no reading (its run failed: the failure), by ``Run.key``."""
    rows = []
    for c in cells:
        memprof, source = value_of(c, measured)
        row = {"table": c.table, "model": c.model, "optimizer": c.optimizer, "quantity": c.heading,
               "paper": "" if c.paper is None else printed(c.paper), "memprof": "", "diff": "", "diff_pct": "",
               "cell": PAPER_CELL if c.primary else "", "source": source if memprof is not None else "",
               "note": c.note, "reason": ""}
        if memprof is None:
            failures = [missing[run.key] for run in c.runs if run.key in missing]
            row["reason"] = c.reason if c.reason and not failures else f"not measured: {'; '.join(failures) or source}"
        else:
            row["memprof"] = f"{memprof:.3f}"
            if c.paper is not None:
                diff = memprof - c.paper
                row["diff"] = f"{diff:+.3f}"
                row["diff_pct"] = f"{100 * diff / abs(c.paper):+.1f}" if c.paper else ""
                verdict, agrees = agreement_text(c, memprof)
                row["note"] = "; ".join(part for part in (verdict, c.note) if part)
                if not agrees or bucket(printed(c.paper), memprof) != BUCKETS[0]:
                    row["reason"] = fill(c.reason, c.paper, memprof)
        rows.append(row)
    return rows


def fill(reason: str, paper: float, memprof: float) -> str:
    diff = memprof - paper
    pct = 100 * diff / abs(paper) if paper else 0.0
    return reason.format(paper=printed(paper), memprof=f"{memprof:.4g}", diff=f"{diff:+.3g}", gap=f"{-diff:.3g}",
                         size=f"{abs(diff):.3g}", pct=f"{pct:+.1f}", off=f"{abs(pct):.1f}")


# -- coverage ------------------------------------------------------------------------------------------
@dataclass
class Coverage:
    """The paper cells of one table: how many, and how many land in each bucket (``BUCKETS``)."""

    paper: str
    table: str
    cells: int = 0
    counts: dict | None = None

    def __post_init__(self) -> None:
        self.counts = self.counts or {name: 0 for name in BUCKETS}

    @property
    def reproduced(self) -> int:
        return self.cells - self.counts["missing"]


def paper_of(table: str) -> str:
    """The paper a table label names: "SMMF T4" → "SMMF"."""
    return table.rsplit(" ", 1)[0]


def row_bucket(row: Mapping[str, str]) -> str:
    return bucket(row["paper"], float(row["memprof"]) if row["memprof"] else None)


def coverage(rows: Iterable[Mapping[str, str]]) -> list[Coverage]:
    """Per table, in order of first appearance, the buckets of its paper cells (rows whose ``cell`` is
    ``PAPER_CELL``)."""
    tables: dict[str, Coverage] = {}
    for row in rows:
        if row["cell"] != PAPER_CELL:
            continue
        entry = tables.setdefault(row["table"], Coverage(paper_of(row["table"]), row["table"]))
        entry.cells += 1
        entry.counts[row_bucket(row)] += 1
    return list(tables.values())


def unexplained(rows: Iterable[Mapping[str, str]]) -> list[Mapping[str, str]]:
    """Paper cells more than 2 % off (or missing) that carry no reason."""
    return [r for r in rows if r["cell"] == PAPER_CELL and row_bucket(r) != BUCKETS[0] and not r["reason"]]
