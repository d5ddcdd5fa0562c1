"""The memory gate: a run against a baseline (``memprof check``) or against budgets (the pytest plugin).

Both read the same tidy rows the CSV export writes, so a baseline is just ``--csv`` output.
Each gated (category, component) of each (model, optimizer) is compared: more than the
tolerance above the baseline is a regression (exit 1), anything below it an improvement
(reported, never a failure). The persistent rows counted from tensors (weights, buffers,
gradients, optimizer state, inputs) are exact and deterministic, so their default tolerance is
0%; every other row (allocator rows, and saved activations, which can differ by a few bytes
between runs in one process) defaults to 2%.

Gated by default: on CPU the exact rows ``weights``, ``buffers``, ``gradients``,
``optimizer_state`` and ``inputs``; on CUDA also ``activations``, ``step_transient`` and ``peak``
(the global peak of allocated bytes, the sum of the CSV's ``peak`` rows).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from memprof.errors import UsageError
from memprof.record import RunRecord
from memprof.report.export import ID_COLUMNS, SETTINGS_COLUMNS, record_rows
from memprof.report.units import UNITS, fmt, parse_size
from memprof.taxonomy import CATEGORIES, PERSISTENT

PEAK = "peak"
"""Pseudo-category of the gate: the global peak of allocated bytes (component ``allocated``)."""
GATED_CPU = PERSISTENT
GATED_CUDA = (*GATED_CPU, "activations", "step_transient", PEAK)
EXACT_TOLERANCE, ALLOCATOR_TOLERANCE = "0%", "2%"  # persistent tensor rows; the rest
REQUIRED_COLUMNS = (*ID_COLUMNS, "status", "measure", "category", "component", "bytes", "basis")
SETTING_KEYS = (*ID_COLUMNS[2:], *SETTINGS_COLUMNS)  # what must match between baseline and current


# -- reading runs -------------------------------------------------------------------------------
@dataclass
class Run:
    """The gated numbers of one (model, optimizer) run, read from a CSV or JSON file."""

    model: str
    spec: str
    settings: dict[str, str]  # every setting column, as text
    status: str
    values: dict[tuple[str, str], int] = field(default_factory=dict)  # (category, component) → bytes
    basis: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.settings.get("device", "cpu")

    @property
    def key(self) -> tuple[str, ...]:
        """Model, optimizer and settings: one config file may measure a model at several batch sizes."""
        return (self.model, self.spec, *(self.settings.get(k, "") for k in SETTING_KEYS))


def _bad(what: str, path: Path, detail: str) -> UsageError:
    return UsageError(f"{what} {path} is truncated or unreadable: {detail}; record it again with `memprof baseline`")


def load_runs(path: str | Path, what: str = "baseline") -> list[Run]:
    """The runs in a memprof CSV (``--csv``, ``memprof baseline``) or JSON (``--json``) file."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    if not text.strip():
        raise _bad(what, path, "the file is empty")
    if path.suffix.lower() == ".json":
        try:
            records = [RunRecord.from_dict(item) for item in _json_items(json.loads(text))]
        except (ValueError, TypeError, KeyError) as exc:
            raise _bad(what, path, f"not a memprof run file ({type(exc).__name__}: {exc})") from None
        return runs_from_records(records)
    return _runs_from_csv(text, path, what)


def _json_items(data: Any) -> list[dict]:
    return data["records"] if isinstance(data, dict) and "records" in data else [data]


def runs_from_records(records: Sequence[RunRecord]) -> list[Run]:
    rows = [{k: "" if v is None else str(v) for k, v in row.items()} for r in records for row in record_rows(r)]
    return _collect(rows, Path("<records>"), "run")


def _runs_from_csv(text: str, path: Path, what: str) -> list[Run]:
    if not text.endswith("\n"):
        raise _bad(what, path, "the last line is cut off (no final newline)")
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise _bad(what, path, f"not a memprof CSV (missing column(s) {', '.join(missing)})")
    rows = []
    for line, cells in enumerate(reader, start=2):
        if len(cells) != len(header):
            raise _bad(what, path, f"line {line} has {len(cells)} fields, the header {len(header)}")
        rows.append(dict(zip(header, cells)))
    if not rows:
        raise _bad(what, path, "the file has a header and no rows")
    return _collect(rows, path, what)


