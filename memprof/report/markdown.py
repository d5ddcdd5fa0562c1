"""Markdown tables of run records (GitHub-flavoured), with the provenance in an HTML comment."""

from __future__ import annotations

from typing import Sequence

from memprof.record import RunRecord
from memprof.report.export import state_components, summary_rows
from memprof.runfile import provenance, reproduce_commands
from memprof.taxonomy import order_roles
from memprof.units import fmt, scale


def escape(text: str) -> str:
    """Make ``text`` safe inside a table cell: pipes escaped, newlines flattened."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    lines = ["| " + " | ".join(escape(h) for h in header) + " |",
             "|" + "|".join("---:" if r else ":---" for r in right) + "|"]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return lines


def provenance_comment(records: Sequence[RunRecord]) -> list[str]:
    """An HTML comment (invisible when rendered) with what is needed to reproduce the numbers."""
    lines = ["<!--", "memprof run; reproduce with:"]
    lines += [f"  {command}" for command in reproduce_commands(records)]
    lines += [f"{key}: {value}" for key, value in provenance(records).items()]
    lines.append("-->")
    return [lines[0], *(line.replace("-->", "- ->") for line in lines[1:-1]), lines[-1]]


def summary_table(records: Sequence[RunRecord], *, unit: str = "MiB", digits: int = 2) -> list[str]:
    """One row per optimizer: weights, gradients, state total and components, activations, peak."""
    scale(unit)
    components = state_components(records)
    several_models = len({r.settings.model for r in records}) > 1
    cpu = all(not r.settings.device.startswith("cuda") for r in records)
    header = ["Optimizer", *(["Model"] if several_models else []), f"Weights ({unit})", f"Gradients ({unit})",
              f"Optimizer state ({unit})", *(f"State: {c} ({unit})" for c in components), f"Activations ({unit})",
              f"Step transient ({unit})", f"Peak{' (simulated)' if cpu else ''} ({unit})",
              *([] if cpu else [f"Reserved ({unit})", f"Needs ({unit})"])]
    keys = ["weights", "gradients", "state", *(f"state:{c}" for c in components), "activations", "step_transient", "peak",
            *([] if cpu else ["reserved", "needs"])]
    rows = []
    for row in summary_rows(records):
        lead = [row["label"], *([row["model"]] if several_models else [])]
        if row["failure"]:
            rows.append([*lead, row["failure"], *([""] * (len(keys) - 1))])
        else:
            rows.append([*lead, *(fmt(row[k], unit, digits) for k in keys)])
    return _table(header, rows, [False] * (1 + several_models) + [True] * len(keys))


def breakdown_table(record: RunRecord, *, unit: str = "MiB", digits: int = 2) -> list[str]:
    """Every category and component of one record: after the last step and at the global peak."""
    steady, peak = {}, {}
    for target, rows in ((steady, record.breakdown), (peak, record.peak)):
        for r in rows:
            target[(r.category, r.component)] = target.get((r.category, r.component), 0) + r.bytes
    keys = list(dict.fromkeys([*steady, *peak]))
    where = f"{record.peaks.phase} phase, step {record.peaks.step}"
    rows = [[c, comp, fmt(steady[(c, comp)], unit, digits) if (c, comp) in steady else "",
             fmt(peak.get((c, comp), 0), unit, digits)] for c, comp in keys]
    rows.append(["total at peak", "", "", fmt(sum(peak.values()), unit, digits)])
    return _table(["Category", "Component", f"After last step ({unit})", f"At the peak, {where} ({unit})"], rows,
                  [False, False, True, True])


def parameter_table(record: RunRecord, *, unit: str = "MiB", top: int = 20, digits: int = 3) -> list[str]:
    """The parameters with the most optimizer state, split by role."""
    roles = order_roles(k for p in record.parameters for k in p.by_role)
    rows = [[p.name, "×".join(map(str, p.shape)), fmt(p.param_bytes, unit, digits), fmt(p.state_bytes, unit, digits),
             *(fmt(p.by_role.get(r, 0), unit, digits) for r in roles)] for p in record.parameters[:top]]
    header = ["Parameter", "Shape", f"Param ({unit})", f"State ({unit})", *(f"{r} ({unit})" for r in roles)]
    return _table(header, rows, [False, False, True, True, *([True] * len(roles))])


def to_markdown(records: Sequence[RunRecord], *, unit: str = "MiB", detail: bool = False, top: int = 20) -> str:
    """The summary table; with ``detail`` also each record's breakdown and its top parameters."""
    lines = provenance_comment(records)
    lines += ["", f"Memory per optimizer ({unit}; 1 {unit} = {scale(unit):,} bytes).", ""]
    lines += summary_table(records, unit=unit)
    if detail:
        for record in records:
            title = f"{record.settings.spec} on {record.settings.model}"
            lines += ["", f"### {escape(title)}: bytes by category", ""]
            lines += breakdown_table(record, unit=unit)
            if record.parameters:
                lines += ["", f"### {escape(title)}: top {min(top, len(record.parameters))} parameters by optimizer state", ""]
                lines += parameter_table(record, unit=unit, top=top)
    return "\n".join(lines) + "\n"
