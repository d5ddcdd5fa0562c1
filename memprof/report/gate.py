"""The memory gate: a run against a baseline (``memprof check``) or against budgets (the pytest plugin).

Both take run records (``memprof.runfile`` reads them from a ``--csv`` or ``--json`` file, so a
baseline is just either export).
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

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from memprof.errors import UsageError
from memprof.record import RunRecord
from memprof.runfile import ID_COLUMNS, SETTINGS_COLUMNS
from memprof.taxonomy import CATEGORIES, PERSISTENT
from memprof.units import UNITS, fmt, parse_size

PEAK = "peak"
"""Pseudo-category of the gate: the global peak of allocated bytes (component ``allocated``)."""
GATED_CPU = PERSISTENT
GATED_CUDA = (*GATED_CPU, "activations", "step_transient", PEAK)
EXACT_TOLERANCE, ALLOCATOR_TOLERANCE = "0%", "2%"  # persistent tensor rows; the rest
SETTING_KEYS = tuple(k for k in (*ID_COLUMNS, *SETTINGS_COLUMNS) if k not in ("model", "optimizer", "spec"))
"""What must match between a baseline run and the current run of the same model and optimizer."""

Slot = tuple[str, str]  # (category, component)


def _settings_text(record: RunRecord) -> dict[str, str]:
    return {k: "" if getattr(record.settings, k) is None else str(getattr(record.settings, k)) for k in SETTING_KEYS}


def _key(record: RunRecord) -> tuple[str, ...]:
    """Model, optimizer and settings: one config file may measure a model at several batch sizes."""
    return (record.settings.model, record.settings.spec, *_settings_text(record).values())


def _gated_values(record: RunRecord) -> tuple[dict[Slot, int], dict[Slot, str]]:
    """Bytes and basis of each steady (category, component), and the peak as ``(peak, allocated)``."""
    values: dict[Slot, int] = {}
    basis: dict[Slot, str] = {}
    for row in record.breakdown:
        slot = (row.category, row.component)
        values[slot] = values.get(slot, 0) + row.bytes
        basis[slot] = row.basis
    if record.peak:
        values[(PEAK, "allocated")] = sum(row.bytes for row in record.peak)
        basis[(PEAK, "allocated")] = "allocator"
    return values, basis


# -- tolerances ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """Allowed growth: a fraction of the baseline (``2%``) or a size (``1MiB``)."""

    text: str
    fraction: float = 0.0
    nbytes: int = 0

    @classmethod
    def parse(cls, text: str) -> "Tolerance":
        """``2%`` or a size with its unit (``20KiB``, ``0B``); a bare number is ambiguous and refused."""
        value = text.strip()
        if value.endswith("%"):
            try:
                percent = float(value[:-1])
            except ValueError:
                raise UsageError(f"cannot read tolerance {text!r}; write e.g. 2%, 0% or 1MiB") from None
            if not math.isfinite(percent):
                raise UsageError(f"tolerance {text!r} is not a finite percentage; write e.g. 2% or 0%")
            if percent < 0:
                raise UsageError(f"tolerance {text!r} is negative; write e.g. 2% or 0%")
            return cls(value, fraction=percent / 100)
        try:
            float(value)
        except ValueError:
            pass
        else:
            raise UsageError(f"tolerance {text!r} has no unit: write a percentage (2%) or a size (20KiB)")
        try:
            return cls(value, nbytes=parse_size(value))
        except UsageError as exc:
            raise UsageError(f"tolerance {text!r}: {exc}") from None

    def allowed(self, old: int) -> float:
        return max(self.fraction * old, self.nbytes)


def parse_tolerances(items: Sequence[str]) -> tuple[Tolerance | None, dict[str, Tolerance]]:
    """``["2%", "optimizer_state=0%"]`` → (the default, per category)."""
    default, per_category = None, {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            if default is not None:
                raise UsageError(f"--tolerance {default.text} and --tolerance {item.strip()}: give one default")
            default = Tolerance.parse(item)
            continue
        name = name.strip()
        check_category(name)
        if name in per_category:
            raise UsageError(f"--tolerance {name}= is given twice; give each category one tolerance")
        per_category[name] = Tolerance.parse(value)
    return default, per_category


def check_category(name: str) -> None:
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


def _match(old: RunRecord, current: Sequence[RunRecord], by_key: Mapping[tuple[str, ...], RunRecord]) -> RunRecord:
    """The current run measured like ``old``."""
    if _key(old) in by_key:
        return by_key[_key(old)]
    same = [r for r in current if (r.settings.model, r.settings.spec) == (old.settings.model, old.settings.spec)]
    if not same:
        raise UsageError(f"the current run has no {old.settings.spec} on {old.settings.model}, which the baseline "
                         "has; measure the same models and optimizers")
    before, after = _settings_text(old), _settings_text(same[0])
    differ = [f"{k} {before[k]!r} vs {after[k]!r}" for k in SETTING_KEYS if before[k] != after[k]]
    raise UsageError(f"{old.settings.spec} on {old.settings.model}: baseline and current differ in settings "
                     f"({'; '.join(differ)})")


def _labels(records: Sequence[RunRecord]) -> dict[tuple[str, ...], str]:
    """The model as a result line names it, with the settings that tell apart runs of one model and optimizer."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.settings.model, r.settings.spec), []).append(r)
    labels = {}
    for group in groups.values():
        texts = [_settings_text(r) for r in group]
        varying = [k for k in SETTING_KEYS if len({t[k] for t in texts}) > 1]
        for r, text in zip(group, texts):
            extra = ", ".join(f"{k}={text[k]}" for k in varying)
            labels[_key(r)] = f"{r.settings.model} [{extra}]" if extra else r.settings.model
    return labels


