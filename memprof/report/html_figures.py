"""The figures of the HTML report, as plotly.js figures (plain ``{"data", "layout"}`` dicts: no plotly import).

Colours and patterns are the static figures' (``memprof.report.plot``): one per category and per
optimizer-state role. Values are drawn in the report's unit; every hover also gives the exact bytes.
"""

from __future__ import annotations

from typing import Any, Sequence

from memprof.record import RunRecord
from memprof.report.plot import LEGEND_ORDER, OKABE_ITO, PHASE_SHORT, _label, _segments, segment_style
from memprof.report.trace import record_label
from memprof.taxonomy import CATEGORIES
from memprof.units import scale

Figure = dict[str, Any]
TIMELINE_POINTS = 1200
"""Samples drawn per timeline (each keeps its bucket's highest total, so the peak survives)."""
PATTERNS = {"ooo": ".", "///": "/", "|||": "|", "xxx": "x", "...": ".", "\\\\\\": "\\", "---": "-", "+++": "+"}
"""matplotlib hatches → plotly's bar patterns."""
FONT = {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12}


def _in(nbytes: int | float, unit: str) -> float:
    return round(nbytes / scale(unit), 4)


def _layout(**changes: Any) -> dict[str, Any]:
    return {"font": FONT, "margin": {"l": 60, "r": 20, "t": 40, "b": 40}, "plot_bgcolor": "white",
            "legend": {"traceorder": "normal"}, **changes}


def breakdown(records: Sequence[RunRecord], unit: str) -> Figure:
    """Stacked bars per record: what persists after the last step, and the composition at the global peak,
    by category and optimizer-state role."""
    labels = [record_label(r) for r in records]
    data: list[dict[str, Any]] = []
    shown: set[str] = set()
    for panel, at_peak in ((1, False), (2, True)):
        stacks: dict[str, dict[str, Any]] = {}
        for x, record in zip(labels, records):
            if record.status != "ok":
                continue
            for category, component, nbytes in _segments(record, at_peak=at_peak):
                name = _label(category, component)
                color, hatch = segment_style(category, component)
                trace = stacks.setdefault(name, {
                    "type": "bar", "name": name, "legendgroup": name, "showlegend": name not in shown,
                    "x": [], "y": [], "customdata": [], "xaxis": f"x{panel}", "yaxis": "y",
                    "marker": {"color": color, "line": {"color": "white", "width": 0.5},
                               "pattern": {"shape": PATTERNS.get(hatch, "")}},
                    "hovertemplate": f"%{{x}}<br>{name}: %{{y:.3f}} {unit} (%{{customdata:,}} B)<extra></extra>"})
                trace["x"].append(x)
                trace["y"].append(_in(nbytes, unit))
                trace["customdata"].append(nbytes)
        order = {name: i for i, name in enumerate(LEGEND_ORDER)}
        for name in sorted(stacks, key=lambda n: order.get(n, len(order))):
            data.append(stacks[name])
            shown.add(name)
    failed = [{"x": label, "y": 0, "xref": "x2", "yref": "y", "text": f"{r.failure or r.status}", "showarrow": False,
               "textangle": -90, "yanchor": "bottom", "font": {"color": OKABE_ITO["vermillion"]}}
              for label, r in zip(labels, records) if r.status != "ok"]
    titles = [{"text": text, "x": x, "y": 1.0, "xref": "paper", "yref": "paper", "showarrow": False,
               "yanchor": "bottom", "font": {"size": 13}}
              for text, x in (("After the last step (persistent)", 0.22), ("At the global peak", 0.78))]
    return {"data": data, "layout": _layout(
        barmode="stack", height=460, annotations=titles + failed,
        xaxis={"domain": [0, 0.46], "categoryorder": "array", "categoryarray": labels},
        xaxis2={"domain": [0.54, 1], "categoryorder": "array", "categoryarray": labels},
        yaxis={"title": {"text": f"memory ({unit})"}, "gridcolor": "#eee", "rangemode": "tozero"})}


