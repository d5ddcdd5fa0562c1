"""Set the memory tables of the papers beside memprof's measurements of the same runs.

    python reports/paper_tables.py NAME RUN.csv [--json RUN.json] [--out reports]

NAME is a reproduction (one of ``REPRODUCTIONS``, also the stem of ``reports/NAME.toml``); RUN.csv
is what ``memprof compare --config reports/NAME.toml --csv RUN.csv`` wrote. The script writes
``reports/NAME.csv`` (columns ``COLUMNS``: one row per paper cell) and ``reports/NAME.md`` (the
commands, the table, and what matched and what did not). With ``--json`` (the same run's
``--json`` file) it adds the "state in 512-B blocks" rows, which need the per-parameter state.

The paper numbers below are copied from the digests in shared/papers/ (each cell names its table).
memprof's number for a cell is one of these measured quantities of one run record (or the
difference of two records):

* ``state``: optimizer-state bytes (unique storages; identical on CPU and CUDA);
* ``state_blocks``: each state tensor of each parameter rounded up to the CUDA caching
  allocator's 512-B block, which is what ``torch.cuda.memory_allocated`` adds up (JSON only);
* ``state_blocks_exact_sign``: the same, but a ``sign`` tensor counted at its exact bytes (one
  bit per element), as a figure computed rather than allocated would count it (JSON only);
* ``model_grads_state``: weights + buffers + gradients + optimizer state (after the step);
* ``model_state``: weights + buffers + optimizer state (gradients freed);
* ``peak``: the global peak of allocated bytes, taken from CUDA runs only; a CPU run leaves the
  cell "pending GPU run" (its peak is simulated, and kernels and workspaces differ).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Iterable, Sequence

COLUMNS = ("table", "model", "optimizer", "quantity", "paper", "memprof", "diff", "diff_pct", "note")
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "MB": 10**6, "GB": 10**9, "×": 1}
BLOCK = 512  # bytes: the CUDA caching allocator rounds every allocation up to a multiple of this
PENDING = "pending GPU run"
QUANTITIES = ("state", "state_blocks", "state_blocks_exact_sign", "model_grads_state", "model_state", "peak")
QUANTITY_TEXT = {
    "state": "optimizer state",
    "state_blocks": "optimizer state in 512-B blocks",
    "state_blocks_exact_sign": "state in 512-B blocks, sign at 1 bit/element",
    "model_grads_state": "weights+grads+state",
    "model_state": "weights+state",
    "peak": "peak allocated",
}
REPORTS = Path(__file__).resolve().parent


# -- what a paper says -----------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One measured record: the memprof model name (and class count) and the optimizer spec."""

    model: str
    spec: str
    num_classes: int | None = None


@dataclass(frozen=True)
class Cell:
    """One paper number and the memprof quantity it is compared with.

    ``terms`` are (sign, Run): one term for a plain cell, two for a difference between optimizers.
    ``paper`` is None where the paper has no cell (a memprof-only row). ``tolerance`` is the
    agreement asked for: ("pct", 2.0) or ("abs", 0.1) in ``unit``.
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
    ratio: bool = False  # two terms: the first over the second (unit "×"), not their difference

    def __post_init__(self) -> None:
        if self.quantity not in QUANTITIES or self.unit not in UNITS:
            raise ValueError(f"Invalid cell: quantity {self.quantity!r}, unit {self.unit!r}")


@dataclass
class Reproduction:
    """One paper table: its cells, the commands that measure it, and what its comparison shows."""

    name: str
    title: str
    source: str
    cpu_command: str
    gpu_command: str
    cells: list[Cell]
    explanation: list[str] = field(default_factory=list)


def cell(table: str, model: str, optimizer: str, run: Run, quantity: str, paper: float | None, unit: str,
         tolerance: tuple[str, float] = ("pct", 2.0), label: str = "", note: str = "") -> Cell:
    return Cell(table, model, optimizer, quantity, ((1, run),), paper, unit, tolerance, label, note)


def difference(table: str, model: str, optimizer: str, minuend: Run, subtrahend: Run, quantity: str,
               paper: float | None, unit: str, tolerance: tuple[str, float] = ("pct", 2.0), label: str = "",
               note: str = "") -> Cell:
    return Cell(table, model, optimizer, quantity, ((1, minuend), (-1, subtrahend)), paper, unit, tolerance,
                label, note)


# -- what memprof measured -------------------------------------------------------------------
Key = tuple[str, str, int | None]  # (model, spec, num_classes) of one run record


def _int_or_none(text: str | None) -> int | None:
    return int(float(text)) if text not in (None, "", "nan", "None") else None


def read_csv(path: str | Path) -> dict[Key, dict]:
    """Per record (model, spec, num_classes): its device, status and byte totals of each quantity."""
    with open(path, newline="") as handle:
        return measured_from_rows(csv.DictReader(handle))


def measured_from_rows(rows: Iterable[dict]) -> dict[Key, dict]:
    """Sum memprof's tidy rows (the CSV columns) into the quantities of ``QUANTITIES``."""
    out: dict[Key, dict] = {}
    for row in rows:
        key = (row["model"], row["spec"], _int_or_none(row.get("num_classes")))
        record = out.setdefault(key, {"device": row["device"], "status": row["status"], "steady": {}, "peak": {}})
        if row.get("bytes") in (None, ""):
            continue
        totals = record[row["measure"]]
        totals[row["category"]] = totals.get(row["category"], 0) + int(float(row["bytes"]))
    for record in out.values():
        steady, at_peak = record.pop("steady"), record.pop("peak")
        model = steady.get("weights", 0) + steady.get("buffers", 0)
        state = steady.get("optimizer_state", 0)
        record["state"] = state
        record["model_state"] = model + state
        record["model_grads_state"] = model + steady.get("gradients", 0) + state
        # allocator (reserved - allocated) and context (driver) rows are not allocated bytes
        record["peak"] = sum(v for k, v in at_peak.items() if k not in ("allocator", "context")) or None
    return out


