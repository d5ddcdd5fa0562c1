"""The run record: one plain data object per (model, optimizer, settings).

Measurers produce it, views consume it; it round-trips through JSON (``to_json`` / ``load``).
All byte counts are integers in bytes; views choose units.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

from memprof.taxonomy import CATEGORIES, PHASES  # noqa: F401  (re-exported for readers of records)


@dataclass(frozen=True)
class Settings:
    """What was measured and how; enough to re-run it."""

    model: str
    optimizer: str  # registry name or dotted path
    spec: str  # the --opt item as written
    device: str  # "cpu" | "cuda"
    dtype: str = "float32"
    amp: str | None = None  # "bf16" | "fp16" | None
    batch_size: int = 2
    seq_len: int = 128
    image_size: int = 224
    num_classes: int | None = None
    steps: int = 3
    seed: int = 0
    timeline: bool = True  # keep a downsampled per-category timeline in the record
    snapshot: str | None = None  # path for a torch memory snapshot (CUDA only)


@dataclass(frozen=True)
class Row:
    """Bytes of one (category, component). ``basis`` says how they were counted:
    ``tensor`` (unique storage bytes), ``allocator`` (caching-allocator blocks, replayed from its
    history on CUDA or simulated from live tensors on CPU) or ``nvml`` (driver view)."""

    category: str
    component: str
    bytes: int
    basis: str = "tensor"


@dataclass(frozen=True)
class ParameterState:
    """Optimizer state charged to one parameter."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    param_bytes: int
    state_bytes: int
    by_role: dict[str, int]
    by_key: dict[str, int]
    unfactored: bool  # keeps a full-size moment while the optimizer factors others


@dataclass
class RunRecord:
    settings: Settings
    environment: dict[str, Any]
    status: str = "ok"  # "ok" | "oom" | "failed"
    failure: str | None = None  # e.g. "OOM in backward (step 2)"
    n_params: int = 0
    model_config: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    inferred_roles: bool = False
    gradient_component: str = "grad"
    breakdown: list[Row] = field(default_factory=list)  # steady state after the last step
    peak: list[Row] = field(default_factory=list)  # composition at the global peak
    peaks: dict[str, Any] = field(default_factory=dict)  # allocated / reserved / nvml / where
    phase_peaks: list[dict[str, Any]] = field(default_factory=list)  # {step, phase, peak, start, end}
    timings_ms: dict[str, float] = field(default_factory=dict)  # medians after warm-up
    parameters: list[ParameterState] = field(default_factory=list)
    telemetry: list[dict[str, float]] = field(default_factory=list)  # one dict per step
    timeline: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    # -- derived views of the rows -------------------------------------------------------
    def total(self, category: str, *, at_peak: bool = False) -> int:
        rows = self.peak if at_peak else self.breakdown
        return sum(r.bytes for r in rows if r.category == category)

    def components(self, category: str, *, at_peak: bool = False) -> dict[str, int]:
        rows = self.peak if at_peak else self.breakdown
        out: dict[str, int] = {}
        for r in rows:
            if r.category == category:
                out[r.component] = out.get(r.component, 0) + r.bytes
        return out

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        data = dict(data)
        data["settings"] = Settings(**data["settings"])
        data["breakdown"] = [Row(**r) for r in data.get("breakdown", [])]
        data["peak"] = [Row(**r) for r in data.get("peak", [])]
        data["parameters"] = [
            ParameterState(**{**p, "shape": tuple(p["shape"])}) for p in data.get("parameters", [])
        ]
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> list["RunRecord"]:
        """Load the records of a run file (a JSON object with ``records``, or one record)."""
        data = json.loads(Path(path).read_text())
        items = data["records"] if isinstance(data, dict) and "records" in data else [data]
        return [cls.from_dict(item) for item in items]