def peak_composition(records: Sequence[RunRecord], unit: str) -> Figure:
    """One sunburst per record: category, then component, of the bytes live at the global peak."""
    shown = [r for r in records if r.status == "ok" and r.peak]
    columns = min(3, len(shown)) or 1
    rows = -(-len(shown) // columns) or 1
    data, titles = [], []
    for i, record in enumerate(shown):
        row, column = divmod(i, columns)
        x = [column / columns + 0.01, (column + 1) / columns - 0.01]
        y = [1 - (row + 1) / rows + 0.02, 1 - row / rows - 0.08]
        totals: dict[str, int] = {}
        for r in record.peak:
            totals[r.category] = totals.get(r.category, 0) + r.bytes
        ids, labels, parents, values, colors = [], [], [], [], []
        for category in (c for c in CATEGORIES if totals.get(c)):
            ids.append(category)
            labels.append(_label(category, None))
            parents.append("")
            values.append(totals[category])
            colors.append(segment_style(category)[0])
            for r in (r for r in record.peak if r.category == category and r.bytes):
                ids.append(f"{category}/{r.component}")
                labels.append(r.component)
                parents.append(category)
                values.append(r.bytes)
                colors.append(segment_style(category, r.component if category == "optimizer_state" else None)[0])
        data.append({"type": "sunburst", "ids": ids, "labels": labels, "parents": parents, "values": values,
                     "branchvalues": "total", "marker": {"colors": colors}, "domain": {"x": x, "y": y},
                     "customdata": [_in(v, unit) for v in values], "sort": False,
                     "hovertemplate": f"%{{label}}: %{{customdata:.3f}} {unit} (%{{value:,}} B, "
                                      "%{percentRoot:.1%} of the peak)<extra></extra>"})
        peaks = record.peaks
        titles.append({"text": f"<b>{record_label(record)}</b>: {_in(peaks.allocated or 0, unit):.3f} {unit} "
                               f"in {peaks.phase} (step {peaks.step})",
                       "x": sum(x) / 2, "y": y[1] + 0.01, "xref": "paper", "yref": "paper", "showarrow": False,
                       "yanchor": "bottom", "xanchor": "center"})
    return {"data": data, "layout": _layout(height=340 * rows, annotations=titles,
                                            margin={"l": 10, "r": 10, "t": 30, "b": 10})}


def timeline(record: RunRecord, unit: str) -> Figure:
    """Live bytes by category over the measured steps (stacked), the total with exact bytes, the phases
    marked and the global peak pointed at."""
    tl = record.timeline
    cuda = record.settings.device.startswith("cuda") and not record.settings.estimate
    per_x = 1000.0 if cuda else 1.0  # CUDA: host microseconds, shown in ms; else allocator ticks
    marks = sorted(tl.marks, key=lambda m: m["time"])
    first_step = next((m["time"] for m in marks if m["phase"] == "forward"), tl.time[0])
    kept = _kept(tl.time, tl.total, first_step)
    x = [round(max(tl.time[i], first_step) / per_x, 3) for i in kept]
    data = []
    for category in (c for c in CATEGORIES if any(tl.categories.get(c, ()))):
        values = tl.categories[category]
        data.append({"type": "scatter", "mode": "lines", "stackgroup": "live", "name": _label(category, None),
                     "x": x, "y": [_in(values[i], unit) for i in kept], "line": {"width": 0, "shape": "hv"},
                     "fillcolor": segment_style(category)[0],
                     "hovertemplate": f"%{{y:.3f}} {unit}"})
    totals = [tl.total[i] for i in kept]
    data.append({"type": "scatter", "mode": "lines", "name": "total", "x": x, "y": [_in(t, unit) for t in totals],
                 "customdata": totals, "line": {"color": "black", "width": 1, "shape": "hv"},
                 "hovertemplate": f"%{{y:.3f}} {unit} (%{{customdata:,}} B)"})
    top = max(range(len(totals)), key=totals.__getitem__)
    peaks = record.peaks
    late = x[-1] > x[0] and (x[top] - x[0]) / (x[-1] - x[0]) > 0.75  # point back into the panel
    annotations = [{"x": x[top], "y": _in(totals[top], unit), "text": f"peak {_in(peaks.allocated or 0, unit):.3f} "
                    f"{unit}<br>{peaks.phase}, step {peaks.step}", "showarrow": True, "arrowhead": 2,
                    "ax": -70 if late else 40, "ay": -30, "bgcolor": "white", "bordercolor": "#888"}]
    shapes = []
    steps = [m for m in marks if m["phase"] in PHASE_SHORT or m["phase"] == "end"]
    for mark, following in zip(steps, steps[1:]):
        start = round(mark["time"] / per_x, 3)
        shapes.append({"type": "line", "x0": start, "x1": start, "y0": 0, "y1": 1, "yref": "paper",
                       "line": {"color": "black", "width": 1.2 if mark["phase"] == "forward" else 0.6,
                                "dash": "solid" if mark["phase"] == "forward" else "dot"}})
        annotations.append({"x": (start + following["time"] / per_x) / 2, "y": 1.0, "yref": "paper",
                            "yanchor": "bottom", "showarrow": False, "font": {"size": 10},
                            "text": f"{PHASE_SHORT[mark['phase']]} {mark['step']}"})
    axis = "time (ms)" if cuda else "allocator clock (one tick per allocation or free)"
    return {"data": data, "layout": _layout(
        height=360, hovermode="x unified", shapes=shapes, annotations=annotations,
        title={"text": record_label(record), "x": 0, "xanchor": "left", "y": 0.99, "font": {"size": 13}},
        margin={"l": 60, "r": 20, "t": 50, "b": 40},
        xaxis={"title": {"text": axis}, "range": [x[0], x[-1]]},
        yaxis={"title": {"text": f"allocated ({unit})"}, "gridcolor": "#eee", "rangemode": "tozero"})}


def _kept(times: list[float], totals: list[int], start: float) -> list[int]:
    """Indices of at most ``TIMELINE_POINTS`` samples from the last one before ``start`` on, each the highest
    total of its bucket."""
    first = max([i for i, t in enumerate(times) if t <= start] or [0])
    indices = range(first, len(times))
    bucket = max(1, -(-len(indices) // TIMELINE_POINTS))
    return [max(indices[i:i + bucket], key=totals.__getitem__) for i in range(0, len(indices), bucket)]


def ranks(records: Sequence[RunRecord], unit: str) -> Figure:
    """Per optimizer, each rank's peak and optimizer state, side by side."""
    data = []
    colors = list(OKABE_ITO.values())[1:]
    specs = list(dict.fromkeys(r.settings.spec for r in records))
    for i, spec in enumerate(specs):
        ok = sorted((r for r in records if r.settings.spec == spec and r.status == "ok"), key=lambda r: r.settings.rank)
        for measure, opacity, pick in (("peak", 1.0, lambda r: r.peaks.allocated or 0),
                                       ("state", 0.55, lambda r: r.total("optimizer_state"))):
            values = [pick(r) for r in ok]
            data.append({"type": "bar", "name": f"{spec}: {measure}", "x": [f"rank {r.settings.rank}" for r in ok],
                         "y": [_in(v, unit) for v in values], "customdata": values, "opacity": opacity,
                         "marker": {"color": colors[i % len(colors)]}, "offsetgroup": f"{spec}/{measure}",
                         "hovertemplate": f"%{{x}}: {measure} %{{y:.3f}} {unit} (%{{customdata:,}} B)<extra>{spec}"
                                          "</extra>"})
    return {"data": data, "layout": _layout(barmode="group", height=380,
                                            yaxis={"title": {"text": unit}, "gridcolor": "#eee"})}


def fit(fits: Sequence[Any], unit: str) -> Figure:
    """What each optimizer's run needs against the searched setting, the budget line, the largest value that
    fits ringed."""
    colors = list(OKABE_ITO.values())[1:]
    data = []
    setting = fits[0].setting.replace("_", " ")
    for i, result in enumerate(fits):
        points = sorted((v, n) for v, n in result.probes if n is not None)
        color = colors[i % len(colors)]
        data.append({"type": "scatter", "mode": "lines+markers", "name": f"{result.spec}: largest {result.value}",
                     "x": [v for v, _ in points], "y": [_in(n, unit) for _, n in points],
                     "customdata": [n for _, n in points], "line": {"color": color}, "marker": {"color": color},
                     "hovertemplate": f"{setting} %{{x}}: needs %{{y:.3f}} {unit} (%{{customdata:,}} B)"
                                      f"<extra>{result.spec}</extra>"})
        if result.value:
            used = dict(points)[result.value]
            data.append({"type": "scatter", "mode": "markers", "showlegend": False, "x": [result.value],
                         "y": [_in(used, unit)], "hoverinfo": "skip",
                         "marker": {"size": 16, "color": "rgba(0,0,0,0)", "line": {"color": color, "width": 2}}})
    budget = fits[0].budget
    return {"data": data, "layout": _layout(
        height=420, shapes=[{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": _in(budget, unit),
                             "y1": _in(budget, unit), "line": {"color": "black", "dash": "dash", "width": 1}}],
        annotations=[{"xref": "paper", "x": 0, "xanchor": "left", "y": _in(budget, unit), "yanchor": "bottom",
                      "showarrow": False, "text": f"budget {_in(budget, unit):.2f} {unit} ({budget:,} B)"}],
        xaxis={"title": {"text": setting}, "type": "log", "dtick": 0.30102999566398120},
        yaxis={"title": {"text": f"needs ({unit})"}, "gridcolor": "#eee", "rangemode": "tozero"})}