def check(
    baseline: Sequence[RunRecord],
    current: Sequence[RunRecord],
    *,
    tolerances: Sequence[str] = (),
    categories: Sequence[str] | None = None,
) -> GateResult:
    """Compare every gated row of every baseline run with the current run of the same model and optimizer."""
    default, per_category = parse_tolerances(tolerances)
    for name in categories or ():
        check_category(name)
    if not baseline:
        raise UsageError("the baseline has no runs: nothing to check against")
    deltas: list[Delta] = []
    gated_by_device: dict[str, tuple[str, ...]] = {}
    by_key = {_key(r): r for r in current}
    labels = _labels(baseline)
    for old in baseline:
        new = _match(old, current, by_key)
        model, spec, device = labels[_key(old)], old.settings.spec, old.settings.device
        base_gated = categories or (GATED_CUDA if device.startswith("cuda") else GATED_CPU)
        gated = tuple(dict.fromkeys([*base_gated, *per_category]))
        gated_by_device[device] = gated
        if old.status != "ok" or new.status != "ok":
            verdict = "within" if old.status == new.status else ("regression" if old.status == "ok" else "improvement")
            deltas.append(Delta(model, spec, "status", "", None, None, "", verdict,
                                note=f"status {old.status} → {new.status}"))
            continue
        (old_values, old_basis), (new_values, new_basis) = _gated_values(old), _gated_values(new)
        for slot in dict.fromkeys([*old_values, *new_values]):
            category, component = slot
            if category not in gated:
                continue
            before, after = old_values.get(slot, 0), new_values.get(slot, 0)
            basis = old_basis.get(slot) or new_basis.get(slot, "tensor")
            exact = basis == "tensor" and category in GATED_CPU
            tolerance = per_category.get(category) or default or Tolerance.parse(
                EXACT_TOLERANCE if exact else ALLOCATOR_TOLERANCE)
            if after > before + tolerance.allowed(before):
                verdict = "regression"
            elif after < before:
                verdict = "improvement"
            else:
                verdict = "within"
            deltas.append(Delta(model, spec, category, component, before, after, tolerance.text, verdict))
    if not deltas:
        gated_text = "; ".join(f"{device}: {', '.join(cats)}" for device, cats in gated_by_device.items())
        raise UsageError(f"nothing to check: the baseline has no rows in the gated categories ({gated_text}); "
                         "choose others with --category")
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
        if isinstance(value, bool) or isinstance(value, int) and value < 0:
            raise UsageError(f"memprof budget {key}={value!r} must be a size (20MiB) or bytes, not negative")
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
                used, parts = record.peaks.allocated, {f"{r.category}/{r.component}": r.bytes for r in record.peak}
            else:
                used, parts = record.total(category), record.components(category)
            if used is None or used > limit:
                failures.append(BudgetFailure(s.spec, s.model, category, limit, used, parts))
    return failures
