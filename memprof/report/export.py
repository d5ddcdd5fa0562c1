"""What every export shares: the tidy DataFrame, the provenance (settings and environment a reader
needs to reproduce a number, with the exact command) and the per-optimizer summary rows that the
Markdown and LaTeX tables render. Reading and writing run files is ``memprof.runfile``'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from memprof.record import RunRecord
from memprof.runfile import CSV_COLUMNS, ENV_COLUMNS, record_rows
from memprof.settings import declared_fields, group_by_request, reproduce_command
from memprof.taxonomy import order_roles

if TYPE_CHECKING:
    import pandas as pd


def records_to_frame(records: Sequence[RunRecord]) -> "pd.DataFrame":
    """The tidy long table: the CSV's rows as a DataFrame."""
    import pandas as pd

    frame = pd.DataFrame([row for record in records for row in record_rows(record)], columns=list(CSV_COLUMNS))
    for column in ("bytes", "num_classes"):  # integers even where a failed run or a default leaves a gap
        frame[column] = frame[column].astype("Int64")
    return frame


# -- what every export carries -------------------------------------------------------------
def joined(values) -> str:
    """The distinct values, in first-seen order, as one string ("n/a" when none is known)."""
    seen = list(dict.fromkeys("" if v is None else str(v) for v in values))
    seen = [v for v in seen if v]
    return ", ".join(seen) if seen else "n/a"


def provenance_keys() -> tuple[str, ...]:
    """The settings a reader needs (those with a flag; ``optimizers`` for the specs), then the environment."""
    settings = [f.name for f in declared_fields("run") if f.name != "spec"]
    return (settings[0], "optimizers", *settings[1:], *ENV_COLUMNS, "python", "platform")


def provenance(records: Sequence[RunRecord]) -> dict[str, str]:
    """Settings and environment of the records, key by key; differing values are listed together."""
    def values(key: str):
        for r in records:
            if key == "optimizers":
                yield r.settings.spec
            elif hasattr(r.settings, key):
                yield getattr(r.settings, key)
            elif key == "gpu" and not r.settings.device.startswith("cuda"):
                yield "none (cpu run)"
            else:
                yield r.environment.get(key)

    return {key: joined(values(key)) for key in provenance_keys()}


def reproduce_commands(records: Sequence[RunRecord]) -> list[str]:
    """One ``memprof compare`` (or ``estimate``) command per group of records measured with the same settings."""
    return [reproduce_command(settings, specs) for settings, specs in group_by_request(r.settings for r in records)]


# -- the per-optimizer summary that Markdown and LaTeX render -----------------------------
def state_components(records: Sequence[RunRecord]) -> list[str]:
    """Optimizer-state components present in any record, in role order."""
    return order_roles(c for r in records for c in r.components("optimizer_state"))


def summary_rows(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One dict per record: ``label``, ``model``, ``failure`` (or None) and byte counts keyed
    ``weights``, ``gradients``, ``state``, ``state:<component>``, ``activations``,
    ``step_transient`` and ``peak`` (the global peak of allocated bytes)."""
    components = state_components(records)
    rows = []
    for r in records:
        parts = r.components("optimizer_state")
        rows.append({
            "label": r.settings.spec + (f" · rank {r.settings.rank}" if r.settings.nproc > 1 else ""),
            "model": r.settings.model,
            "failure": None if r.status == "ok" else (r.failure or r.status),
            "weights": r.total("weights"),
            "gradients": r.total("gradients"),
            "state": r.total("optimizer_state"),
            **{f"state:{c}": parts.get(c, 0) for c in components},
            "activations": r.total("activations"),
            "step_transient": r.total("step_transient"),
            "peak": r.peaks.allocated,
        })
    return rows
