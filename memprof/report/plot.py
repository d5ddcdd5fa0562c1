"""Figures of run records: where the bytes go, when, and for which parameters.

Built on ``matplotlib.figure.Figure`` (never pyplot, so nothing is ever shown and no global
state is touched) and saved through the Agg, PDF or SVG canvas the file's extension picks.
One colour per category, and per optimizer-state component, in every figure: the Okabe-Ito
palette (safe for the common colour-vision deficiencies), with hatches telling the state
components apart in grey-scale print too.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from memprof.errors import UsageError
from memprof.files import write_all
from memprof.record import RunRecord
from memprof.taxonomy import CATEGORIES, order_roles
from memprof.units import fmt, scale

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

OKABE_ITO = {
    "black": "#000000", "orange": "#E69F00", "sky blue": "#56B4E9", "bluish green": "#009E73",
    "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "reddish purple": "#CC79A7",
}
CATEGORY_COLORS = {
    "weights": OKABE_ITO["blue"],
    "buffers": OKABE_ITO["sky blue"],
    "gradients": OKABE_ITO["bluish green"],
    "optimizer_state": OKABE_ITO["vermillion"],
    "inputs": OKABE_ITO["yellow"],
    "activations": OKABE_ITO["orange"],
    "temporaries": "#BBBBBB",
    "step_transient": OKABE_ITO["reddish purple"],
    "allocator": "#DDDDDD",
    "context": "#888888",
    "unattributed": "#444444",
}
# Optimizer-state components: vermillion, lighter the less central the role, each with its hatch.
COMPONENT_STYLES = {
    "master": ("#7A2E00", "ooo"),
    "moment": ("#D55E00", ""),
    "factor": ("#E8875A", "///"),
    "preconditioner": ("#8F3E00", "|||"),
    "sign": ("#F2B48F", "xxx"),
    "projection": ("#A34700", "..."),
    "quant": ("#F7D3BC", "\\\\\\"),
    "other": ("#FBE9DD", "---"),
}
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
         "xtick.labelsize": 9, "ytick.labelsize": 9, "hatch.linewidth": 0.6, "svg.fonttype": "none",
         "pdf.fonttype": 42}
FORMATS = ("png", "pdf", "svg")
PHASE_SHORT = {"forward": "fwd", "backward": "bwd", "step": "step"}
PERSISTENT = ("weights", "buffers", "gradients", "optimizer_state", "inputs")
"""What stays allocated between steps: the left panel of the breakdown figure."""


def segment_style(category: str, component: str | None = None) -> tuple[str, str]:
    """(face colour, hatch) of a category, or of an optimizer-state component."""
    if category == "optimizer_state" and component is not None:
        return COMPONENT_STYLES.get(component, ("#F4A582", "+++"))
    return CATEGORY_COLORS.get(category, "#999999"), ""


def _label(category: str, component: str | None) -> str:
    text = category.replace("_", " ")
    return f"state: {component}" if category == "optimizer_state" and component else text


LEGEND_ORDER = [_label(c, comp) for c in CATEGORIES
                for comp in ((None, *COMPONENT_STYLES) if c == "optimizer_state" else (None,))]
"""Legend entries in stacking order, so every figure lists them alike."""


def _value(nbytes: int | float, unit: str) -> str:
    """A byte count in ``unit`` with about three significant digits (0.034, 5.30, 458.0)."""
    value = abs(nbytes) / scale(unit)
    return fmt(nbytes, unit, 1 if value >= 10 else 2 if value >= 1 else 3)


def _model(name: str) -> str:
    """A model for a title: a ``path/to/file.py:function`` loses its folders (the exports keep them)."""
    path, sep, function = name.rpartition(":")
    return f"{Path(path).name}:{function}" if sep and path.endswith(".py") else name


def _title(records: Sequence[RunRecord]) -> str:
    s = records[0].settings
    models = ", ".join(dict.fromkeys(_model(r.settings.model) for r in records))
    shape = f"batch {s.batch_size}" + (f", seq {s.seq_len}" if s.seq_len else "")
    return (f"{models} · {shape} · {s.dtype}{' · amp ' + s.amp if s.amp else ''}{_lora(s)} · {s.device} · "
            f"{s.steps} steps")


def _lora(settings) -> str:
    """The fine-tuning recipe for a title: `` · LoRA r=8,…`` (QLoRA with a quantized base), or nothing."""
    if not settings.lora:
        return ""
    return f" · {'QLoRA' if 'quant=' in settings.lora else 'LoRA'} {settings.lora}"


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _segments(record: RunRecord, *, at_peak: bool) -> list[tuple[str, str | None, int]]:
    """(category, state component or None, bytes), in stacking order, bottom first."""
    rows = record.peak if at_peak else [r for r in record.breakdown if r.basis == "tensor" and r.category in PERSISTENT]
    by_key: dict[tuple[str, str | None], int] = {}
    for r in rows:
        key = (r.category, r.component if r.category == "optimizer_state" else None)
        by_key[key] = by_key.get(key, 0) + r.bytes
    components = order_roles(c for cat, c in by_key if cat == "optimizer_state")
    order = [(c, None) for c in CATEGORIES if c != "optimizer_state"]
    state_at = order.index(("inputs", None))
    order[state_at:state_at] = [("optimizer_state", c) for c in components]
    return [(cat, comp, by_key[(cat, comp)]) for cat, comp in order if by_key.get((cat, comp))]


def plot_breakdown(records: Sequence[RunRecord], *, unit: str = "MiB") -> "Figure":
    """Stacked bars per optimizer: what persists after the last step, and the composition at the peak."""
    with _style():
        div = scale(unit)
        fig = _figure(max(8.0, 3.0 + 1.4 * len(records)), 4.6)
        axes = fig.subplots(1, 2, sharey=True)
        seen: dict[str, tuple[str, str]] = {}
        tallest = 0.0
        cpu = all(not r.settings.device.startswith("cuda") for r in records)
        titles = ("After the last step (persistent)", "At the peak" + (" (simulated, CPU)" if cpu else ""))
        for ax, at_peak, title in zip(axes, (False, True), titles):
            for x, record in enumerate(records):
                if record.status != "ok":
                    ax.text(x, 0, f" {record.failure or record.status}", rotation=90, ha="center", va="bottom",
                            fontsize=8, color=OKABE_ITO["vermillion"])
                    continue
                bottom = 0.0
                for category, component, nbytes in _segments(record, at_peak=at_peak):
                    color, hatch = segment_style(category, component)
                    label = _label(category, component)
                    ax.bar(x, nbytes / div, bottom=bottom, width=0.65, color=color, hatch=hatch,
                           edgecolor="white" if not hatch else "#333333", linewidth=0.5, label=label)
                    seen.setdefault(label, (color, hatch))
                    bottom += nbytes / div
                tallest = max(tallest, bottom)
                phase = record.peaks.phase
                where = f"\n{PHASE_SHORT.get(phase, phase)} {record.peaks.step}" if at_peak else ""
                ax.annotate(f"{_value(bottom * div, unit)}{where}", (x, bottom), xytext=(0, 3),
                            textcoords="offset points", ha="center", va="bottom", fontsize=8)
            ax.set_title(title)
            ax.set_xticks(range(len(records)), [r.settings.spec for r in records],
                          rotation=30 if len(records) > 3 else 0, ha="right" if len(records) > 3 else "center")
            ax.set_xlim(-0.6, len(records) - 0.4)
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
        axes[0].set_ylim(0, tallest * 1.2 or 1)  # shared: room for the two-line peak labels
        axes[0].set_ylabel(f"Memory ({unit})")
        _legend(fig, seen)
        fig.suptitle(_title(records), fontsize=10)
        return fig


def _legend(fig: "Figure", entries: dict[str, tuple[str, str]]) -> None:
    """One legend below the panels, in stacking order (bottom of the stack first)."""
    from matplotlib.patches import Patch

    rank = {label: i for i, label in enumerate(LEGEND_ORDER)}
    ordered = sorted(entries.items(), key=lambda kv: rank.get(kv[0], len(rank)))
    handles = [Patch(facecolor=color, hatch=hatch, edgecolor="#333333" if hatch else color, label=label)
               for label, (color, hatch) in ordered]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), frameon=False)


def plot_timeline(records: Sequence[RunRecord], *, unit: str = "MiB") -> "Figure":
    """Live bytes by category over the measured steps, one panel per optimizer, phases marked,
    the peak annotated with its composition."""
    shown = [r for r in records if r.timeline.time]
    if not shown:
        raise UsageError("no record has a timeline (measure with timeline on, the default)")
    with _style():
        fig = _figure(11.0, 1.0 + 2.8 * len(shown))
        axes = fig.subplots(len(shown), 1, squeeze=False)[:, 0]
        seen: dict[str, tuple[str, str]] = {}
        for ax, record in zip(axes, shown):
            _timeline_panel(ax, record, unit, seen)
        _legend(fig, seen)
        fig.suptitle(_title(shown), fontsize=10)
        return fig


def _timeline_panel(ax: "Axes", record: RunRecord, unit: str, seen: dict[str, tuple[str, str]]) -> None:
    import numpy as np

    timeline, div = record.timeline, scale(unit)
    cuda = record.settings.device.startswith("cuda")
    per_x = 1000.0 if cuda else 1.0  # CUDA clock: microseconds, shown in ms; CPU clock: event ticks
    marks = [m for m in timeline.marks if m["phase"] in ("forward", "backward", "step", "end")]
    times = np.asarray(timeline.time, dtype=float) / per_x
    mark_x = [m["time"] / per_x for m in marks]
    start = mark_x[0] if marks else times[0]
    first = max(int(np.searchsorted(times, start, side="right")) - 1, 0)  # the state as the first step begins
    stop = max(mark_x[-1] if marks else times[-1], times[-1])
    x = np.append(np.maximum(times[first:], start), stop)  # hold the last state until the end mark
    bottom = np.zeros(x.shape)
    for category in CATEGORIES:
        values = timeline.categories.get(category)
        if values is None or not any(values):
            continue
        y = np.asarray(values, dtype=float)[first:] / div
        y = np.append(y, y[-1])
        color, _ = segment_style(category)
        ax.fill_between(x, bottom, bottom + y, step="post", color=color, linewidth=0)
        seen.setdefault(_label(category, None), (color, ""))
        bottom = bottom + y
    ax.step(x, bottom, where="post", color="black", linewidth=0.6)
    _phase_marks(ax, marks, mark_x)
    if record.peaks.allocated and len(bottom):
        _annotate_peak(ax, record, x, bottom, unit)
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(0, bottom.max() * 1.15 if bottom.max() > 0 else 1)
    ax.set_ylabel(f"Allocated ({unit})")
    ax.set_xlabel("time (ms)" if cuda else "CPU clock (one tick per allocation or free)")
    ax.set_title(record.settings.spec, loc="left", pad=14)


def _phase_marks(ax: "Axes", marks: list[dict], mark_x: list[float]) -> None:
    from matplotlib.transforms import blended_transform_factory

    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for i, mark in enumerate(marks):
        if mark["phase"] == "end":
            continue
        step_start = mark["phase"] == "forward"
        ax.axvline(mark_x[i], color="black", linewidth=1.0 if step_start else 0.6,
                   linestyle="-" if step_start else ":", alpha=0.8)
        if i + 1 < len(mark_x):
            ax.text((mark_x[i] + mark_x[i + 1]) / 2, 1.01, f"{PHASE_SHORT[mark['phase']]} {mark['step']}",
                    transform=trans, ha="center", va="bottom", fontsize=8)


def _annotate_peak(ax: "Axes", record: RunRecord, x, total, unit: str) -> None:
    """Mark the highest point and spell out its composition beside the panel."""
    i = int(total.argmax())
    parts: dict[str, int] = {}
    for row in record.peak:
        label = _label(row.category, row.component if row.category == "optimizer_state" else None)
        parts[label] = parts.get(label, 0) + row.bytes
    lines = [f"peak {_value(record.peaks.allocated, unit)} {unit}",
             f"({record.peaks.phase}, step {record.peaks.step})"]
    lines += [f"{label}: {_value(v, unit)}" for label, v in sorted(parts.items(), key=lambda kv: -kv[1])[:6] if v]
    ax.annotate("\n".join(lines), (x[i], total[i]), xytext=(1.02, 1.0), textcoords="axes fraction",
                ha="left", va="top", fontsize=8, annotation_clip=False,
                arrowprops={"arrowstyle": "->", "color": "#555555", "linewidth": 0.8, "shrinkB": 2},
                bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": "#888888"})
    ax.plot([x[i]], [total[i]], marker="v", color="black", markersize=6, clip_on=False)


def plot_parameters(records: Sequence[RunRecord], *, unit: str = "MiB", top: int = 12) -> "Figure":
    """Per optimizer, the parameters with the most optimizer state, split by component, with the
    parameter's own size marked for scale."""
    shown = [r for r in records if r.parameters]
    if not shown:
        raise UsageError("no record has per-parameter optimizer state (stateless optimizer or failed run)")
    with _style():
        div = scale(unit)
        heights = [min(top, len(r.parameters)) for r in shown]
        fig = _figure(9.5, 0.9 + sum(0.28 * h + 0.8 for h in heights))
        axes = fig.subplots(len(shown), 1, squeeze=False, height_ratios=[h + 2 for h in heights])[:, 0]
        seen: dict[str, tuple[str, str]] = {}
        for ax, record in zip(axes, shown):
            params = record.parameters[:top][::-1]  # largest at the top
            roles = order_roles(k for p in params for k in p.by_role)
            left = [0.0] * len(params)
            for role in roles:
                widths = [p.by_role.get(role, 0) / div for p in params]
                color, hatch = segment_style("optimizer_state", role)
                ax.barh(range(len(params)), widths, left=left, height=0.7, color=color, hatch=hatch,
                        edgecolor="#333333" if hatch else "white", linewidth=0.5)
                seen.setdefault(_label("optimizer_state", role), (color, hatch))
                left = [a + b for a, b in zip(left, widths)]
            ax.scatter([p.param_bytes / div for p in params], range(len(params)), marker="|", s=120,
                       color="black", linewidths=1.5, zorder=3)
            ax.set_yticks(range(len(params)), [_short(p.name, p.shape) for p in params])
            ax.set_xlabel(f"Optimizer state ({unit}); | = the parameter's own size")
            ax.set_title(f"{record.settings.spec}: top {len(params)} of {len(record.parameters)} parameters",
                         loc="left")
            ax.grid(axis="x", alpha=0.3)
            ax.set_axisbelow(True)
        _legend(fig, seen)
        fig.suptitle(_title(shown), fontsize=10)
        return fig


