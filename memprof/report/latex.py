"""LaTeX tables of run records: booktabs, ready to paste, provenance in ``%`` comments.

Needs ``\\usepackage{booktabs}`` in the preamble; nothing else.
"""

from __future__ import annotations

from typing import Sequence

from memprof.record import RunRecord
from memprof.report.export import state_components, summary_rows
from memprof.runfile import provenance, reproduce_commands
from memprof.units import fmt, scale

_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}
UNIT_TEX = {"B": "B", "KiB": "KiB", "MiB": "MiB", "GiB": "GiB", "KB": "kB", "MB": "MB", "GB": "GB"}


def escape(text: str) -> str:
    """Escape LaTeX's special characters so any name typesets literally."""
    return "".join(_ESCAPES.get(ch, ch) for ch in str(text).replace("\n", " "))


def provenance_comment(records: Sequence[RunRecord]) -> list[str]:
    lines = ["% memprof run; reproduce with:"]
    lines += [f"%   {command}" for command in reproduce_commands(records)]
    lines += [f"% {key}: {value}".replace("\n", " ") for key, value in provenance(records).items()]
    return lines + ["% Needs \\usepackage{booktabs}."]


def _caption(records: Sequence[RunRecord], what: str, unit: str) -> str:
    s = records[0].settings
    models = ", ".join(dict.fromkeys(r.settings.model for r in records))
    shape = f"batch {s.batch_size}" + (f", sequence length {s.seq_len}" if s.seq_len else "")
    amp = f", {s.amp} autocast" if s.amp else ""
    return escape(f"{what} on {models} ({shape}, {s.dtype}{amp}, {s.device}, {s.steps} steps). "
                  f"Values in {UNIT_TEX[unit]} (1 {UNIT_TEX[unit]} = {scale(unit):,} bytes).")


def summary_table(records: Sequence[RunRecord], *, unit: str = "MiB", digits: int = 2,
                  label: str = "tab:memprof") -> list[str]:
    """One row per optimizer; a grouped header puts the optimizer-state components under one rule."""
    scale(unit)
    components = state_components(records)
    several_models = len({r.settings.model for r in records}) > 1
    cpu = all(not r.settings.device.startswith("cuda") for r in records)
    lead = 2 if several_models else 1
    keys = ["weights", "gradients", "state", *(f"state:{c}" for c in components), "activations", "step_transient", "peak"]
    numeric = len(keys)
    first_state = lead + 3  # 1-based column of the state total
    last_state = first_state + len(components)
    names = ["Weights", "Gradients", "Total", *(escape(c) for c in components), "Activations", "Step transient",
             "Peak (sim.)" if cpu else "Peak"]
    lines = [
        r"\begin{table}[ht]",
        r"  \centering",
        rf"  \caption{{{_caption(records, 'Training-step memory per optimizer', unit)}}}",
        rf"  \label{{{label}}}",
        rf"  \begin{{tabular}}{{{'l' * lead}{'r' * numeric}}}",
        r"    \toprule",
        rf"    {' & ' * lead}\multicolumn{{{numeric}}}{{c}}{{Memory ({UNIT_TEX[unit]})}} \\",
        rf"    \cmidrule(lr){{{lead + 1}-{lead + numeric}}}",
        "    " + " & " * (first_state - 1) + rf"\multicolumn{{{len(components) + 1}}}{{c}}{{Optimizer state}}"
        + " & " * (lead + numeric - last_state) + r" \\",
        rf"    \cmidrule(lr){{{first_state}-{last_state}}}",
        "    " + " & ".join(["Optimizer", *(["Model"] if several_models else []), *names]) + r" \\",
        r"    \midrule",
    ]
    for row in summary_rows(records):
        cells = [escape(row["label"]), *([escape(row["model"])] if several_models else [])]
        if row["failure"]:
            cells.append(rf"\multicolumn{{{numeric}}}{{l}}{{{escape(row['failure'])}}}")
        else:
            cells += [fmt(row[k], unit, digits) for k in keys]
        lines.append("    " + " & ".join(cells) + r" \\")
    lines += [r"    \bottomrule", r"  \end{tabular}", r"\end{table}"]
    return lines


def breakdown_table(record: RunRecord, *, unit: str = "MiB", digits: int = 2, label: str = "tab:memprof-breakdown") -> list[str]:
    """Every category and component of one record: after the last step and at the global peak."""
    steady: dict[tuple[str, str], int] = {}
    peak: dict[tuple[str, str], int] = {}
    for target, rows in ((steady, record.breakdown), (peak, record.peak)):
        for r in rows:
            target[(r.category, r.component)] = target.get((r.category, r.component), 0) + r.bytes
    where = f"{record.peaks.phase} phase, step {record.peaks.step}"
    lines = [
        r"\begin{table}[ht]",
        r"  \centering",
        rf"  \caption{{{_caption([record], f'Bytes by category for {record.settings.spec}', unit)}}}",
        rf"  \label{{{label}}}",
        r"  \begin{tabular}{llrr}",
        r"    \toprule",
        rf"    Category & Component & After last step & At the peak ({escape(where)}) \\",
        r"    \midrule",
    ]
    for key in dict.fromkeys([*steady, *peak]):
        after = fmt(steady[key], unit, digits) if key in steady else ""
        lines.append(f"    {escape(key[0])} & {escape(key[1])} & {after} & {fmt(peak.get(key, 0), unit, digits)} " + r"\\")
    lines += [r"    \midrule", rf"    Total at the peak & & & {fmt(sum(peak.values()), unit, digits)} \\",
              r"    \bottomrule", r"  \end{tabular}", r"\end{table}"]
    return lines


def to_latex(records: Sequence[RunRecord], *, unit: str = "MiB", detail: bool = False) -> str:
    """The summary table; with ``detail`` also one breakdown table per record."""
    lines = [*provenance_comment(records), *summary_table(records, unit=unit)]
    if detail:
        for i, record in enumerate(records):
            lines += ["", *breakdown_table(record, unit=unit, label=f"tab:memprof-breakdown-{i + 1}")]
    return "\n".join(lines) + "\n"
