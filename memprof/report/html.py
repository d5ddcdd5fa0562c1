"""The interactive report: one self-contained HTML file that works offline. Measures nothing.

plotly.js draws the figures: it is well kept, draws stacked bars, areas and sunbursts with hover, zoom and
legend toggles, and is one JavaScript file that can be inlined, so the page needs no server and no network.
Its 4.8 MB are inlined gzipped (1.5 MB, base64) and unpacked by the browser (``DecompressionStream``), so
that a report of six optimizers stays well under 5 MB. The tables are plain HTML, sorted and filtered by a
few lines of inline JavaScript (``assets/report.js``), and complete without it.

The page shows: a summary per record; the breakdown (after the last step, and at the global peak) by
category and optimizer-state role; the composition at the global peak; the timeline of each record with its
phases; every rank and the imbalance of a distributed run; the fit curve of ``memprof estimate --fit``; the
per-parameter table with each state tensor's role; and how each figure was obtained (measured, estimated,
assumed), the settings, the environment and the commands that reproduce it.
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
from html import escape
from importlib import resources
from typing import Any, Sequence

from memprof.errors import UsageError
from memprof.record import RunRecord
from memprof.report import html_figures as figures
from memprof.report.export import summary_rows
from memprof.report.plot import _title
from memprof.report.trace import record_label
from memprof.runfile import joined, provenance, reproduce_commands
from memprof.units import fmt, scale

SECTIONS = {"summary": "Summary", "breakdown": "Breakdown", "peak": "At the peak", "timeline": "Timeline",
            "ranks": "Ranks", "fit": "Fit", "parameters": "Parameters", "provenance": "How it was obtained"}
SUMMARY_COLUMNS = (("weights", "weights"), ("gradients", "gradients"), ("state", "optimizer state"),
                   ("activations", "activations"), ("step_transient", "step transient"), ("peak", "peak"),
                   ("reserved", "reserved"), ("needs", "needs"))


def to_html(records: Sequence[RunRecord], *, unit: str = "MiB", fits: Sequence[Any] = ()) -> str:
    """The report of ``records`` (and of the fit search ``fits``, when given) as one HTML page."""
    if not records:
        raise UsageError("no records to report")
    drawn: dict[str, dict[str, Any]] = {}
    body = [_summary(records, unit), _breakdown(records, unit, drawn), _peak(records, unit, drawn),
            _timelines(records, unit, drawn), _ranks(records, unit, drawn), _fit(fits, unit, drawn),
            _parameters(records, unit), _provenance(records)]
    shown = [part for part in body if part]
    nav = "".join(f'<a href="#{key}">{escape(name)}</a>' for key, name in SECTIONS.items()
                  if any(f'id="{key}"' in part for part in shown))
    title = _title(records)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>memprof · {escape(title)}</title>", f"<style>{_asset('report.css')}</style>", "</head>", "<body>",
        f"<header><h1>memprof · {escape(title)}</h1><p>{escape(_subtitle(records, unit))}</p><nav>{nav}</nav>"
        "</header>", '<div id="load-error"></div>', "<main>", *shown, "</main>",
        f"<footer>memprof {escape(joined(r.environment.get('memprof') for r in records))} · figures drawn by "
        f"plotly.js {escape(_plotly_version())}, inlined: this file needs no network.</footer>",
        f'<script type="application/json" id="memprof-figures">{_json(drawn)}</script>',
        f'<script type="application/octet-stream" id="plotly-gzip">{_plotly_gzip()}</script>',
        f"<script>{_asset('report.js')}</script>", "</body>", "</html>", ""])


def _subtitle(records: Sequence[RunRecord], unit: str) -> str:
    kinds = sorted({"estimated" if r.settings.estimate else f"measured on {r.settings.device}" for r in records})
    return (f"{len(records)} record(s), {', '.join(kinds)} · sizes in {unit} ({scale(unit):,} B); hover a figure "
            "for exact bytes")


def _section(key: str, why: str, *content: str) -> str:
    return f'<section id="{key}"><h2>{escape(SECTIONS[key])}</h2><p class="why">{why}</p>{"".join(content)}</section>'


def _plot(drawn: dict[str, dict[str, Any]], key: str, figure: dict[str, Any]) -> str:
    drawn[key] = figure
    return f'<div class="plot" id="{key}"></div>'


def _summary(records: Sequence[RunRecord], unit: str) -> str:
    head = "".join(f'<th class="n">{escape(name)} ({unit})</th>' for _, name in SUMMARY_COLUMNS)
    rows = []
    for record, row in zip(records, summary_rows(records)):
        label = escape(record_label(record))
        if row["failure"]:
            rows.append(f'<tr class="failed"><td>{label}</td><td colspan="{len(SUMMARY_COLUMNS) + 1}">'
                        f"{escape(row['failure'])}</td></tr>")
            continue
        cells = "".join(_number(row[key], unit) for key, _ in SUMMARY_COLUMNS)
        where = f"{record.peaks.phase}, step {record.peaks.step}"
        rows.append(f"<tr><td>{label}</td>{cells}<td>{escape(where)}</td></tr>")
    table = (f'<table class="sortable"><thead><tr><th data-sort="text">record</th>{head}<th>peak in</th></tr>'
             f"</thead><tbody>{''.join(rows)}</tbody></table>")
    return _section("summary", "What each record holds after its last step, and the most it held at once.", table)


def _number(nbytes: int | None, unit: str) -> str:
    if nbytes is None:
        return '<td class="n" data-v="-1">n/a</td>'
    return f'<td class="n" data-v="{nbytes}" title="{nbytes:,} B">{fmt(nbytes, unit, 2)}</td>'


def _breakdown(records: Sequence[RunRecord], unit: str, drawn: dict) -> str:
    why = ("Stacked per record: what persists from step to step (weights, gradients, each role of the optimizer "
           "state, inputs), and everything live at the global peak. Click a legend entry to hide it.")
    return _section("breakdown", why, _plot(drawn, "plot-breakdown", figures.breakdown(records, unit)))


def _peak(records: Sequence[RunRecord], unit: str, drawn: dict) -> str:
    if not any(r.status == "ok" and r.peak for r in records):
        return ""
    why = "Each record's global peak, by category and then component; click a category to open it."
    return _section("peak", why, _plot(drawn, "plot-peak", figures.peak_composition(records, unit)))


def _timelines(records: Sequence[RunRecord], unit: str, drawn: dict) -> str:
    parts, missing = [], []
    for i, record in enumerate(records):
        if record.timeline.time:
            parts.append(_plot(drawn, f"plot-timeline-{i}", figures.timeline(record, unit)))
        else:
            why = record.failure or next((n for n in record.notes if "no timeline" in n), "the record has no timeline")
            missing.append(f"<li>{escape(record_label(record))}: {escape(why)}</li>")
    why = ("Live bytes by category over the measured steps, stacked; solid lines start a step, dotted lines "
           "its backward and optimizer step. Drag to zoom, double-click to reset.")
    absent = f"<p>No timeline for:</p><ul>{''.join(missing)}</ul>" if missing else ""
    return _section("timeline", why, *parts, absent)


def _ranks(records: Sequence[RunRecord], unit: str, drawn: dict) -> str:
    distributed = [r for r in records if r.settings.nproc > 1]
    if not distributed:
        return ""
    rows, notes = [], []
    for spec in dict.fromkeys(r.settings.spec for r in distributed):
        ok = [r for r in distributed if r.settings.spec == spec and r.status == "ok"]
        world = distributed[0].settings.nproc
        ranks = sorted(r.settings.rank for r in ok)
        if len(ok) < 2:
            notes.append(f"{spec}: rank(s) {', '.join(map(str, ranks)) or 'none'} of {world} measured; the imbalance "
                         "needs two or more (memprof estimate --all-ranks simulates every rank)")
            continue
        cells = []
        for pick in (lambda r: r.peaks.allocated or 0, lambda r: r.total("optimizer_state")):
            values = [pick(r) for r in ok]
            mean = sum(values) / len(values)
            cells.append(f"<td>{fmt(min(values), unit, 2)} – {fmt(max(values), unit, 2)}</td>"
                         f'<td class="n">{(max(values) / mean - 1 if mean else 0):+.1%}</td>')
        rows.append(f"<tr><td>{escape(spec)}</td><td>{len(ok)} of {world}</td>{''.join(cells)}</tr>")
    table = (f"<table><thead><tr><th>optimizer</th><th>ranks</th><th>peak ({unit})</th><th>peak imbalance</th>"
             f"<th>state ({unit})</th><th>state imbalance</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
             if rows else "")
    listed = f"<ul>{''.join(f'<li>{escape(n)}</li>' for n in notes)}</ul>" if notes else ""
    why = "Each rank's peak and optimizer state; imbalance = max/mean − 1 across ranks."
    return _section("ranks", why, _plot(drawn, "plot-ranks", figures.ranks(distributed, unit)), table, listed)


def _fit(fits: Sequence[Any], unit: str, drawn: dict) -> str:
    if not fits:
        return ""
    setting = fits[0].setting.replace("_", " ")
    rows = "".join(
        f'<tr><td>{escape(f.spec)}</td><td class="n">{f.value}</td>'
        f"{_number(dict(f.probes).get(f.value) if f.value else None, unit)}<td>{escape(f.failure or '')}</td></tr>"
        for f in fits)
    table = (f"<table><thead><tr><th>optimizer</th><th>largest {escape(setting)}</th><th>needs ({unit})</th>"
             f"<th>failure</th></tr></thead><tbody>{rows}</tbody></table>")
    why = (f"What each optimizer's run needs (its peak plus the context outside the allocator) at each {setting} "
           f"tried, against the budget of {fmt(fits[0].budget, unit, 2)} {unit}; the largest {setting} that fits is "
           "ringed.")
    return _section("fit", why, _plot(drawn, "plot-fit", figures.fit(fits, unit)), table)


def _parameters(records: Sequence[RunRecord], unit: str) -> str:
    rows = []
    for i, record in enumerate(records):
        label = escape(record_label(record))
        for p in record.parameters:
            tensors = "<br>".join(f"{escape(path)} · {escape(p.roles.get(path, _role(p)))} · {_size(n)}"
                                  for path, n in sorted(p.by_key.items(), key=lambda kv: -kv[1]))
            ratio = p.state_bytes / p.param_bytes if p.param_bytes else 0
            rows.append(f'<tr data-record="{i}"><td>{label}</td><td>{escape(p.name)}</td>'
                        f"<td>{'×'.join(map(str, p.shape))}</td><td>{escape(p.dtype)}</td>"
                        f"{_number(p.param_bytes, unit)}{_number(p.state_bytes, unit)}"
                        f'<td class="n" data-v="{ratio:.6g}">{ratio:.3f}</td><td>{tensors}</td>'
                        f"<td>{'yes' if p.unfactored else ''}</td></tr>")
    if not rows:
        return ""
    options = "".join(f'<option value="{i}">{escape(record_label(r))}</option>' for i, r in enumerate(records)
                      if r.parameters)
    controls = ('<div class="controls"><input id="parameter-filter" type="search" placeholder="filter: words in any '
                'column (e.g. attn moment)"><select id="parameter-choice"><option value="">every record</option>'
                f'{options}</select><span id="parameter-count" class="muted"></span></div>')
    head = "".join(f'<th data-sort="{kind}"{" class=n" if kind == "number" else ""}>{escape(name)}</th>'
                   for name, kind in (("record", "text"), ("parameter", "text"), ("shape", "text"),
                                      ("dtype", "text"), (f"parameter ({unit})", "number"),
                                      (f"state ({unit})", "number"), ("state / parameter", "number"),
                                      ("state tensors · role · size", "text"), ("unfactored", "text")))
    table = (f'<div class="scroll"><table class="sortable" data-filter="parameter-filter" '
             f'data-choice="parameter-choice" data-count="parameter-count"><thead><tr>{head}</tr></thead>'
             f"<tbody>{''.join(rows)}</tbody></table></div>")
    why = ("Optimizer state charged to each parameter (on a rank: its shard), largest first; each state tensor with "
           "its role. Click a column to sort; type to filter. \"unfactored\": a full-size moment kept where the "
           "optimizer factors the others.")
    return _section("parameters", why, controls, table)


def _size(nbytes: int) -> str:
    """Bytes in the largest binary unit that keeps them at 1 or more: 4 B, 61.5 KiB, 2.25 MiB."""
    unit = next((u for u in ("GiB", "MiB", "KiB") if nbytes >= scale(u)), "B")
    return f"{nbytes:,} B" if unit == "B" else f"{fmt(nbytes, unit, 2)} {unit}"


def _role(p) -> str:
    """A state tensor's role where the record does not name it (files written before it did): the parameter's
    only role, if it has one."""
    return next(iter(p.by_role)) if len(p.by_role) == 1 else "role not recorded"


def _provenance(records: Sequence[RunRecord]) -> str:
    obtained: dict[tuple[str, str, str, str], list[str]] = {}  # (category, component, kind, how) -> records
    for record in records:
        for row in record.breakdown:
            obtained.setdefault((row.category, row.component, *_obtained(record, row.basis)), []).append(
                record_label(record))
    everyone = [record_label(r) for r in records if r.breakdown]
    kinds = "".join(f'<tr><td>{escape(category)}</td><td>{escape(component)}</td><td class="kind-{kind}">{kind}</td>'
                    f"<td>{escape(how)}</td><td>{'every record' if labels == everyone else escape(', '.join(labels))}"
                    "</td></tr>" for (category, component, kind, how), labels in obtained.items())
    how_table = ("<h3>Measured, estimated or assumed</h3><table><thead><tr><th>category</th><th>component</th>"
                 f"<th>figure is</th><th>how</th><th>records</th></tr></thead><tbody>{kinds}</tbody></table>")
    notes = dict.fromkeys(f"{record_label(r)}: {note}" for r in records for note in r.notes)
    for r in records:
        for part in (r.environment.get("estimate") or "").split("; "):
            if part:
                notes[f"{record_label(r)}: estimate: {part}"] = None
    listed = f"<h3>Notes</h3><ul>{''.join(f'<li>{escape(n)}</li>' for n in notes)}</ul>" if notes else ""
    settings = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in provenance(records).items())
    commands = "\n".join(reproduce_commands(records))
    ran = "\n".join(dict.fromkeys(r.environment.get("command", "") for r in records if r.environment.get("command")))
    return _section("provenance", "Every figure with how it was obtained, then the settings, the environment and the "
                    "command that measures it again.", how_table, listed,
                    f"<h3>Settings and environment</h3><table>{settings}</table>",
                    f"<h3>Reproduce</h3><pre>{escape(commands)}</pre>",
                    f"<h3>Command that wrote this report's records</h3><pre>{escape(ran)}</pre>" if ran else "")


def _obtained(record: RunRecord, basis: str) -> tuple[str, str]:
    """(measured | estimated | assumed, how) of one breakdown row."""
    if basis == "gpu table":
        return "assumed", "the GPU table's CUDA context for the --gpu (memprof.gpus; see the notes for its source)"
    if basis == "assumed":
        return "assumed", "NCCL's defaults for the run's GPU and world size (memprof.nccl; see the notes)"
    if record.settings.estimate:
        return "estimated", {"tensor": "exact sizes of the fake tensors the run made (nothing allocated)",
                             "allocator": "a replay of the fake tensors' allocations and frees"}.get(basis, basis)
    cuda = record.settings.device.startswith("cuda")
    return "measured", {"tensor": "the storage bytes of the live tensors",
                        "allocator": "the CUDA caching allocator's history, replayed" if cuda else
                                     "the allocations and frees of the CPU tensors, replayed (no caching allocator)",
                        "nvml": "NVML, the driver's view"}.get(basis, basis)


@functools.cache
def _asset(name: str) -> str:
    return resources.files("memprof.report").joinpath("assets", name).read_text(encoding="utf-8")


def _plotly_file():
    try:
        return resources.files("plotly").joinpath("package_data", "plotly.min.js")
    except ModuleNotFoundError:
        raise UsageError("--html needs plotly: pip install 'memprof-optim[html]'") from None


@functools.cache
def _plotly_gzip() -> str:
    """plotly.js, gzipped (reproducibly: no timestamp) and base64-encoded."""
    return base64.b64encode(gzip.compress(_plotly_file().read_bytes(), compresslevel=9, mtime=0)).decode("ascii")


def _plotly_version() -> str:
    head = _plotly_file().open("rb").read(200).decode("ascii", "replace")
    return head.split("plotly.js v", 1)[1].split()[0] if "plotly.js v" in head else "(version unknown)"


def _json(data: Any) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")