def _short(name: str, shape: tuple[int, ...], width: int = 38) -> str:
    name = name if len(name) <= width else "…" + name[-(width - 1):]
    return f"{name} ({'×'.join(map(str, shape))})"


def _style():
    import matplotlib

    return matplotlib.rc_context(STYLE)


def render(fig: "Figure", fmt_name: str) -> bytes:
    """The figure as PNG, PDF or SVG bytes."""
    if fmt_name not in FORMATS:
        raise UsageError(f"cannot write a {fmt_name!r} figure; use a .png, .pdf or .svg path")
    buffer = io.BytesIO()
    with _style():
        fig.savefig(buffer, format=fmt_name, dpi=150)
    return buffer.getvalue()


def figure_paths(path: str | Path) -> dict[str, Path]:
    """The files ``--plot PATH`` writes: PATH itself for the breakdown, ``<stem>-timeline`` and
    ``<stem>-parameters`` beside it, same extension."""
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise UsageError(f"--plot {path}: the extension picks the format; use .png, .pdf or .svg")
    return {"breakdown": path, "timeline": path.with_name(f"{path.stem}-timeline{path.suffix}"),
            "parameters": path.with_name(f"{path.stem}-parameters{path.suffix}")}


def figures(records: Sequence[RunRecord], path: str | Path, *, unit: str = "MiB",
            top: int = 12) -> list[tuple[Path, bytes]]:
    """Every figure the records support, rendered: ``(path, the file's bytes)``."""
    scale(unit)
    paths = figure_paths(path)
    makers = {"breakdown": lambda: plot_breakdown(records, unit=unit)}
    if any(r.timeline.time for r in records):
        makers["timeline"] = lambda: plot_timeline(records, unit=unit)
    if any(r.parameters for r in records):
        makers["parameters"] = lambda: plot_parameters(records, unit=unit, top=top)
    return [(paths[name], render(make(), paths[name].suffix.lower().lstrip("."))) for name, make in makers.items()]


