"""What a paper says and which memprof quantity each of its numbers is set against: plain data.

A ``Cell`` is one number of a paper's table (or a memprof-only row beside it, ``paper`` None) and the
quantity of one run record (or the difference or ratio of two) it is compared with. Of the rows
that stand for one printed number exactly one is the paper's cell (``primary``): the coverage
counts those. The others are supporting readings (the same state in 512-B blocks, …).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from memprof.record import RunRecord

UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "MB": 10**6, "GB": 10**9, "×": 1}
BLOCK = 512  # bytes: the CUDA caching allocator rounds every allocation up to a multiple of this
HOST_KEYS = ("step",)  # torch's Adam keeps ``step`` on the host unless fused or capturable: no CUDA block
QUANTITY_TEXT = {
    "state": "optimizer state",
    "state_blocks": "optimizer state in 512-B blocks",
    "state_blocks_exact_sign": "state in 512-B blocks, sign at 1 bit/element",
    "model_grads_state": "weights+grads+state",
    "model_state": "weights+state",
    "peak": "peak allocated",
}
PERSISTENT = ("state", "state_blocks", "state_blocks_exact_sign", "model_grads_state", "model_state")
"""Quantities a CPU run measures exactly (the same bytes on CUDA); ``peak`` needs a GPU run or an estimate."""


@dataclass(frozen=True)
class Run:
    """One record: the memprof model (a name, a config.json or file.py:function), the optimizer spec, the
    class count and the LoRA setting it was measured with."""

    model: str
    spec: str
    num_classes: int | None = None
    lora: str | None = None

    @property
    def key(self) -> tuple[str, str, int | None, str | None]:
        return (self.model, self.spec, self.num_classes, self.lora)


@dataclass(frozen=True)
class Cell:
    """One paper number (``paper``; None for a memprof-only row) and the memprof quantity beside it.

    ``terms`` are (sign, Run): one for a plain cell, two for a difference (or, with ``ratio``, the
    first over the second). ``tolerance`` is the agreement asked for: ("pct", 2.0) or ("abs", 0.1) in
    ``unit``. ``reason`` says, in one sentence with the arithmetic, why memprof's number differs from
    the paper's when it does by more than 2 %; ``{paper}``, ``{memprof}``, ``{diff}`` (memprof − paper), ``{gap}``
    (paper − memprof), ``{size}`` (|diff|), ``{pct}`` (diff in % of the paper) and ``{off}`` (|pct|) in it are
    filled in. ``primary`` marks the row that stands for the paper's printed number.
    """

    table: str
    model: str
    optimizer: str
    quantity: str
    terms: tuple[tuple[int, Run], ...]
    paper: float | None
    unit: str
    tolerance: tuple[str, float] = ("pct", 2.0)
    label: str = ""
    note: str = ""
    ratio: bool = False
    primary: bool = True
    reason: str = ""

    def __post_init__(self) -> None:
        if self.quantity not in QUANTITY_TEXT or self.unit not in UNITS:
            raise ValueError(f"Invalid cell: quantity {self.quantity!r}, unit {self.unit!r}")
        if self.paper is None and self.primary:
            object.__setattr__(self, "primary", False)

    @property
    def runs(self) -> tuple[Run, ...]:
        return tuple(run for _, run in self.terms)

    @property
    def heading(self) -> str:
        return f"{self.label or QUANTITY_TEXT[self.quantity]} [{self.unit}]"


def cell(table: str, model: str, optimizer: str, run: Run, quantity: str, paper: float | None, unit: str,
         **options) -> Cell:
    """A plain cell: one run's quantity."""
    return Cell(table, model, optimizer, quantity, ((1, run),), paper, unit, **options)


def difference(table: str, model: str, optimizer: str, minuend: Run, subtrahend: Run, quantity: str,
               paper: float | None, unit: str, **options) -> Cell:
    """A cell for the difference of two runs' quantity (a supporting row unless ``primary`` is given)."""
    options.setdefault("primary", False)
    return Cell(table, model, optimizer, quantity, ((1, minuend), (-1, subtrahend)), paper, unit, **options)


Rule = tuple[Mapping[str, Any], str]
"""Where a reason applies (cell fields and their values: a value, a tuple of values, or for ``in_label`` a
text the label holds) and the reason."""


def with_reasons(cells: Iterable[Cell], rules: Sequence[Rule]) -> list[Cell]:
    """The cells with the first matching rule's reason on every paper cell that has none. A reason shows only
    where its cell lands more than 2 % off, so a rule may cover a whole row."""
    def matches(c: Cell, key: str, value: Any) -> bool:
        if key == "in_label":
            return value in c.label
        return getattr(c, key) in value if isinstance(value, tuple) else getattr(c, key) == value

    out = []
    for c in cells:
        rule = next((reason for where, reason in rules if all(matches(c, k, v) for k, v in where.items())), None)
        out.append(replace(c, reason=rule) if c.primary and not c.reason and rule else c)
    return out


@dataclass(frozen=True)
class Estimate:
    """Where a peak has no GPU run: estimate it for ``gpu`` (a name of ``memprof.gpus.GPUS``) standing in
    for the paper's ``paper_gpu``."""

    gpu: str
    paper_gpu: str