def _collect(rows: Iterable[dict[str, str]], path: Path, what: str) -> list[Run]:
    runs: dict[tuple[str, ...], Run] = {}
    counts: dict[tuple[str, ...], tuple[int, str]] = {}
    for row in rows:
        settings = {k: row.get(k, "") for k in SETTING_KEYS}
        candidate = Run(model=row["model"], spec=row["spec"], settings=settings, status=row["status"])
        run = runs.setdefault(candidate.key, candidate)
        n, declared = counts.get(run.key, (0, row.get("record_rows", "")))
        counts[run.key] = (n + 1, declared)
        if not row["category"]:
            continue  # the placeholder row of a failed run
        try:
            nbytes = int(row["bytes"])
        except ValueError:
            raise _bad(what, path, f"{row['spec']} on {row['model']}: bytes {row['bytes']!r} is not an integer") from None
        if row["measure"] == "steady":
            slot = (row["category"], row["component"])
            run.values[slot] = run.values.get(slot, 0) + nbytes
            run.basis[slot] = row["basis"]
        elif row["measure"] == "peak":
            run.values[(PEAK, "allocated")] = run.values.get((PEAK, "allocated"), 0) + nbytes
            run.basis[(PEAK, "allocated")] = "allocator"
    for key, (n, declared) in counts.items():
        if declared and declared.isdigit() and int(declared) != n:
            raise _bad(what, path, f"{runs[key].spec} on {runs[key].model} has {n} of its {declared} rows")
    return list(runs.values())