def save_figures(records: Sequence[RunRecord], path: str | Path, *, unit: str = "MiB", top: int = 12) -> list[Path]:
    """Write every figure the records support, all or none (``memprof.files.write_all``); return the paths."""
    rendered = figures(records, path, unit=unit, top=top)
    write_all(rendered)
    return [target for target, _ in rendered]


def plot_fit(fits, *, unit: str = "GiB") -> "Figure":
    """What each optimizer's run needs against the searched setting, with the budget line: the
    largest value that fits is marked per optimizer."""
    div = scale(unit)
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    colors = list(OKABE_ITO.values())[1:]
    for i, result in enumerate(fits):
        points = sorted((v, n) for v, n in result.probes if n is not None)
        if not points:
            continue
        color = colors[i % len(colors)]
        ax.plot([v for v, _ in points], [n / div for _, n in points], marker="o", color=color,
                label=f"{result.spec}: largest {result.value}")
        if result.value:
            used = dict(points)[result.value]
            ax.scatter([result.value], [used / div], s=120, facecolors="none", edgecolors=color, linewidths=2)
    budget = fits[0].budget
    ax.axhline(budget / div, color=OKABE_ITO["black"], linestyle="--", linewidth=1)
    ax.annotate(f"budget {_value(budget, unit)} {unit}", (ax.get_xlim()[0], budget / div), xytext=(4, 4),
                textcoords="offset points", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(fits[0].setting.replace("_", " "))
    ax.set_ylabel(f"needs ({unit})")
    record = next((f.record for f in fits if f.record is not None), None)
    if record is not None:
        ax.set_title(f"{_model(record.settings.model)}{_lora(record.settings)}: largest "
                     f"{fits[0].setting.replace('_', ' ')} that fits", fontsize=10, loc="left")
    ax.legend(fontsize=8, frameon=False)
    return fig


def fit_figure(fits, path: str | Path, *, unit: str = "GiB") -> tuple[Path, bytes]:
    """The figure of a fit search, rendered: ``(path, the file's bytes)``."""
    target = figure_paths(path)["breakdown"]
    return target, render(plot_fit(fits, unit=unit), target.suffix.lower().lstrip("."))