@dataclass
class Reproduction:
    """One paper table (or several sharing runs): its cells, how its runs are measured, what it shows.

    ``config`` is reports/NAME.toml (the paper's settings); ``cpu`` the settings the CPU state run
    overrides; ``estimated`` the models whose state comes from an estimate (too large to measure on CPU
    in minutes; an estimate's state is exact); ``gpu_runs`` committed CUDA runs under reports/gpu/ that
    peak cells take first; ``estimate`` the GPU peaks are estimated for otherwise.
    """

    name: str
    paper: str
    title: str
    source: str
    cells: list[Cell]
    estimate: Estimate
    cpu: dict = field(default_factory=lambda: {"steps": 1, "batch_size": 1, "seq_len": 32})
    estimated: tuple[str, ...] = ()
    gpu_runs: tuple[str, ...] = ()
    explanation: list[str] = field(default_factory=list)
    inconsistencies: list[str] = field(default_factory=list)

    @property
    def runs(self) -> list[Run]:
        return list(dict.fromkeys(run for c in self.cells for run in c.runs))


# -- a record's quantities -----------------------------------------------------------------------------
def block_rounded(sizes: Iterable[int], block: int = BLOCK) -> int:
    """Total bytes with every non-empty allocation rounded up to a multiple of ``block``."""
    return sum(math.ceil(n / block) * block for n in sizes if n > 0)


def quantities(record: "RunRecord") -> dict[str, int | None]:
    """The byte totals a cell can be compared with (``QUANTITY_TEXT``), from one run record."""
    steady: dict[str, int] = {}
    for row in record.breakdown:
        steady[row.category] = steady.get(row.category, 0) + row.bytes
    model = steady.get("weights", 0) + steady.get("buffers", 0)
    state = steady.get("optimizer_state", 0)
    tensors = [(k, n) for p in record.parameters for k, n in p.by_key.items() if k not in HOST_KEYS]
    return {
        "state": state,
        "model_state": model + state,
        "model_grads_state": model + steady.get("gradients", 0) + state,
        "state_blocks": block_rounded(n for _, n in tensors) if tensors else None,
        "state_blocks_exact_sign": (block_rounded(n for k, n in tensors if k != "sign")
                                    + sum(n for k, n in tensors if k == "sign")) if tensors else None,
        "peak": record.peaks.allocated,
    }


# -- agreement -----------------------------------------------------------------------------------------
class Printed(float):
    """A paper number with the digits it was printed with: ``Printed("0.70")`` is 0.7 printed to ±0.005."""

    text: str

    def __new__(cls, text: str) -> "Printed":
        number = super().__new__(cls, text)
        number.text = text
        return number


def printed(value: float | str) -> str:
    """The paper number as the paper printed it (a plain float: its shortest form, 5.0 → "5")."""
    return value if isinstance(value, str) else getattr(value, "text", f"{value:g}")


def printed_half_unit(value: float | str) -> float:
    """Half a unit of the last digit the paper printed: 9 → 0.5, 3.7 → 0.05, "0.70" → 0.005."""
    exponent = Decimal(printed(value)).as_tuple().exponent
    return 0.5 * 10.0 ** min(int(exponent), 0) if isinstance(exponent, int) else 0.0


def allowed(paper: float | str, tolerance: tuple[str, float]) -> float:
    """The largest |memprof − paper| that counts as agreement: an absolute tolerance as given, or a relative
    one, but never less than the paper's own rounding (a printed "9" means 8.5 to 9.5)."""
    kind, limit = tolerance
    if kind == "abs":
        return limit
    return max(limit / 100 * abs(float(paper)), printed_half_unit(paper))


def tolerance_text(paper: float, tolerance: tuple[str, float], unit: str) -> str:
    kind, limit = tolerance
    if kind == "abs":
        return f"±{limit:g} {unit}"
    rounding = printed_half_unit(paper)
    if limit / 100 * abs(paper) >= rounding:
        return f"±{limit:g} %"
    return f"±{limit:g} % or the paper's rounding ±{rounding:g}"


def agreement_text(c: Cell, memprof: float) -> tuple[str, bool]:
    """"within ±2 %" or "OUTSIDE ±2 %" for a cell with a paper number, and whether it agrees."""
    agrees = abs(memprof - c.paper) <= allowed(c.paper, c.tolerance) + 1e-9
    return f"{'within' if agrees else 'OUTSIDE'} {tolerance_text(c.paper, c.tolerance, c.unit)}", agrees


BUCKETS = ("within 2 %", "within 10 %", "off", "missing")


def bucket(paper: float | str, memprof: float | None) -> str:
    """Where a paper cell (its number, or the text it was printed as) lands in the coverage: within 2 % (or the
    paper's printed rounding), within 10 % (or the rounding), further off, or missing (no memprof number)."""
    if memprof is None:
        return "missing"
    gap = abs(memprof - float(paper))
    for name, pct in (("within 2 %", 2.0), ("within 10 %", 10.0)):
        if gap <= allowed(paper, ("pct", pct)) + 1e-9:
            return name
    return "off"