def rerun_settings(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """``memprof.api.measure`` keyword arguments that re-measure the runs, one dict per settings group."""
    groups: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        s = run.settings
        kwargs = {
            "model": run.model, "device": s["device"], "dtype": s["dtype"], "amp": s["amp"] or None,
            "batch_size": int(s["batch_size"]), "seq_len": int(s["seq_len"]), "image_size": int(s["image_size"]),
            "num_classes": int(float(s["num_classes"])) if s.get("num_classes") else None,
            "steps": int(s["steps"]), "seed": int(s["seed"]) if s.get("seed") else 0,
        }
        group = groups.setdefault(tuple(kwargs.items()), {**kwargs, "optimizers": []})
        group["optimizers"].append(run.spec)
    return list(groups.values())


# -- tolerances ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """Allowed growth: a fraction of the baseline (``2%``) or a size (``1MiB``)."""

    text: str
    fraction: float = 0.0
    nbytes: int = 0

    @classmethod
    def parse(cls, text: str) -> "Tolerance":
        value = text.strip()
        if value.endswith("%"):
            try:
                fraction = float(value[:-1]) / 100
            except ValueError:
                raise UsageError(f"cannot read tolerance {text!r}; write e.g. 2%, 0% or 1MiB") from None
            if fraction < 0:
                raise UsageError(f"tolerance {text!r} is negative")
            return cls(value, fraction=fraction)
        return cls(value, nbytes=parse_size(value))

    def allowed(self, old: int) -> float:
        return max(self.fraction * old, self.nbytes)


def parse_tolerances(items: Sequence[str]) -> tuple[Tolerance | None, dict[str, Tolerance]]:
    """``["2%", "optimizer_state=0%"]`` → (the default, per category)."""
    default, per_category = None, {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            default = Tolerance.parse(item)
            continue
        name = name.strip()
        _check_category(name)
        per_category[name] = Tolerance.parse(value)
    return default, per_category


def _check_category(name: str) -> None:
    if name not in (*CATEGORIES, PEAK):
        raise UsageError(f"unknown category {name!r}; choose from {', '.join((*CATEGORIES, PEAK))}")


# -- comparing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Delta:
    model: str
    spec: str
    category: str
    component: str
    old: int | None
    new: int | None
    tolerance: str
    verdict: str  # "regression" | "improvement" | "within"
    note: str = ""

    @property
    def percent(self) -> float | None:
        if self.old is None or self.new is None:
            return None
        return (self.new - self.old) / self.old * 100 if self.old else (0.0 if self.new == 0 else float("inf"))

    def change(self) -> str:
        if self.note:
            return self.note
        pct = self.percent
        pct_text = "new" if pct == float("inf") else f"{pct:+.2f}%"
        return f"{human(self.old)} → {human(self.new)} ({pct_text}, tolerance {self.tolerance})"

    def line(self) -> str:
        what = self.category + (f"/{self.component}" if self.component else "")
        return f"{self.verdict.upper():<11} {self.model} · {self.spec} · {what}: {self.change()}"


@dataclass
class GateResult:
    deltas: list[Delta]
    categories: dict[str, tuple[str, ...]]  # device → categories gated

    @property
    def regressions(self) -> list[Delta]:
        return [d for d in self.deltas if d.verdict == "regression"]

    @property
    def improvements(self) -> list[Delta]:
        return [d for d in self.deltas if d.verdict == "improvement"]

    @property
    def passed(self) -> bool:
        return not self.regressions

    def summary(self) -> str:
        within = len(self.deltas) - len(self.regressions) - len(self.improvements)
        gated = "; ".join(f"{device}: {', '.join(cats)}" for device, cats in self.categories.items())
        return (f"memprof check: {len(self.regressions)} regression(s), {len(self.improvements)} improvement(s), "
                f"{within} row(s) within tolerance (gated {gated})")

    def text(self) -> str:
        return "\n".join([*(d.line() for d in (*self.regressions, *self.improvements)), self.summary()]) + "\n"

    def markdown(self) -> str:
        """A GitHub step summary: verdict, the changed rows, and the count of the rest."""
        from memprof.report.markdown import escape

        verdict = "passed" if self.passed else f"failed: {len(self.regressions)} regression(s)"
        lines = [f"### memprof check {verdict}", ""]
        changed = [*self.regressions, *self.improvements]
        if changed:
            lines += ["| Result | Model | Optimizer | Category | Component | Baseline | Current | Δ | Tolerance |",
                      "|:---|:---|:---|:---|:---|---:|---:|---:|---:|"]
            for d in changed:
                pct = d.percent
                pct_text = d.note or ("new" if pct == float("inf") else f"{pct:+.2f}%")
                cells = [d.verdict, d.model, d.spec, d.category, d.component, human(d.old), human(d.new), pct_text, d.tolerance]
                lines.append("| " + " | ".join(escape(c) for c in cells) + " |")
            lines.append("")
        lines.append(escape(self.summary()))
        return "\n".join(lines) + "\n"


def human(nbytes: int | None) -> str:
    """Bytes in the largest binary unit that keeps the number at or above 1, labelled."""
    if nbytes is None:
        return "n/a"
    unit = next((u for u in ("GiB", "MiB", "KiB") if abs(nbytes) >= UNITS[u]), "B")
    return f"{fmt(nbytes, unit, 0 if unit == 'B' else 2)} {unit}"


def _match(old: Run, current: Sequence[Run], by_key: Mapping[tuple[str, ...], Run]) -> Run:
    """The current run measured like ``old``; settings a file does not record (older CSVs) match anything."""
    if old.key in by_key:
        return by_key[old.key]
    same = [run for run in current if (run.model, run.spec) == (old.model, old.spec)]
    if not same:
        raise UsageError(f"the current run has no {old.spec} on {old.model}, which the baseline has; "
                         "measure the same models and optimizers")
    for new in same:
        differ = [f"{k} {old.settings[k]!r} vs {new.settings[k]!r}" for k in SETTING_KEYS
                  if old.settings[k] and new.settings[k] and old.settings[k] != new.settings[k]]
        if not differ:
            return new
    raise UsageError(f"{old.spec} on {old.model}: baseline and current differ in settings ({'; '.join(differ)})")


def _labels(runs: Sequence[Run]) -> dict[tuple[str, ...], str]:
    """The model as a result line names it, with the settings that tell apart runs of one model and optimizer."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.model, run.spec), []).append(run)
    labels = {}
    for group in groups.values():
        varying = [k for k in SETTING_KEYS if len({run.settings[k] for run in group}) > 1]
        for run in group:
            extra = ", ".join(f"{k}={run.settings[k]}" for k in varying)
            labels[run.key] = f"{run.model} [{extra}]" if extra else run.model
    return labels


def check(
    baseline: Sequence[Run],
    current: Sequence[Run],
    *,
    tolerances: Sequence[str] = (),
    categories: Sequence[str] | None = None,
) -> GateResult:
    """Compare every gated row of every baseline run with the current run of the same model and optimizer."""
    default, per_category = parse_tolerances(tolerances)
    for name in categories or ():
        _check_category(name)
    deltas: list[Delta] = []
    gated_by_device: dict[str, tuple[str, ...]] = {}
    by_key = {run.key: run for run in current}
    labels = _labels(baseline)
    for old in baseline:
        new = _match(old, current, by_key)
        model = labels[old.key]
        base_gated = categories or (GATED_CUDA if old.device.startswith("cuda") else GATED_CPU)
        gated = tuple(dict.fromkeys([*base_gated, *per_category]))
        gated_by_device[old.device] = gated
        if old.status != "ok" or new.status != "ok":
            verdict = "within" if old.status == new.status else ("regression" if old.status == "ok" else "improvement")
            deltas.append(Delta(model, old.spec, "status", "", None, None, "", verdict,
                                note=f"status {old.status} → {new.status}"))
            continue
        for slot in dict.fromkeys([*old.values, *new.values]):
            category, component = slot
            if category not in gated:
                continue
            before, after = old.values.get(slot, 0), new.values.get(slot, 0)
            basis = old.basis.get(slot) or new.basis.get(slot, "tensor")
            exact = basis == "tensor" and category in GATED_CPU
            tolerance = per_category.get(category) or default or Tolerance.parse(
                EXACT_TOLERANCE if exact else ALLOCATOR_TOLERANCE)
            if after > before + tolerance.allowed(before):
                verdict = "regression"
            elif after < before:
                verdict = "improvement"
            else:
                verdict = "within"
            deltas.append(Delta(model, old.spec, category, component, before, after, tolerance.text, verdict))
    return GateResult(deltas, gated_by_device)


# -- budgets (the pytest plugin) ----------------------------------------------------------------
BUDGET_KEYS = {f"max_{c}": c for c in (*CATEGORIES, PEAK)}


@dataclass(frozen=True)
class BudgetFailure:
    spec: str
    model: str
    category: str
    limit: int
    used: int | None
    components: dict[str, int]
    note: str = ""

    @property
    def long_repr(self) -> str:
        if self.note:
            return f"{self.spec} on {self.model}: {self.note}"
        over = f" (+{(self.used - self.limit) / self.limit:.1%})" if self.limit else ""
        return f"{self.spec} on {self.model}: {self.category} limited to {human(self.limit)} but used {human(self.used)}{over}"

    @property
    def section(self) -> str:
        return "\n".join(f"  {name}: {human(v)}" for name, v in sorted(self.components.items(), key=lambda kv: -kv[1]))


def parse_budgets(budgets: Mapping[str, Any]) -> dict[str, int]:
    """``{"max_optimizer_state": "20MiB"}`` → ``{"optimizer_state": 20971520}``."""
    out = {}
    for key, value in budgets.items():
        if key not in BUDGET_KEYS:
            raise UsageError(f"unknown memprof budget {key!r}; use max_<category> with a category from "
                             f"{', '.join((*CATEGORIES, PEAK))}")
        out[BUDGET_KEYS[key]] = value if isinstance(value, int) else parse_size(str(value))
    return out


def check_budgets(records: Sequence[RunRecord], budgets: Mapping[str, Any]) -> list[BudgetFailure]:
    """Every budget each record exceeds (a failed run exceeds them all); empty when all hold."""
    limits = parse_budgets(budgets)
    failures = []
    for record in records:
        s = record.settings
        if record.status != "ok":
            failures.append(BudgetFailure(s.spec, s.model, "status", 0, None, {}, note=record.failure or record.status))
            continue
        for category, limit in limits.items():
            if category == PEAK:
                used, parts = record.peaks.get("allocated"), {f"{r.category}/{r.component}": r.bytes for r in record.peak}
            else:
                used, parts = record.total(category), record.components(category)
            if used is None or used > limit:
                failures.append(BudgetFailure(s.spec, s.model, category, limit, used, parts))
    return failures
