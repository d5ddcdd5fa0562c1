"""The run record: one plain data object per (model, optimizer, settings).

Measurers produce it, views consume it; ``memprof.runfile`` alone reads and writes it (JSON and
tidy CSV). All byte counts are integers in bytes; views choose units.
"""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from memprof.settings import Settings

SCHEMA_VERSION = 2
STATUSES = ("ok", "oom", "failed")
"""2: typed peaks (``Peaks``), phase peaks and timeline; version-1 files still load."""


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
    roles: dict[str, str] = field(default_factory=dict)  # each state tensor's role, by its path (as by_key)
    component: str = "param"  # its component of ``weights`` (memprof.taxonomy.WEIGHT_COMPONENTS): "adapter" under LoRA


@dataclass
class Peaks:
    """The global peak of allocated bytes and, on CUDA, what the allocator and NVML said (an estimate for
    CUDA: what its simulated allocator would say, ``memprof.measure.reserved``)."""

    allocated: int | None = None  # replayed (CUDA) or simulated (CPU) global peak
    phase: str = ""  # where the global peak fell
    step: int = 0
    micro: int = 0  # the micro-batch (--grad-accum) of a forward or backward peak
    simulated: bool = True  # CPU: simulated from live tensors; CUDA: the allocator's history
    exact_blocks: bool = True  # False under expandable segments (block sizes replayed approximately)
    max_allocated: int | None = None  # torch.cuda.max_memory_allocated
    max_reserved: int | None = None
    reserved_end: int | None = None
    allocated_end: int | None = None
    nvml: int | None = None  # device memory NVML charges to the process
    nvml_basis: str = "n/a"  # "nvml process" | "nvml device delta" | "n/a"
    fails_at: str | None = None  # an estimate over its budget: the first allocation that fails ("": none, once the
    # allocator frees its cached segments; memprof.measure.reserved)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Peaks":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "simulated" not in data:  # files before the typed record: CPU peaks said so in prose
            values["simulated"] = "basis" in data
        if "block_sizes" in data:
            values["exact_blocks"] = False
        return cls(**values)


@dataclass(frozen=True)
class PhasePeak:
    """Allocated bytes at the start, peak and end of one phase of one step."""

    step: int
    phase: str
    start: int
    peak: int
    end: int
    allocator_at_start: int | None = None  # torch.cuda.memory_allocated at the phase mark (CUDA)
    composition: list[Row] = field(default_factory=list)  # live bytes by (category, component) at the peak
    blocks: dict[str, int] = field(default_factory=dict)  # a depth probe's: the peak before, in the first and
    # the last repeated block, and after them (memprof.measure.depth)
    micro: int = 0  # the micro-batch of the step (--grad-accum N: forward and backward of 0 … N-1, then the step)
    reserved: int | None = None  # the most the caching allocator reserved in the phase (CUDA, and estimates for it)


@dataclass
class Timeline:
    """Downsampled live bytes over time (each bucket keeps its maximum), with the phase marks."""

    time: list[float] = field(default_factory=list)  # since the first event, in the tracker's clock
    total: list[int] = field(default_factory=list)
    categories: dict[str, list[int]] = field(default_factory=dict)
    marks: list[dict[str, Any]] = field(default_factory=list)  # {time, phase, step}


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
    peaks: Peaks = field(default_factory=Peaks)
    phase_peaks: list[PhasePeak] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)  # medians after warm-up
    parameters: list[ParameterState] = field(default_factory=list)
    telemetry: list[dict[str, float]] = field(default_factory=list)  # one dict per step
    timeline: Timeline = field(default_factory=Timeline)
    notes: list[str] = field(default_factory=list)  # how a figure was obtained, where that is not obvious
    schema: int = SCHEMA_VERSION

    @classmethod
    def failed(cls, settings: Settings, failure: str, status: str = "failed") -> "RunRecord":
        """The record of a run that measured nothing: ``status`` ("failed" or "oom") and why."""
        return cls(settings=settings, environment={}, status=status, failure=failure)

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

    # -- plain data ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        """A record from its plain-data form. Every field is checked against its declared type;
        bad data raises KeyError, TypeError or ValueError (``UsageError`` for bad settings)."""
        _expect(data, dict, "the record")
        data = dict(data)
        _expect(data["settings"], dict, "settings")
        settings = {k: v for k, v in data["settings"].items() if k in {f.name for f in fields(Settings)}}
        peaks = data.get("peaks") or {}
        _expect(peaks, dict, "peaks")
        _check_fields(Peaks, {k: v for k, v in peaks.items() if k in _hints(Peaks)}, "peaks")
        built: dict[str, Any] = {"settings": Settings(**settings), "peaks": Peaks.from_dict(peaks),
                                 "timeline": _typed(Timeline, data.get("timeline") or {}, "timeline")}
        for key, kind in (("breakdown", Row), ("peak", Row), ("phase_peaks", PhasePeak), ("parameters", ParameterState)):
            items = data.get(key, [])
            _expect(items, list, key)
            built[key] = [_typed(kind, item, f"{key}[{i}]") for i, item in enumerate(items)]
        _check_fields(cls, data, "", skip=tuple(built))
        return cls(**{**data, **built})


def _hints(kind: type) -> dict[str, Any]:
    return typing.get_type_hints(kind)


def _check_fields(kind: type, data: Any, where: str, skip: tuple[str, ...] = ()) -> None:
    """Raise TypeError unless ``data`` is a mapping of ``kind``'s fields, each value of its declared type."""
    _expect(data, dict, where or "the record")
    hints = _hints(kind)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise TypeError(f"{where or 'the record'}: unknown field(s) {', '.join(map(str, unknown))}")
    for key, value in data.items():
        if key not in skip:
            _check(value, hints[key], f"{where}.{key}" if where else key)


def _typed(kind: type, data: Any, where: str) -> Any:
    """``kind(**data)`` once every value fits its declared type (a shape list becomes a tuple)."""
    _check_fields(kind, data, where, skip=("composition",))
    if kind is ParameterState and "shape" in data:
        data = {**data, "shape": tuple(data["shape"])}
    if kind is PhasePeak and "composition" in data:
        _expect(data["composition"], list, f"{where}.composition")
        data = {**data, "composition": [_typed(Row, row, f"{where}.composition[{i}]")
                                        for i, row in enumerate(data["composition"])]}
    return kind(**data)


def _expect(value: Any, kind: type, where: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{where} is not a {'list' if kind is list else 'mapping' if kind is dict else kind.__name__}")


def _check(value: Any, hint: Any, where: str) -> None:
    """Raise TypeError unless ``value`` (plain JSON data) fits the type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                _check(value, option, where)
                return
            except TypeError:
                continue
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                _check(item, args[0], f"{where}[{i}]")
            return
    elif origin is dict:
        if isinstance(value, dict):
            for key, item in value.items():
                _check(key, args[0], f"{where} key")
                _check(item, args[1], f"{where}.{key}")
            return
    elif hint is type(None):
        if value is None:
            return
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return
    elif isinstance(value, hint):
        return
    raise TypeError(f"{where} is {value!r:.60}, not {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(hint) in (list, tuple):
        return f"a list of {_type_name(args[0])}"
    if typing.get_origin(hint) is dict:
        return f"a mapping of {_type_name(args[1])}"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
