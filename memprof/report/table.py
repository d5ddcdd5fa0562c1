"""Rich terminal tables. Each takes records and a Console; none measures anything."""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.table import Table

from memprof.gpus import DEFAULT_GPU, budget, fits, need
from memprof.record import RunRecord
from memprof.taxonomy import PHASES, ROLE_ABBREVIATIONS
from memprof.units import fmt


def _state_split(record: RunRecord, unit: str) -> str:
    parts = record.components("optimizer_state")
    return " ".join(f"{ROLE_ABBREVIATIONS.get(k, k)} {fmt(v, unit, 2)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v)


def _delta(value: int | None, base: int | None, unit: str) -> str:
    if value is None or base is None:
        return ""
    diff = value - base
    pct = f" ({diff / base:+.0%})" if base else ""
    return f"{'+' if diff >= 0 else ''}{fmt(diff, unit)}{pct}"


def compare_table(records: Sequence[RunRecord], *, unit: str = "MiB", baseline: str | None = None) -> Table:
    """One row per optimizer: the byte categories, the peaks, step time and Δ vs the baseline."""
    first = records[0].settings
    cuda = first.device.startswith("cuda")
    title = (f"{first.model} · batch {first.batch_size}"
             + (f" · seq {first.seq_len}" if first.seq_len else "")
             + f" · {first.dtype}{' · amp ' + first.amp if first.amp else ''}{' · ' + first.recipes() if first.recipes() else ''} · {first.device} · {first.steps} steps · {unit}")
    table = Table(title=title, title_justify="left", header_style="bold")
    for name in ("optimizer", "weights", "grads", "state", "state split", "activations", "step transient",
                 "peak alloc", "reserved", "NVML", "step ms", "Δ state", "Δ peak"):
        table.add_column(name, justify="left" if name in ("optimizer", "state split") else "right",
                         overflow="fold")
    base = next((r for r in records if baseline in (r.settings.spec, r.settings.optimizer)), records[0])
    base_ok = base.status == "ok"
    na = "n/a on CPU"
    for record in records:
        label = record.settings.spec + (" (roles inferred)" if record.inferred_roles else "")
        if record.status != "ok":
            reached = record.peaks.allocated
            table.add_row(label, f"[red]{record.failure}[/red]", "", "", "", "", "",
                          fmt(reached, unit) if reached else "", "", "", "", "", "")
            continue
        state = record.total("optimizer_state")
        peak = record.peaks.allocated
        table.add_row(
            label,
            fmt(record.total("weights"), unit),
            fmt(record.total("gradients"), unit) + ("*" if record.gradient_component != "grad" else ""),
            fmt(state, unit),
            _state_split(record, unit),
            fmt(record.total("activations"), unit),
            fmt(record.total("step_transient"), unit),
            fmt(peak, unit) + ("" if cuda else " (sim)"),
            fmt(record.peaks.max_reserved, unit) if cuda else na,
            fmt(record.peaks.nvml, unit) if cuda else na,
            f"{record.timings_ms.get('step', float('nan')):.1f}",
            _delta(state, base.total("optimizer_state"), unit) if base_ok and record is not base else "",
            _delta(peak, base.peaks.allocated, unit) if base_ok and record is not base else "",
        )
    notes = [f"{r.settings.spec}: {note}" for r in records for note in r.notes]
    grads = [r for r in records if r.gradient_component != "grad"]
    if grads:
        notes.append("* " + "; ".join(f"{r.settings.spec}: gradient buffer holds {r.gradient_component}" for r in grads))
    if notes:
        table.caption = "\n".join(notes)
        table.caption_justify = "left"
    return table


def estimate_table(records: Sequence[RunRecord], *, unit: str = "GiB", baseline: str | None = None) -> Table:
    """One row per estimated optimizer: bytes by category, the peak allocated and reserved, what the device
    needs, and whether it fits the budget (``--memory`` or the ``--gpu``'s capacity)."""
    first = records[0].settings
    limit = budget(first)
    title = (f"{first.model} · batch {first.batch_size} · seq {first.seq_len} · {first.dtype}"
             f"{' · amp ' + first.amp if first.amp else ''}{' · ' + first.recipes() if first.recipes() else ''} · estimate for {first.device}"
             f"{' (' + (first.target_gpu or DEFAULT_GPU) + ')' if first.device.startswith('cuda') else ''}"
             f"{' · budget ' + fmt(limit, unit, 2) if limit else ''} · {unit}")
    table = Table(title=title, title_justify="left", header_style="bold")
    cuda = first.device.startswith("cuda")
    names = ["optimizer", "weights", "grads", "state", "state split", "activations", "step transient", "peak alloc",
             *(["reserved"] if cuda else []), "needs", *(["fits", "headroom"] if limit else []), "Δ state", "Δ needs"]
    for name in names:
        table.add_column(name, justify="left" if name in ("optimizer", "state split", "fits") else "right",
                         overflow="fold")
    base = next((r for r in records if baseline in (r.settings.spec, r.settings.optimizer)), records[0])
    base_ok = base.status == "ok"
    for record in records:
        label = record.settings.spec + (" (roles inferred)" if record.inferred_roles else "")
        if record.status != "ok":
            table.add_row(label, f"[red]{record.failure}[/red]", *([""] * (len(names) - 2)))
            continue
        needs = need(record)
        fit = [("yes" if fits(record, limit) else "[red]no[/red]"), fmt(limit - needs, unit, 2)] if limit else []
        allocated = record.peaks.max_allocated if record.peaks.max_allocated is not None else record.peaks.allocated
        table.add_row(
            label, fmt(record.total("weights"), unit, 2),
            fmt(record.total("gradients"), unit, 2) + ("*" if record.gradient_component != "grad" else ""),
            fmt(record.total("optimizer_state"), unit, 2), _state_split(record, unit),
            fmt(record.total("activations"), unit, 2), fmt(record.total("step_transient"), unit, 2),
            fmt(allocated, unit, 2), *([fmt(record.peaks.max_reserved, unit, 2)] if cuda else []),
            fmt(needs, unit, 2), *fit,
            _delta(record.total("optimizer_state"), base.total("optimizer_state"), unit)
            if base_ok and record is not base else "",
            _delta(needs, need(base), unit) if base_ok and record is not base else "",
        )
    notes = [f"{r.settings.spec}: {note}" for r in records for note in r.notes]
    notes += [f"{r.settings.spec}: gradient buffer holds {r.gradient_component}" for r in records
              if r.gradient_component != "grad"]
    notes += [f"{r.settings.spec}: the first allocation to fail within the budget: {r.peaks.fails_at}"
              if r.peaks.fails_at else f"{r.settings.spec}: fits once the allocator frees its cached segments"
              for r in records if r.status == "ok" and r.peaks.fails_at is not None]
    notes.append("peak alloc, reserved: what torch.cuda.max_memory_allocated and max_memory_reserved would say, from "
                 "the caching allocator simulated on the run's allocations (--alloc-conf); needs = reserved + CUDA "
                 "context outside the allocator" if cuda else "needs = peak of live tensors (a CPU run)")
    table.caption = "\n".join(notes)
    table.caption_justify = "left"
    return table


def fit_table(fits, *, unit: str = "GiB") -> Table:
    """One row per optimizer: the largest value of the searched setting that fits, and what it needs."""
    first = fits[0]
    setting = first.setting.replace("_", " ")
    recipes = next((r.settings.recipes() for f in fits for r in f.estimates), "")
    budget = f"{fmt(first.budget, unit, 2)} {unit}{' · ' + recipes if recipes else ''}"
    table = Table(title=f"largest {setting} that fits {budget} (each confirmed by an estimate at that value)",
                  title_justify="left", header_style="bold")
    for name in ("optimizer", f"largest {setting}", f"needs ({unit})", f"headroom ({unit})",
                 f"next {setting} needs ({unit})", "probes"):
        table.add_column(name, justify="left" if name == "optimizer" else "right")
    marked = False
    for result in fits:
        probes = dict(result.probes)
        above = min((v for v in probes if v > result.value and probes[v] is not None), default=None)
        if result.failure:
            table.add_row(result.spec, f"[red]{result.failure}[/red]", "", "", "", str(len(result.probes)))
            continue
        used = probes.get(result.value)
        freeing = bool(used) and result.value and used > result.budget  # fits only once cached segments go
        headroom = f"{fmt(result.budget - used, unit, 2)}{'*' if freeing else ''}" if used else ""
        table.add_row(result.spec, str(result.value) if result.value else "[red]none (1 does not fit)[/red]",
                      fmt(used, unit, 2) if used else "", headroom,
                      f"{fmt(probes[above], unit, 2)} at {above}" if above else "", str(len(result.probes)))
        marked = marked or freeing
    if marked:
        table.caption = ("* needs more than the budget while the allocator caches freely; fits because the "
                         "allocator frees its cached segments and retries, as PyTorch does before an out-of-memory")
    return table


def breakdown_table(record: RunRecord, *, unit: str = "MiB", at_peak: bool = False) -> Table:
    """Every category and component of one record, steady state or at the global peak."""
    rows = record.peak if at_peak else record.breakdown
    micro = f", micro-batch {record.peaks.micro}" if record.settings.grad_accum > 1 and record.peaks.phase in (
        "forward", "backward") else ""
    where = (f"at the global peak ({record.peaks.phase}, step {record.peaks.step}{micro})"
             if at_peak else "after the last step")
    table = Table(title=f"{record.settings.spec} on {record.settings.model}: bytes {where} ({unit})",
                  title_justify="left", header_style="bold")
    for name in ("category", "component", unit, "basis"):
        table.add_column(name, justify="right" if name == unit else "left")
    for row in rows:
        table.add_row(row.category, row.component, fmt(row.bytes, unit, 2), row.basis)
    if at_peak:
        table.add_row("[bold]total[/bold]", "", f"[bold]{fmt(sum(r.bytes for r in rows), unit, 2)}[/bold]", "")
    return table


def parameter_table(record: RunRecord, *, unit: str = "MiB", top: int = 20) -> Table:
    """The parameters that cost the most optimizer state, with the component split."""
    roles = sorted({role for p in record.parameters for role in p.by_role})
    table = Table(title=f"Top {top} parameters by {record.settings.spec} state ({unit})",
                  title_justify="left", header_style="bold")
    labelled = any(p.component != "param" for p in record.parameters)  # adapters (--lora) say so
    for name in ("parameter", *(("component",) if labelled else ()), "shape", "param", "state", *roles,
                 "state/param", "unfactored"):
        table.add_column(name, justify="left" if name in ("parameter", "component", "shape") else "right")
    for p in record.parameters[:top]:
        ratio = f"{p.state_bytes / p.param_bytes:.3f}" if p.param_bytes else ""
        table.add_row(p.name, *((p.component,) if labelled else ()), "×".join(map(str, p.shape)),
                      fmt(p.param_bytes, unit, 2), fmt(p.state_bytes, unit, 3),
                      *(fmt(p.by_role.get(r, 0), unit, 3) for r in roles), ratio, "yes" if p.unfactored else "")
    fallback = sum(1 for p in record.parameters if p.unfactored)
    if fallback:
        table.caption = f"{fallback} of {len(record.parameters)} parameters keep unfactored (full-size) state"
    return table


def print_tables(tables: Sequence[Table], console: Console | None = None) -> None:
    console = console or Console()
    for table in tables:
        console.print(table)


def telemetry_table(record: RunRecord, *, top: int = 20) -> Table:
    """What the optimizer reported after each step (Adapprox: the rank of each parameter)."""
    steps = record.telemetry
    keys = sorted({k for entry in steps for k in entry}, key=lambda k: -max(e.get(k, 0) for e in steps))[:top]
    table = Table(title=f"{record.settings.spec}: reported per step (top {top})", title_justify="left", header_style="bold")
    table.add_column("quantity")
    for i in range(len(steps)):
        table.add_column(f"step {i + 1}", justify="right")
    for key in keys:
        table.add_row(key, *(f"{entry[key]:g}" if key in entry else "" for entry in steps))
    return table


def phase_table(record: RunRecord, *, unit: str = "MiB") -> Table:
    """Allocated bytes at the start, peak and end of each phase of each step."""
    basis = "estimated" if record.settings.estimate else "allocator" if record.settings.device.startswith("cuda") else "simulated"
    table = Table(title=f"{record.settings.spec}: allocated per phase ({basis}, {unit})", title_justify="left",
                  header_style="bold")
    accumulating = record.settings.grad_accum > 1  # a column for the micro-batch of each forward and backward
    for name in ("step", *(("micro-batch",) if accumulating else ()), "phase", "start", "peak", "end", "peak − start"):
        table.add_column(name, justify="left" if name == "phase" else "right")
    for p in record.phase_peaks:
        if p.phase in PHASES:
            micro = (str(p.micro) if p.phase != "step" else "",) if accumulating else ()
            table.add_row(str(p.step), *micro, p.phase, fmt(p.start, unit), fmt(p.peak, unit), fmt(p.end, unit),
                          fmt(p.peak - p.start, unit))
    return table


def profile_tables(record: RunRecord, *, unit: str = "MiB", top: int = 20) -> list[Table]:
    """One record in depth: steady state, the peak's composition, phases, state per parameter, telemetry."""
    tables = [breakdown_table(record, unit=unit), breakdown_table(record, unit=unit, at_peak=True),
              phase_table(record, unit=unit), parameter_table(record, unit=unit, top=top)]
    if any(record.telemetry):
        tables.append(telemetry_table(record, top=top))
    return tables
