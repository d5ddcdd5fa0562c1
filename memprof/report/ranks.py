"""The terminal table of a distributed run: one row per optimizer and rank, then min–max across ranks
and the imbalance. Measures nothing."""

from __future__ import annotations

from typing import Sequence

from rich.markup import escape
from rich.table import Table

from memprof.gpus import need
from memprof.record import RunRecord
from memprof.report.table import compare_table
from memprof.taxonomy import COLLECTIVE_COMPONENTS, ROLE_ABBREVIATIONS
from memprof.units import fmt

SHORT = {"all-gather": "ag", "unsharded params": "unsh", "reduce-scatter": "rs", "all-reduce bucket": "bucket"}


def results_table(records: Sequence[RunRecord], *, unit: str = "MiB", baseline: str | None = None) -> Table:
    """``compare_table`` for single-process records, ``rank_table`` when any record is one rank of several."""
    if any(r.settings.nproc > 1 for r in records):
        return rank_table(records, unit=unit, baseline=baseline)
    return compare_table(records, unit=unit, baseline=baseline)


def _collectives(record: RunRecord) -> int:
    return sum(r.bytes for r in record.breakdown if (r.category, r.component) in COLLECTIVE_COMPONENTS)


def _collectives_split(record: RunRecord, unit: str) -> str:
    return " ".join(f"{SHORT.get(r.component, r.component)} {fmt(r.bytes, unit, 2)}" for r in record.breakdown
                    if (r.category, r.component) in COLLECTIVE_COMPONENTS and r.bytes)


def _figures(record: RunRecord) -> dict[str, int | None]:
    return {"weights": record.total("weights"), "grads": record.total("gradients"),
            "state": record.total("optimizer_state"), "activations": record.total("activations"),
            "collectives": _collectives(record), "step transient": record.total("step_transient"),
            "peak": record.peaks.allocated, "needs": need(record)}


def _delta(value: int | None, base: int | None, unit: str) -> str:
    if value is None or base is None:
        return ""
    pct = f" ({(value - base) / base:+.0%})" if base else ""
    return f"{'+' if value >= base else ''}{fmt(value - base, unit)}{pct}"


def _imbalance(values: list[int]) -> str:
    """max/mean − 1: how much more the busiest rank holds than the average one."""
    mean = sum(values) / len(values)
    return f"{max(values) / mean - 1:+.1%}" if mean else ""


def rank_table(records: Sequence[RunRecord], *, unit: str = "MiB", baseline: str | None = None) -> Table:
    """Per rank: weights, gradients, state (by role), activations, collectives' buffers, step transient,
    peak; per optimizer: the range across ranks and the imbalance of the state and the peak."""
    first = records[0].settings
    title = (f"{first.model} · batch {first.batch_size} · seq {first.seq_len} · {first.dtype}"
             f"{' · amp ' + first.amp if first.amp else ''}{' · ' + first.recipes() if first.recipes() else ''} · {first.device} · {first.parallel} × {first.nproc} ranks"
             f"{' (simulated)' if first.estimate else ''} · {first.steps} steps · {unit}")
    table = Table(title=title, title_justify="left", header_style="bold")
    cuda = first.device.startswith("cuda")  # needs: reserved + the context outside the allocator, NCCL's included
    columns = ("optimizer", "rank", "weights", "grads", "state", "state split", "activations", "collectives",
               "step transient", "peak alloc", *(["needs"] if cuda else []), "step ms", "Δ state", "Δ peak", "imbalance")
    for name in columns:
        table.add_column(name, justify="left" if name in ("optimizer", "state split", "collectives", "imbalance")
                         else "right", overflow="fold")
    specs = list(dict.fromkeys(r.settings.spec for r in records))
    base_spec = next((s for s in specs for r in records if baseline in (r.settings.spec, r.settings.optimizer)
                      and r.settings.spec == s), specs[0])
    base = {r.settings.rank: r for r in records if r.settings.spec == base_spec and r.status == "ok"}
    sim = "" if first.device.startswith("cuda") else " (sim)"
    for spec in specs:
        ranks = sorted((r for r in records if r.settings.spec == spec), key=lambda r: r.settings.rank)
        for record in ranks:
            label = spec + (" (roles inferred)" if record.inferred_roles else "")
            if record.status != "ok":
                table.add_row(label, str(record.settings.rank), f"[red]{escape(record.failure or record.status)}[/red]",
                              *([""] * (len(columns) - 3)))
                continue
            f, other = _figures(record), base.get(record.settings.rank)
            compared = other is not None and spec != base_spec
            split = " ".join(f"{ROLE_ABBREVIATIONS.get(k, k)} {fmt(v, unit, 2)}"
                             for k, v in sorted(record.components("optimizer_state").items(), key=lambda kv: -kv[1]) if v)
            table.add_row(label, str(record.settings.rank), fmt(f["weights"], unit), fmt(f["grads"], unit),
                          fmt(f["state"], unit), split, fmt(f["activations"], unit), _collectives_split(record, unit),
                          fmt(f["step transient"], unit), fmt(f["peak"], unit) + sim,
                          *([fmt(f["needs"], unit)] if cuda else []),
                          f"{record.timings_ms['step']:.1f}" if "step" in record.timings_ms else "",
                          _delta(f["state"], other.total("optimizer_state"), unit) if compared else "",
                          _delta(f["peak"], other.peaks.allocated, unit) if compared else "", "")
        ok = [_figures(r) for r in ranks if r.status == "ok"]
        if len(ok) > 1:
            span = {k: f"{fmt(min(x[k] for x in ok), unit)}–{fmt(max(x[k] for x in ok), unit)}"
                    for k in ok[0] if all(x[k] is not None for x in ok)}
            table.add_row(f"[bold]{spec}[/bold]", "min–max", span["weights"], span["grads"], span["state"], "",
                          span["activations"], span["collectives"], span["step transient"], span.get("peak", ""),
                          *([span.get("needs", "")] if cuda else []),
                          "", "", "", f"state {_imbalance([x['state'] for x in ok])}, "
                                      f"peak {_imbalance([x['peak'] or 0 for x in ok])}", end_section=True)
    notes = dict.fromkeys(f"{r.settings.spec}: {note}" for r in records for note in r.notes)
    notes.update({"collectives: ag = FSDP all-gather buffer, unsh = unsharded parameters, rs = reduce-scatter "
                  "buffer, bucket = DDP (or DeepSpeed) gradient buckets (most live at once in the last step)": None,
                  "imbalance = max/mean − 1 across ranks": None})
    table.caption = "\n".join(notes)
    table.caption_justify = "left"
    return table