# torch's Adam/AdamW keep ``step`` as a CPU tensor unless fused or capturable: it takes no CUDA block.
HOST_KEYS = ("step",)


def add_block_rounded_state(measured: dict[Key, dict], json_path: str | Path) -> None:
    """Add ``state_blocks`` and ``state_blocks_exact_sign`` to the records of ``measured`` from the
    per-parameter state (``parameters[].by_key``) in the run's JSON."""
    data = json.loads(Path(json_path).read_text())
    for record in data["records"] if isinstance(data, dict) and "records" in data else [data]:
        s = record["settings"]
        key = (s["model"], s["spec"], s.get("num_classes"))
        if key not in measured:
            continue
        tensors = [(k, n) for p in record.get("parameters", []) for k, n in p["by_key"].items() if k not in HOST_KEYS]
        measured[key]["state_blocks"] = block_rounded(n for _, n in tensors)
        measured[key]["state_blocks_exact_sign"] = (block_rounded(n for k, n in tensors if k != "sign")
                                                    + sum(n for k, n in tensors if k == "sign"))


def block_rounded(sizes: Iterable[int], block: int = BLOCK) -> int:
    """Total bytes with every non-empty allocation rounded up to a multiple of ``block``."""
    return sum(math.ceil(n / block) * block for n in sizes if n > 0)


# -- paper against measurement ---------------------------------------------------------------
def value_of(c: Cell, measured: dict[Key, dict]) -> float | str | None:
    """memprof's number for a cell in the cell's unit, ``PENDING`` for a peak of a CPU run, None if missing."""
    values = []
    for _, run in c.terms:
        record = measured.get((run.model, run.spec, run.num_classes))
        if record is None or record["status"] != "ok":
            return None
        if c.quantity == "peak" and not str(record["device"]).startswith("cuda"):
            return PENDING
        if record.get(c.quantity) is None:
            return None
        values.append(record[c.quantity])
    if c.ratio:
        return values[0] / values[1]
    return sum(sign * v for (sign, _), v in zip(c.terms, values)) / UNITS[c.unit]


def printed_half_unit(value: float) -> float:
    """Half a unit of the last digit the paper printed: 9 → 0.5, 3.7 → 0.05, 949.7 → 0.05."""
    exponent = Decimal(repr(value)).normalize().as_tuple().exponent
    return 0.5 * 10.0 ** min(int(exponent), 0) if isinstance(exponent, int) else 0.0


def allowed(c: Cell) -> float:
    """The largest |memprof − paper| that counts as agreement: an absolute tolerance as given, or a
    relative one, but never less than the paper's own rounding (a printed "9" means 8.5 to 9.5)."""
    kind, limit = c.tolerance
    if kind == "abs":
        return limit
    return max(limit / 100 * abs(c.paper), printed_half_unit(c.paper))


def agrees(c: Cell, memprof: float) -> bool:
    return abs(memprof - c.paper) <= allowed(c) + 1e-9


def tolerance_text(c: Cell) -> str:
    kind, limit = c.tolerance
    if kind == "abs":
        return f"±{limit:g} {c.unit}"
    rounding = printed_half_unit(c.paper)
    if limit / 100 * abs(c.paper) >= rounding:
        return f"±{limit:g} %"
    return f"±{limit:g} % or the paper's rounding ±{rounding:g}"


def compare(cells: Sequence[Cell], measured: dict[Key, dict]) -> list[dict]:
    """One output row per cell: paper, memprof, diff (memprof − paper), diff_pct and a note."""
    rows = []
    for c in cells:
        memprof = value_of(c, measured)
        quantity = f"{c.label or QUANTITY_TEXT[c.quantity]} [{c.unit}]"
        row = {"table": c.table, "model": c.model, "optimizer": c.optimizer, "quantity": quantity,
               "paper": "" if c.paper is None else f"{c.paper:g}", "memprof": "", "diff": "", "diff_pct": ""}
        verdict = ""
        if memprof is None:
            verdict = "not measured (run missing or failed)"
        elif memprof == PENDING:
            row["memprof"] = PENDING
        else:
            row["memprof"] = f"{memprof:.3f}"
            if c.paper is not None:
                diff = memprof - c.paper
                row["diff"] = f"{diff:+.3f}"
                row["diff_pct"] = f"{100 * diff / abs(c.paper):+.1f}" if c.paper else ""
                verdict = (f"within {tolerance_text(c)}" if agrees(c, memprof) else f"OUTSIDE {tolerance_text(c)}")
        row["note"] = "; ".join(part for part in (verdict, c.note) if part)
        rows.append(row)
    return rows


