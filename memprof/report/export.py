"""Machine-readable views of run records: tidy long DataFrame, CSV and JSON, written atomically.

Also what every export shares: the provenance (settings and environment a reader needs to
reproduce a number, with the exact command) and the per-optimizer summary rows that the
Markdown and LaTeX tables render.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from memprof.record import RunRecord
from memprof.taxonomy import order_roles

if TYPE_CHECKING:
    import pandas as pd

ID_COLUMNS = ("model", "optimizer", "spec", "device", "dtype", "amp", "batch_size", "seq_len", "image_size", "steps")
SETTINGS_COLUMNS = ("num_classes", "seed")
"""With ``ID_COLUMNS``: every setting ``memprof check`` needs to re-run a baseline."""
ENV_COLUMNS = ("gpu", "driver", "torch", "cuda", "memprof")
CSV_COLUMNS = (*ID_COLUMNS, "status", "measure", "category", "component", "bytes", "basis",
               *SETTINGS_COLUMNS, *ENV_COLUMNS, "record_rows")
"""``measure`` is ``steady`` (after the last step; the breakdown) or ``peak`` (at the global peak).
``record_rows`` is how many rows the record has in the file, so a reader can tell a truncated file."""

PROVENANCE_KEYS = ("model", "optimizers", "device", "dtype", "amp", "batch_size", "seq_len", "image_size",
                   "num_classes", "steps", "seed", "gpu", "driver", "torch", "cuda", "memprof", "python", "platform")


def record_rows(record: RunRecord) -> list[dict]:
    s = record.settings
    ids = {name: getattr(s, name) for name in (*ID_COLUMNS, *SETTINGS_COLUMNS)}
    env = {name: record.environment.get(name) for name in ENV_COLUMNS}
    rows = []
    for measure, items in (("steady", record.breakdown), ("peak", record.peak)):
        for row in items:
            rows.append({**ids, "status": record.status, "measure": measure, "category": row.category,
                         "component": row.component, "bytes": row.bytes, "basis": row.basis, **env})
    if not rows:  # a failed run still gets a row, so nothing silently disappears
        rows.append({**ids, "status": record.status, "measure": "steady", "category": "", "component": "",
                     "bytes": None, "basis": "", **env})
    for row in rows:
        row["record_rows"] = len(rows)
    return rows


def records_to_frame(records: Sequence[RunRecord]) -> "pd.DataFrame":
    import pandas as pd

    frame = pd.DataFrame([row for record in records for row in record_rows(record)], columns=list(CSV_COLUMNS))
    for column in ("bytes", "num_classes"):  # integers even where a failed run or a default leaves a gap
        frame[column] = frame[column].astype("Int64")
    return frame


def write_atomic(path: str | Path, content: str | bytes) -> None:
    """Write ``content`` (text or bytes) to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        handle = os.fdopen(fd, "wb") if isinstance(content, bytes) else os.fdopen(fd, "w", newline="")
        with handle:
            handle.write(content)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def to_csv(records: Sequence[RunRecord]) -> str:
    return records_to_frame(records).to_csv(index=False)


def to_json(records: Sequence[RunRecord]) -> str:
    header = {"memprof": _joined(r.environment.get("memprof") for r in records), "reproduce": reproduce_commands(records)}
    return json.dumps({**header, "records": [r.to_dict() for r in records]}, indent=1, default=str)


# -- what every export carries -------------------------------------------------------------
def _joined(values) -> str:
    """The distinct values, in first-seen order, as one string ("n/a" when none is known)."""
    seen = list(dict.fromkeys("" if v is None else str(v) for v in values))
    seen = [v for v in seen if v]
    return ", ".join(seen) if seen else "n/a"


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

    return {key: _joined(values(key)) for key in PROVENANCE_KEYS}


def reproduce_commands(records: Sequence[RunRecord]) -> list[str]:
    """One ``memprof compare`` command per group of records measured with the same settings."""
    groups: dict[tuple, list[str]] = {}
    for r in records:
        s = r.settings
        key = (s.model, s.device, s.dtype, s.amp, s.batch_size, s.seq_len, s.image_size, s.num_classes, s.steps, s.seed)
        groups.setdefault(key, []).append(s.spec)
    commands = []
    for (model, device, dtype, amp, batch, seq, image, classes, steps, seed), specs in groups.items():
        parts = ["memprof compare", f"--model {_quote(model)}", f"--opt {_quote(','.join(specs))}", f"--device {device}",
                 f"--dtype {dtype}", *([f"--amp {amp}"] if amp else []), f"--batch-size {batch}", f"--seq-len {seq}",
                 f"--image-size {image}", *([f"--num-classes {classes}"] if classes else []), f"--steps {steps}", f"--seed {seed}"]
        commands.append(" ".join(parts))
    return commands


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


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
            "label": r.settings.spec,
            "model": r.settings.model,
            "failure": None if r.status == "ok" else (r.failure or r.status),
            "weights": r.total("weights"),
            "gradients": r.total("gradients"),
            "state": r.total("optimizer_state"),
            **{f"state:{c}": parts.get(c, 0) for c in components},
            "activations": r.total("activations"),
            "step_transient": r.total("step_transient"),
            "peak": r.peaks.get("allocated"),
        })
    return rows
