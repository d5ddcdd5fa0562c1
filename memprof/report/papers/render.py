"""The reproductions as files: NAME.csv (one row per cell), NAME.md (the page) and the README whose top is
the coverage table. Views only: they take the rows ``memprof.report.papers.compare`` made."""

from __future__ import annotations

import csv
import io
from typing import Iterable, Mapping, Sequence

from memprof.report.papers.compare import COLUMNS, PAPER_CELL, Coverage, coverage, row_bucket
from memprof.report.papers.model import BUCKETS, Reproduction

COMMAND = "memprof papers"
PAGE_COLUMNS = ("table", "model", "optimizer", "quantity", "paper", "memprof", "diff_pct", "source", "note")


def to_csv_text(rows: Sequence[Mapping[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def read_csv_text(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _cell_text(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_cell_text(v) for v in row) + " |" for row in rows])


def summary(rows: Sequence[Mapping[str, str]]) -> str:
    """One line: how the paper cells of these rows land."""
    counts = {name: 0 for name in BUCKETS}
    for row in rows:
        if row["cell"] == PAPER_CELL:
            counts[row_bucket(row)] += 1
    total = sum(counts.values())
    return (f"{total} paper cells: {total - counts['missing']} reproduced, {counts['within 2 %']} within 2 % "
            f"(or the paper's rounding), {counts['within 10 %']} within 10 %, {counts['off']} further off, "
            f"{counts['missing']} missing.")


def page(repro: Reproduction, rows: Sequence[Mapping[str, str]], provenance: Sequence[str]) -> str:
    """NAME.md: where the numbers come from, the table, and what matched and why."""
    out = [f"# {repro.title}", "", repro.source, "",
           "## How this page is made", "",
           "```bash", f"{COMMAND} {repro.name}   # writes reports/{repro.name}.csv and .md, and the README's coverage",
           "```", "", f"Run configuration: `reports/{repro.name}.toml` (the paper's settings).", ""]
    out += [f"- {line}" for line in provenance]
    out += ["", "A CUDA run at the paper's settings replaces the estimates once it is committed and listed in the "
            "reproduction's `gpu_runs` (memprof/report/papers/):", "", "```bash",
            f"memprof compare --config reports/{repro.name}.toml --device cuda --json reports/gpu/{repro.name}-GPU.json "
            f"--csv reports/gpu/{repro.name}-GPU.csv", "```"]
    out += ["", "## Paper against memprof", "",
            "Rows marked `paper` in the CSV's `cell` column (**bold** here) stand for a number the paper prints; "
            "the others are supporting readings. `diff_pct` is (memprof − paper) / paper.", ""]
    page_rows = []
    for r in rows:
        values = [r[c] for c in PAGE_COLUMNS]
        if r["cell"] == PAPER_CELL:
            values[4] = f"**{values[4]}**"
        if r["reason"]:
            values[-1] = "; ".join(v for v in (values[-1], f"why: {r['reason']}") if v)
        page_rows.append(values)
    out += _table(PAGE_COLUMNS, page_rows)
    out += ["", "## What matched, what did not, and why", "", f"- {summary(rows)}"]
    out += [f"- {line}" for line in repro.explanation]
    if repro.inconsistencies:
        out += ["", "## Where the paper contradicts itself", ""] + [f"- {line}" for line in repro.inconsistencies]
    return "\n".join(out) + "\n"


def coverage_table(covered: Sequence[Coverage]) -> list[str]:
    header = ("paper", "table", "cells", "reproduced", "within 2 %", "2–10 %", "> 10 %", "missing")
    rows = [(c.paper, c.table, c.cells, c.reproduced, *(c.counts[b] for b in BUCKETS)) for c in covered]
    totals = [sum(c.cells for c in covered), sum(c.reproduced for c in covered),
              *(sum(c.counts[b] for c in covered) for b in BUCKETS)]
    rows.append(("**all**", "", *(f"**{t}**" for t in totals)))
    return _table(header, rows)


def reasons_section(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """Every paper cell more than 2 % off or missing, with its reason, table by table."""
    out: list[str] = []
    by_table: dict[str, list[Mapping[str, str]]] = {}
    for r in rows:
        if r["cell"] == PAPER_CELL and row_bucket(r) != BUCKETS[0]:
            by_table.setdefault(r["table"], []).append(r)
    for table, listed in by_table.items():
        out += ["", f"<details><summary>{table}: {len(listed)} cells more than 2 % off or missing</summary>", ""]
        out += _table(("model", "optimizer", "quantity", "paper", "memprof", "diff %", "reason"),
                      ((r["model"], r["optimizer"], r["quantity"], r["paper"], r["memprof"] or "—",
                        r["diff_pct"] or "—", r["reason"] or "**no reason recorded**") for r in listed))
        out += ["", "</details>"]
    return out


def readme(reproductions: Sequence[Reproduction], rows_by_name: Mapping[str, Sequence[Mapping[str, str]]],
           timing: Sequence[str], model_files: Sequence[str]) -> str:
    """reports/README.md: the coverage table on top, then why cells are off, the papers' own
    contradictions, the list of reproductions, how to regenerate them and the model files."""
    rows = [r for repro in reproductions for r in rows_by_name.get(repro.name, ())]
    out = ["# Paper memory tables, reproduced", "",
           "Every memory figure the seed papers print (optimizer state, end-to-end or peak memory; AdaMeM prints "
           "none), set against memprof's measurement of the same run. One command regenerates all of it from the "
           "checked-in configurations (`NAME.toml`):", "",
           "```bash", f"{COMMAND}                  # every reproduction; {COMMAND} smmf-table4 … for some",
           "```", "",
           "Optimizer state, weights and gradients are measured on CPU (small batch, one step: the bytes are the "
           "same on CUDA). A peak comes from a committed CUDA run under `gpu/` where one exists, else from "
           "`memprof estimate` for the paper's GPU (marked as an estimate, with the GPU). Models too large for a "
           "CPU run in minutes are estimated throughout (an estimate's state is exact).", "",
           "## Coverage", "",
           "A paper cell is *reproduced* when memprof has a number for it; *within 2 %* counts the paper's printed "
           "rounding as agreement too (a printed 0.8 covers 0.75–0.85).", ""]
    out += coverage_table(coverage(rows))
    out += ["", "### Why a cell is more than 2 % off, or missing"]
    out += reasons_section(rows)
    contradictions = [(repro, line) for repro in reproductions for line in repro.inconsistencies]
    if contradictions:
        out += ["", "### Where a paper contradicts itself", ""]
        out += [f"- {repro.paper} ([{repro.name}]({repro.name}.md)): {line}" for repro, line in contradictions]
    out += ["", "## The reproductions", ""]
    out += [f"- [{repro.title}]({repro.name}.md): {summary(rows_by_name.get(repro.name, ()))}"
            for repro in reproductions]
    out += ["", "## This regeneration", ""] + [f"- {line}" for line in timing]
    out += ["", "## Model files under `configs/`", ""] + [f"- {line}" for line in model_files]
    return "\n".join(out) + "\n"