def to_csv_text(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def summary(rows: Sequence[dict]) -> list[str]:
    """Per quantity, how many compared cells agree within their tolerance; then each one that does not."""
    compared = [r for r in rows if r["note"].startswith(("within", "OUTSIDE"))]
    outside = [r for r in compared if r["note"].startswith("OUTSIDE")]
    pending = [r for r in rows if r["memprof"] == PENDING]
    missing = [r for r in rows if r["note"].startswith("not measured")]
    counts: dict[str, list[int]] = {}
    for r in compared:
        agree_total = counts.setdefault(r["quantity"], [0, 0])
        agree_total[0] += not r["note"].startswith("OUTSIDE")
        agree_total[1] += 1
    lines = ["Agreement per quantity: " + "; ".join(f"{q}: {a} of {n}" for q, (a, n) in counts.items())
             + (f". {len(pending)} peak cells are {PENDING}" if pending else "")
             + (f". {len(missing)} cells not measured" if missing else "") + "."]
    for r in outside:
        lines.append(f"Outside: {r['table']}, {r['model']}, {r['optimizer']}, {r['quantity']}: paper {r['paper']}, "
                     f"memprof {r['memprof']} ({r['diff_pct']} %).")
    return lines


def to_markdown(repro: Reproduction, rows: Sequence[dict], run_csv: str, run_json: str | None,
                provenance: str) -> str:
    script = f"python reports/paper_tables.py {repro.name} {run_csv}" + (f" --json {run_json}" if run_json else "")
    made, other = ((("GPU run at the paper's settings (what the table below was made from):", repro.gpu_command),
                    ("State only, on CPU:", repro.cpu_command))
                   if "device cuda" in provenance else
                   (("State on CPU (what the table below was made from):", repro.cpu_command),
                    ("Peak memory on a GPU (the paper's batch and sequence settings):", repro.gpu_command)))
    out = [f"# {repro.title}", "", repro.source, "",
           "## Commands", "", made[0], "", "```bash", made[1], script, "```", "", other[0], "",
           "```bash", other[1], "```", "", f"Measured with: {provenance}", "",
           "## Paper against memprof", "",
           "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        out.append("| " + " | ".join(str(r[c]).replace("|", "\\|") for c in COLUMNS) + " |")
    out += ["", "`diff` is memprof − paper in the row's unit; `diff_pct` is relative to the paper.", "",
            "## What matched, what did not, and why", ""]
    out += [f"- {line}" for line in summary(rows)]
    out += [f"- {line}" for line in repro.explanation]
    return "\n".join(out) + "\n"


def provenance_of(path: str | Path) -> str:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    def distinct(column: str) -> str:
        return ", ".join(dict.fromkeys(r.get(column) or "n/a" for r in rows))
    return (f"memprof {distinct('memprof')}, torch {distinct('torch')}, device {distinct('device')}, "
            f"batch {distinct('batch_size')}, seq_len {distinct('seq_len')}, image {distinct('image_size')}, "
            f"steps {distinct('steps')}")


# -- the papers ------------------------------------------------------------------------------
SMMF_OPTS = (("Adam", "adam"), ("Adafactor", "hf_adafactor:beta1=0.9"), ("SM3", "sm3"), ("CAME", "came"),
             ("SMMF", "smmf"))
SMMF_SIGN8 = ("SMMF (8-bit signs)", "smmf:sign_bits=8")


E2E_NOTES = {
    ("ResNet-50, CIFAR-100", "SM3"): ("the paper's 227 is 134 MiB above its own optimizer memory (93), less than "
                                      "the 181 MiB of weights and gradients every other CIFAR ResNet-50 cell adds: "
                                      "an error in the paper"),
}


def _smmf_table1() -> Reproduction:
    # (label, model, classes): optimizer MiB and end-to-end MiB per optimizer (Adam, Adafactor, SM3, CAME, SMMF)
    table = (
        ("ResNet-50, ImageNet", "resnet50", None, (195, 220, 99, 346, 3.7), (394, 419, 298, 546, 197)),
        ("MobileNetV2, ImageNet", "mobilenet_v2", None, (27, 30, 14, 47, 0.8), (54, 58, 41, 75, 28)),
        ("ResNet-50, CIFAR-100", "resnet50", 100, (184, 215, 93, 340, 3.5), (366, 397, 227, 526, 185)),
        ("MobileNetV2, CIFAR-100", "mobilenet_v2", 100, (18, 26, 9, 43, 0.7), (36, 43, 27, 60, 19)),
    )
    cells = []
    for label, model, classes, state, e2e in table:
        for (name, spec), paper, paper_e2e in zip(SMMF_OPTS, state, e2e):
            run = Run(model, spec, classes)
            note = "SMMF at 1-bit signs" if spec == "smmf" else ""
            cells.append(cell("SMMF T1", label, name, run, "state", paper, "MiB", note=note))
            cells.append(cell("SMMF T1", label, name, run, "state_blocks", paper, "MiB"))
            if spec == "smmf":
                cells.append(cell("SMMF T1", label, name, run, "state_blocks_exact_sign", paper, "MiB"))
            cells.append(cell("SMMF T1", label, name, run, "model_grads_state", paper_e2e, "MiB",
                              label="end-to-end vs weights+grads+state", note=E2E_NOTES.get((label, name), "")))
        sign8 = Run(model, SMMF_SIGN8[1], classes)
        cells.append(cell("SMMF T1", label, SMMF_SIGN8[0], sign8, "state", None, "MiB",
                          note="no paper cell: the official code's torch.bool sign"))
    cells.append(Cell("SMMF §5.3", "ResNet-50, ImageNet", "Adam ÷ SMMF (8-bit signs)", "state",
                      ((1, Run("resnet50", "adam")), (1, Run("resnet50", SMMF_SIGN8[1]))), 7.8, "×",
                      label="\"memory reduction\", state ratio", ratio=True,
                      note="§5.3 quotes 7.8× next to the 8-bit-sign timings"))
    return Reproduction(
        name="smmf-table1",
        title="SMMF Table 1: optimizer memory of ResNet-50 and MobileNetV2",
        source=("Park & Lee, SMMF (AAAI 2025), Table 1 (cells \"(optimizer, end-to-end) memory [MiB]\"); "
                "paper numbers from shared/papers/smmf-digest.md §3. \"Adafactor\" is the HF/fairseq one with "
                "β1 = 0.9 (digest §2.3): `hf_adafactor:beta1=0.9`."),
        cpu_command=("memprof compare --config reports/smmf-table1.toml --device cpu --steps 1 --batch-size 2 "
                     "--image-size 32 --csv /tmp/smmf-table1.csv --json /tmp/smmf-table1.json"),
        gpu_command="memprof compare --config reports/smmf-table1.toml --device cuda --csv smmf-table1-gpu.csv",
        cells=cells,
        explanation=[
            "Batch 2 at 32×32 instead of the paper's 128 at 224: optimizer state, weights and gradients do not "
            "depend on either (batch 1 would break BatchNorm at ResNet-50's 1×1 last stage).",
            "Baselines: memprof's exact state bytes of Adam, Adafactor (β1 = 0.9, factored over the last two axes "
            "only, so a 1×1 conv costs two floats per weight, more than Adam's v), SM3 (momentum + one accumulator "
            "per axis) and CAME (momentum + two factored statistics) agree with the ImageNet cells within 2 % (or "
            "the paper's rounding). The ResNet-50/CIFAR-100 cells sit 1.4–2.3 % above the exact state for all "
            "four, Adam included (184 vs 180.9 MiB), whose layout leaves nothing to interpret: those readings hold "
            "3–7 MiB that are not optimizer state. The two baseline cells outside (ResNet-50/CIFAR SM3 +2.3 %, "
            "MobileNetV2/CIFAR CAME +2.6 %) are of this kind. "
            "Rounding each tensor to the allocator's 512-B block changes the baselines by < 0.2 MiB.",
            "SMMF at 1-bit signs: the exact bytes (four fp32 factor vectors and ⌈N/8⌉ sign bytes per parameter) "
            "are 4–38 % below the paper, and rounding every tensor to 512 B overshoots MobileNetV2 (0.86 vs 0.8). "
            "Rounding only the fp32 factor vectors to 512-B blocks and counting the sign at exactly one bit per "
            "element reproduces all four cells at the paper's precision (row \"state in 512-B blocks, sign at 1 "
            "bit/element\"). So the paper measured the factor vectors as allocated on the GPU and added the sign "
            "as N/8 bytes computed, not allocated: the released code has no 1-bit packing (digest §5).",
            "With the released code's 1-byte `torch.bool` sign (`smmf:sign_bits=8`, no paper cell) SMMF holds "
            "24.9 MiB on ResNet-50, and Adam ÷ that is the 7.8× \"memory reduction\" of §5.3: §5.3 refers to the "
            "8-bit sign, the tables to the 1-bit one.",
            "\"End-to-end\" agrees with weights + gradients + optimizer state (no activations) in most cells: it "
            "is the live memory after a step, not a peak. ResNet-50/CIFAR-100/SM3 (227 MiB) is an error in the "
            "paper: 227 − 93 leaves 134 MiB for weights and gradients, where every other CIFAR ResNet-50 cell "
            "leaves 181.",
        ],
    )


GLUE_TASKS = ("QNLI", "MNLI", "QQP", "STSB", "MRPC")


def _smmf_glue(name: str, table: str, models: Sequence[tuple[str, str, dict[str, Sequence[float]], Sequence[float]]],
               title: str, source: str, explanation: list[str]) -> Reproduction:
    cells = []
    for label, model, state, e2e in models:
        for (opt, spec), paper_e2e in zip(SMMF_OPTS, e2e):
            run = Run(model, spec)
            for task, paper in zip(GLUE_TASKS, state[opt]):
                cells.append(cell(table, label, opt, run, "state", paper, "MiB", label=f"optimizer memory, {task}"))
            typical = max(set(state[opt]), key=state[opt].count)
            cells.append(cell(table, label, opt, run, "state_blocks", typical, "MiB",
                              label="optimizer memory (most frequent task value), 512-B blocks"))
            if spec == "smmf":
                cells.append(cell(table, label, opt, run, "state_blocks_exact_sign", typical, "MiB"))
            cells.append(cell(table, label, opt, run, "model_grads_state", paper_e2e, "GiB",
                              label="end-to-end vs weights+grads+state"))
        cells.append(cell(table, label, SMMF_SIGN8[0], Run(model, SMMF_SIGN8[1]), "state", None, "MiB",
                          note="no paper cell: the official code's torch.bool sign"))
    return Reproduction(
        name=name, title=title, source=source,
        cpu_command=(f"memprof compare --config reports/{name}.toml --device cpu --steps 1 --batch-size 1 "
                     f"--seq-len 32 --csv /tmp/{name}.csv --json /tmp/{name}.json"),
        gpu_command=f"memprof compare --config reports/{name}.toml --device cuda --csv {name}-gpu.csv",
        cells=cells, explanation=explanation)


def _smmf_table4() -> Reproduction:
    gpt2 = {"Adam": (957, 952, 973, 962, 861), "Adafactor": (478, 478, 488, 481, 481),
            "SM3": (478, 478, 487, 481, 481), "CAME": (468, 479, 489, 481, 478), "SMMF": (16,) * 5}
    t5 = {"Adam": (464, 464, 434, 456, 464), "Adafactor": (233,) * 5, "SM3": (233,) * 5,
          "CAME": (233, 234, 233, 233, 234), "SMMF": (8,) * 5}
    return _smmf_glue(
        "smmf-table4", "SMMF T4",
        (("GPT-2 (124M)", "gpt2", gpt2, (1.89, 1.43, 1.43, 1.43, 0.96)),
         ("T5-small", "t5-small", t5, (0.92, 0.70, 0.70, 0.70, 0.47))),
        "SMMF Table 4: optimizer memory of GPT-2 and T5-small fine-tuned on GLUE",
        ("Park & Lee, SMMF (AAAI 2025), Table 4 (\"(optimizer memory [MiB], end-to-end [GiB])\" per GLUE task); "
         "paper numbers from shared/papers/smmf-digest.md §3. The LLaMA-7b + LoRA rows are not reproduced "
         "(LoRA adapters; memprof has no LoRA model)."),
        [
            "memprof's built-in `gpt2` (LM head tied to the embedding) and `t5-small` (T5ForConditionalGeneration) "
            "stand in for the GLUE models: GPT2ForSequenceClassification adds 1,536 parameters (0.01 MiB of Adam "
            "state), T5ForSequenceClassification 263,682 (2.0 MiB of Adam state, which would lift memprof's T5 "
            "Adam from 461.6 to 463.6 MiB, the paper's 464). memprof cannot build T5ForSequenceClassification "
            "with random token ids (it needs the same number of EOS tokens in every row).",
            "The paper is not self-consistent: the same model and optimizer get different optimizer memory on "
            "different tasks (GPT-2 Adam 861–973 MiB, T5 Adam 434–464, GPT-2 CAME 468–489), although the state "
            "depends only on the parameter shapes. The cells outside 2 % (listed above: GPT-2's QQP column, "
            "GPT-2 Adam on MRPC, T5 Adam on QQP) are such readings; they cannot be optimizer state alone and "
            "must include whatever else was allocated when the reading was taken. CAME below Adafactor (GPT-2 QNLI "
            "468 vs 478) is impossible for the state itself: CAME keeps Adafactor's state plus a second pair of "
            "factored vectors.",
            "In every model the most frequent task value agrees with memprof's state within 2 % (or the paper's "
            "rounding), SMMF (1-bit signs) included.",
            "End-to-end is weights + gradients + state (no activations) plus 0.02–0.04 GiB, as in Table 1; the "
            "rows outside 2 % are those few percent.",
        ])


def _smmf_table6() -> Reproduction:
    bert = {"Adam": (849, 837, 848, 846, 854), "Adafactor": (425, 420, 424, 424, 428),
            "SM3": (425, 420, 423, 424, 428), "CAME": (426, 421, 425, 425, 429), "SMMF": (15,) * 5}
    return _smmf_glue(
        "smmf-table6", "SMMF T6",
        (("BERT-base", "bert-base-uncased", bert, (1.65, 1.24, 1.24, 1.24, 0.83)),),
        "SMMF Table 6: optimizer memory of BERT-base fine-tuned on GLUE",
        ("Park & Lee, SMMF (AAAI 2025), Table 6 (\"(optimizer memory [MiB], end-to-end [GiB])\" per GLUE task); "
         "paper numbers from shared/papers/smmf-digest.md §3."),
        [
            "memprof's built-in `bert-base-uncased` has the masked-LM head (109,514,298 parameters); "
            "BertForSequenceClassification has 109,483,778, 0.03 % fewer: 0.23 MiB of Adam state.",
            "The paper is not self-consistent: BERT's Adam state reads 837–854 MiB depending on the task, and "
            "SMMF 15 MiB here but 14 MiB in Table 8, though the state depends only on the parameter shapes. The "
            "most frequent task values agree with memprof within 2 % (or the paper's rounding); the other cells "
            "sit up to 2.2 % above the exact state (every MRPC cell): readings that include more than the "
            "optimizer's tensors. SMMF's 15 MiB is within the paper's rounding only with 512-B blocks.",
            "End-to-end agrees with weights + gradients + state within 1.2 %.",
        ])


def _smmf_table8() -> Reproduction:
    # label, memprof model, optimizer MiB per optimizer, end-to-end MiB per optimizer
    table = (
        ("RoBERTa-base", "roberta-base", (972, 488, 488, 488, 16.3), (1440, 967, 968, 967, 507)),
        ("ALBERT-base-v2", "albert-base-v2", (85, 43, 43, 43, 1.5), (146, 102, 102, 103, 61)),
        ("BERT-base", "bert-base-uncased", (856, 430, 430, 430, 14), (1270, 850, 850, 850, 450)),
        ("GPT-2 (124M)", "gpt2", (957, 483, 483, 484, 16), (1454, 983, 983, 983, 522)),
    )
    cells = []
    for label, model, state, e2e in table:
        for (opt, spec), paper, paper_e2e in zip(SMMF_OPTS, state, e2e):
            run = Run(model, spec)
            cells.append(cell("SMMF T8", label, opt, run, "state", paper, "MiB"))
            cells.append(cell("SMMF T8", label, opt, run, "state_blocks", paper, "MiB"))
            if spec == "smmf":
                cells.append(cell("SMMF T8", label, opt, run, "state_blocks_exact_sign", paper, "MiB"))
            cells.append(cell("SMMF T8", label, opt, run, "model_state", paper_e2e, "MiB",
                              label="end-to-end vs weights+state"))
            cells.append(cell("SMMF T8", label, opt, run, "model_grads_state", paper_e2e, "MiB",
                              label="end-to-end vs weights+grads+state"))
        cells.append(cell("SMMF T8", label, SMMF_SIGN8[0], Run(model, SMMF_SIGN8[1]), "state", None, "MiB",
                          note="no paper cell: the official code's torch.bool sign"))
    return Reproduction(
        name="smmf-table8",
        title="SMMF Table 8: optimizer memory on SQuAD (RoBERTa, ALBERT, BERT, GPT-2)",
        source=("Park & Lee, SMMF (AAAI 2025), Table 8 (\"(optimizer, end-to-end) [MiB]\", SQuAD F1); paper "
                "numbers from shared/papers/smmf-digest.md §3."),
        cpu_command=("memprof compare --config reports/smmf-table8.toml --device cpu --steps 1 --batch-size 1 "
                     "--seq-len 32 --csv /tmp/smmf-table8.csv --json /tmp/smmf-table8.json"),
        gpu_command="memprof compare --config reports/smmf-table8.toml --device cuda --csv smmf-table8-gpu.csv",
        cells=cells,
        explanation=[
            "memprof's built-ins carry masked-LM heads; the paper's SQuAD models carry a 768×2 span head. "
            "Parameters: RoBERTa 124,697,433 vs 124,056,578 (QA, no pooler), BERT 109,514,298 vs 108,893,186, "
            "ALBERT 11,221,680 vs 11,094,530, GPT-2 identical. memprof therefore holds 0.5–1.1 % more state "
            "than the QA encoders.",
            "ALBERT, GPT-2 and every SMMF cell agree with the exact state. The RoBERTa and BERT baselines are "
            "2.0–2.5 % above it even with the larger MLM heads (2.7–3.2 % with the QA heads): about 10 MiB per "
            "full-size state tensor (Adam +20, the others +10). The same BERT reads 837–854 (Adam) and 420–428 "
            "MiB (Adafactor) in Table 6, so this is within the paper's own spread for one model, not a layout "
            "difference.",
            "Table 8's end-to-end is not weights + gradients + state (that is 400–460 MiB more than the paper "
            "for BERT, RoBERTa and GPT-2): it is weights + optimizer state plus a constant 12–32 MiB per model, "
            "i.e. it was read with the gradients freed (`zero_grad(set_to_none=True)`), unlike Tables 1, 4 "
            "and 6. The constant (the batch and workspaces) is why the rows with small totals (ALBERT, every "
            "SMMF) and GPT-2's (a 30–32 MiB constant) miss 2 %.",
        ],
    )


def _adapprox_table2() -> Reproduction:
    cfg117 = "reports/configs/gpt2-117m-megatron/config.json"
    cfg345 = "reports/configs/gpt2-345m-megatron/config.json"
    rows = (  # beta1, name, spec, 117M, 345M
        (0.9, "AdamW", "adamw", 949.7, 2707.5),
        (0.9, "Adafactor", "hf_adafactor:beta1=0.9", 476.1, 1356.7),
        (0.9, "CAME", "came", 476.8, 1358.4),
        (0.0, "AdamW", "adamw:betas=(0.0,0.999)", 949.7, 2707.5),
        (0.0, "Adafactor", "hf_adafactor", 1.2, 2.9),
    )
    cells = []
    for beta1, name, spec, p117, p345 in rows:
        for label, model, paper in (("GPT-2 117M (vocab 50,304)", cfg117, p117),
                                    ("GPT-2 345M (vocab 50,304)", cfg345, p345)):
            cells.append(cell("Adapprox T2", label, f"{name} (β1 = {beta1:g})", Run(model, spec), "state", paper,
                              "MiB", tolerance=("abs", 0.1)))
    return Reproduction(
        name="adapprox-table2",
        title="Adapprox Table 2: optimizer-state memory of GPT-2 117M and 345M",
        source=("Zhao et al., Adapprox (arXiv 2403.14958), Table 2 (\"Quantitative memory usage (MB)\"); paper "
                "numbers from shared/papers/adapprox-digest.md §3. Megatron GPT-2 with the vocabulary padded to "
                "50,304: reports/configs/gpt2-{117m,345m}-megatron/config.json. The Adapprox rows (k_init, k_max) "
                "and CAME at β1 = 0 (\"—\" in the paper) are not part of this reproduction."),
        cpu_command=("memprof compare --config reports/adapprox-table2.toml --device cpu --steps 1 --batch-size 1 "
                     "--seq-len 32 --csv /tmp/adapprox-table2.csv --json /tmp/adapprox-table2.json"),
        gpu_command="memprof compare --config reports/adapprox-table2.toml --device cuda --csv adapprox-table2-gpu.csv",
        cells=cells,
        explanation=[
            "All ten cells agree to 0.05 MiB. The paper's \"MB\" is MiB, its state is fp32, and its Adafactor is "
            "the HF/fairseq one: a first moment only with β1 > 0, a dense second moment for 1-D tensors, row and "
            "column factors for every ≥2-D tensor including the embeddings. CAME matches the official layout "
            "(pytorch_optimizer's is the same: momentum, two factored statistics, dense for 1-D).",
            "AdamW at β1 = 0 still allocates its first moment, so its row equals β1 = 0.9, as the paper says.",
            "The vocabulary must be Megatron's 50,304 (50,257 padded to a multiple of 128): with HF's 50,257 the "
            "AdamW cells would be 0.28 MiB (117M) and 0.37 MiB (345M) lower and miss the 0.1 MiB target.",
        ],
    )


def _alada_table4() -> Reproduction:
    cells = []
    peaks = (("GPT2-Small + LM (bsz 1, seq 1024)", "gpt2", (3.483, 2.534, 2.571)),
             ("T5-Small + NMT (bsz 1)", "t5-small", (1.605, 1.155, 1.130)))
    opts = (("Adam", "adam"), ("Adafactor (β1 = 0)", "hf_adafactor"), ("Alada", "alada"))
    for label, model, values in peaks:
        for (name, spec), paper in zip(opts, values):
            run = Run(model, spec)
            cells.append(cell("Alada T4", label, name, run, "peak", paper, "GiB", note="the paper's GB read as GiB"))
            cells.append(cell("Alada T4", label, name, run, "state", None, "GiB"))
            cells.append(cell("Alada T4", label, name, run, "model_grads_state", None, "GiB"))
        adam, adafactor, alada = (Run(model, spec) for _, spec in opts)
        for unit in ("GiB", "GB"):
            cells.append(difference("Alada T4", label, "Adam − Adafactor", adam, adafactor, "state",
                                    round(values[0] - values[1], 3), unit, label="peak difference vs state difference",
                                    note=f"the paper's peak gap read as {unit} against memprof's state gap"))
        cells.append(difference("Alada T4", label, "Alada − Adafactor", alada, adafactor, "state",
                                round(values[2] - values[1], 3), "GiB", tolerance=("abs", 0.01),
                                label="peak difference vs state difference",
                                note="state cannot explain it: the gap is step transient or activations"))
    return Reproduction(
        name="alada-table4",
        title="Alada Table IV: peak memory of GPT2-Small and T5-Small",
        source=("Alada (arXiv 2512.13034), Table IV (\"Peak memory usage (GB)\", batch size 1, one A800); paper "
                "numbers from shared/papers/alada-digest.md §3.5. The GPT2-XL row is not reproduced here (1.56B "
                "parameters; run `--model gpt2-xl` on a GPU). The paper names neither the tool nor GB vs GiB."),
        cpu_command=("memprof compare --config reports/alada-table4.toml --device cpu --steps 1 --batch-size 1 "
                     "--seq-len 32 --csv /tmp/alada-table4.csv --json /tmp/alada-table4.json"),
        gpu_command="memprof compare --config reports/alada-table4.toml --device cuda --csv reports/gpu/alada-table4.csv "
                    "--json reports/gpu/alada-table4.json",
        cells=cells,
        explanation=[
            "Peaks come from one H100 run at the paper's batch 1 and sequence 1024 for GPT-2 (T5's NMT lengths "
            "are not stated; 128 is assumed). memprof's GPT-2 peaks sit 0.48 GiB under the paper's for Adam and "
            "Adafactor but within 1.8 % for Alada. 0.46 GiB is exactly GPT-2's gradients: memprof's loop frees "
            "gradients at zero_grad (set_to_none), Alada cannot (its momentum lives in the gradient buffer). The "
            "paper's numbers fit baselines whose gradients stayed allocated through the next forward "
            "(zero_grad(set_to_none=False), as older HF Trainer versions did). T5's offsets (0.46–0.52 GiB) are "
            "larger than its 0.23 GiB of gradients, so the assumed sequence length is also off there.",
            "Which measurement the paper's ratios follow: the Adam − Adafactor peak gap is the gap in optimizer "
            "state (Adam's two fp32 moments) when \"GB\" is read as GiB: T5 0.450 vs 0.450, GPT-2 0.949 vs 0.926 "
            "(2.4 % more in the paper). Read as 10⁹ B the state gaps are 0.484 and 0.994, 5–8 % off. So the "
            "table reports peak allocated memory in GiB, and Adam's peak exceeds Adafactor's by its state.",
            "Alada and Adafactor (β1 = 0) hold the same state within 1 MiB (factor vectors only; Alada keeps its "
            "first moment in the gradient buffer), yet the paper's peaks differ by +0.037 (GPT-2) and −0.025 GiB "
            "(T5). State cannot explain that. In memprof's GPU run the Adam − Adafactor peak gap is 0.945 GiB on "
            "GPT-2 (paper 0.949), and Alada's peak is 0.47 GiB above Adafactor's because its gradient buffer "
            "(the momentum) is live through the forward pass — which is where the peak falls.",
        ],
    )


def _io_adam_table2() -> Reproduction:
    model = "reports/configs/roberta-base-cola/config.json"
    label = "RoBERTa-base, CoLA (bsz 16)"
    opts = (("AdamW", "adamw", 2409.89), ("Adafactor", "hf_adafactor", 1133.41),
            ("GaLore (rank 16)", "galore:rank=16", 1768.14), ("IO-Adam (b = 16)", "io_adam:buffer_size=16", 1599.61))
    cells = []
    for name, spec, paper in opts:
        run = Run(model, spec)
        cells.append(cell("IO-Adam T2", label, name, run, "peak", paper, "MiB", note="paper's MB read as MiB"))
        cells.append(cell("IO-Adam T2", label, name, run, "state", None, "MiB"))
        cells.append(cell("IO-Adam T2", label, name, run, "model_grads_state", None, "MiB"))
    adamw = Run(model, "adamw")
    for name, spec, paper in opts[1:]:
        cells.append(difference("IO-Adam T2", label, f"{name} − AdamW", Run(model, spec), adamw, "model_grads_state",
                                round(paper - opts[0][2], 2), "MiB",
                                label="peak difference vs weights+grads+state difference"))
    return Reproduction(
        name="io-adam-table2",
        title="IO-Adam Table 2: peak memory of RoBERTa-base fine-tuned on CoLA",
        source=("IO-Adam, Table 2 (\"peak memory allocation … collected on CoLA with a batch size of 16\", MB); "
                "paper numbers from shared/papers/io-adam-digest.md §3.1. Model: "
                "reports/configs/roberta-base-cola/config.json (RobertaForSequenceClassification, 2 labels)."),
        cpu_command=("memprof compare --config reports/io-adam-table2.toml --device cpu --steps 1 --batch-size 1 "
                     "--seq-len 32 --csv /tmp/io-adam-table2.csv --json /tmp/io-adam-table2.json"),
        gpu_command="memprof compare --config reports/io-adam-table2.toml --device cuda --csv reports/gpu/io-adam-table2.csv "
                    "--json reports/gpu/io-adam-table2.json",
        cells=cells,
        explanation=[
            "The paper states neither the tool, the sequence length (128 assumed: run_glue's default max length; "
            "CoLA sentences are short) nor the precision (fp32 assumed). The peaks come from one H100 run at batch 16; "
            "memprof's are 11–54 % above the paper's, so the paper did not report peak allocated memory at these "
            "settings: its numbers follow weights + gradients + state (next line), not the peak.",
            "Which measurement the ratios follow: the GaLore − AdamW gap equals the gap in weights + gradients + "
            "state within 1 %, but Adafactor's and IO-Adam's gaps are 327 and 168 MiB larger in the paper. The "
            "paper's values exceed memprof's persistent bytes by about 508 (AdamW), 502 (GaLore), 181 (Adafactor) "
            "and 340 MiB (IO-Adam): not a common overhead, so the paper's numbers are most likely peaks inside "
            "the step, where each optimizer adds its own transient. Two fit: CUDA's foreach AdamW allocates about "
            "one parameter-sized copy (475.5 MiB against AdamW's 508), and Adafactor's fp32 temporaries of the "
            "largest matrix, the 147 MiB word embedding, against its 181. This is a reading of the arithmetic; "
            "the GPU run decides it.",
        ],
    )


def _io_adam_table4() -> Reproduction:
    model = "reports/configs/vit_small.py:vit_small"
    label = "ViT-small, CIFAR-10"
    opts = (("AdamW", "adamw", 112.02), ("Adafactor", "adafactor", 64.52),
            *((f"IO-Adam (b = {b})", f"io_adam:buffer_size={b}", v)
              for b, v in ((16, 68.40), (8, 66.84), (4, 66.06), (2, 65.66), (1, 65.47))))
    cells = []
    for name, spec, paper in opts:
        run = Run(model, spec)
        cells.append(cell("IO-Adam T4", label, name, run, "model_grads_state", paper, "MiB",
                          tolerance=("abs", 20.0), label="mem-alloc vs weights+grads+state",
                          note="paper's MB read as MiB; the paper adds a common overhead"))
        cells.append(cell("IO-Adam T4", label, name, run, "peak", paper, "MiB"))
        cells.append(cell("IO-Adam T4", label, name, run, "state", None, "MiB"))
    adamw = Run(model, "adamw")
    for name, spec, paper in opts[1:]:
        cells.append(difference("IO-Adam T4", label, f"{name} − AdamW", Run(model, spec), adamw, "model_grads_state",
                                round(paper - opts[0][2], 2), "MiB", tolerance=("abs", 0.5),
                                label="mem-alloc difference vs weights+grads+state difference"))
    io_adam = opts[2:]
    for (name, spec, paper), (_, smaller, paper_smaller) in zip(io_adam, io_adam[1:]):
        cells.append(difference("IO-Adam T4", label, f"{name} − {smaller.split('=')[1]}", Run(model, spec),
                                Run(model, smaller), "model_grads_state", round(paper - paper_smaller, 2), "MiB",
                                tolerance=("abs", 0.05), label="buffer increment: mem-alloc vs weights+grads+state"))
    return Reproduction(
        name="io-adam-table4",
        title="IO-Adam Table 4: memory of the small ViT on CIFAR-10",
        source=("IO-Adam, Table 4 (\"mem-alloc(MB)\"); paper numbers from shared/papers/io-adam-digest.md §3.3. "
                "Model: reports/configs/vit_small.py (vit-pytorch's ViT layout, 6,324,970 parameters). The "
                "Adafactor is PyTorch's (the paper quotes its default lr 1e-2)."),
        cpu_command=("memprof compare --config reports/io-adam-table4.toml --device cpu --steps 1 --batch-size 2 "
                     "--csv /tmp/io-adam-table4.csv --json /tmp/io-adam-table4.json"),
        gpu_command="memprof compare --config reports/io-adam-table4.toml --device cuda --csv io-adam-table4-gpu.csv "
                    "--json io-adam-table4-gpu.json",
        cells=cells,
        explanation=[
            "Which measurement the ratios follow: Table 4 tracks persistent memory, not a peak. Adafactor − AdamW "
            "equals memprof's difference in weights + gradients + state within 0.5 MiB, and every step of the "
            "buffer (16→8→4→2→1) changes the paper's value by memprof's C and R increment within 0.05 MiB. Each "
            "paper value is memprof's weights + gradients + state plus a near-constant 15.5–16.8 MiB (the batch, "
            "CUDA workspaces).",
            "That includes the paper's claim that folded layers keep no weight gradient: with gradients kept, "
            "IO-Adam would be about 24 MiB higher. IO-Adam's gap to AdamW is 1.2–1.3 MiB smaller in the paper "
            "than in memprof at every buffer size (−2.8 %): the paper's IO-Adam holds about 1.3 MiB more, "
            "independent of b, which memprof's IO-Adam does not allocate.",
            "The batch size is not stated (128 assumed in the config); it changes only the common overhead and "
            "the peaks, which wait for the GPU run.",
        ],
    )


REPRODUCTIONS: dict[str, Reproduction] = {r.name: r for r in (
    _smmf_table1(), _smmf_table4(), _smmf_table6(), _smmf_table8(), _adapprox_table2(), _alada_table4(),
    _io_adam_table2(), _io_adam_table4())}


def run_specs(name: str) -> set[tuple[str, str, int | None]]:
    """The (model, spec, num_classes) records a reproduction reads."""
    return {(run.model, run.spec, run.num_classes) for c in REPRODUCTIONS[name].cells for _, run in c.terms}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(REPRODUCTIONS))
    parser.add_argument("run_csv", help="the CSV memprof compare --config reports/NAME.toml --csv wrote")
    parser.add_argument("--json", help="the same run's --json file (adds the 512-B-block rows)")
    parser.add_argument("--out", default=str(REPORTS), help="folder for NAME.csv and NAME.md (default: reports/)")
    args = parser.parse_args(argv)
    repro = REPRODUCTIONS[args.name]
    measured = read_csv(args.run_csv)
    cells = repro.cells
    if args.json:
        add_block_rounded_state(measured, args.json)
    else:
        cells = [c for c in cells if not c.quantity.startswith("state_blocks")]
    rows = compare(cells, measured)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{repro.name}.csv").write_text(to_csv_text(rows))
    page = to_markdown(repro, rows, args.run_csv, args.json, provenance_of(args.run_csv))
    (out / f"{repro.name}.md").write_text(page)
    for line in summary(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
