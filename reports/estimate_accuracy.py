"""The estimate against the committed GPU runs: each CUDA record in reports/gpu estimated with its own
settings (fake tensors, this machine, no GPU), its simulated allocator's peaks against
torch.cuda.max_memory_allocated and max_memory_reserved.

    python reports/estimate_accuracy.py            # writes reports/estimate-accuracy.{csv,md}

A data-dependent optimizer (Adapprox) is estimated as a range; the real peak should lie inside it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from memprof import api, runfile
from memprof.files import write_atomic
from memprof.record import RunRecord
from memprof.settings import request_fields

REPORTS = Path(__file__).resolve().parent
RUNS = ("gpu/optimizers-gpt2-h100.json", "gpu/alada-table4.json", "gpu/io-adam-table2.json")
GOALS = {"allocated": 1.0, "reserved": 2.0}  # percent (issue 22)
FIGURES = {"peak": "allocated", "allocated": "max_allocated", "reserved": "max_reserved"}
"""Each figure compared: the estimate's peaks field → the real record's (``peak``: the tensors' replayed peak)."""
REAL = {"peak": "max_allocated", "allocated": "max_allocated", "reserved": "max_reserved"}
HEADER = ("run,model,optimizer,batch_size,seq_len,real_max_allocated,estimated_peak,estimated_peak_upper,"
          "estimated_max_allocated,estimated_max_allocated_upper,real_max_reserved,estimated_max_reserved,"
          "estimated_max_reserved_upper,allocated_diff_pct,reserved_diff_pct,real_state,estimated_state,"
          "estimated_state_upper")


READING = [
    "## Reading",
    "",
    "- Allocated: the simulated allocator's `max_memory_allocated` (block sizes, with the large pool's whole "
    "blocks handed out where at most 1 MiB would remain); the tensors' peak (512-B rounding alone, the column "
    "this page showed before) sits up to 0.9 % under the real peak (Adapprox's range aside): that was the "
    "systematic under-estimate.",
    "- Reserved: the caching allocator simulated on the estimate's allocations (memprof.allocator). Replayed on "
    "the allocation histories of real H200 runs (benchmarks/allocator_replay.py) it reproduces every segment "
    "event and `max_memory_reserved` exactly; what remains here is the estimate's own stream against the run's.",
    "- GPT-2 (10 runs): allocated within 0.05 %, reserved within 0.09 % (Adapprox: inside its range, or 0.09 % "
    "below its upper end).",
    "- RoBERTa: allocated within 0.2 %, reserved within 0.7 % (before the reduction kernel's staging was "
    "modelled: 0.4–2.2 % and 1.9–2.6 % low, about 60 MiB in each run). The allocation history of the same "
    "model on an H200 (io_adam, batch 16 × 128; benchmarks/gpu_checks.sh) showed the missing bytes: 540 "
    "allocations of 12,582,912 B (180 a step), each with a 24-B one made and freed inside, right after a "
    "3,072-B result, and 108 of 50,331,648 B with 96 B after a 12,288-B result: the global staging buffer and "
    "semaphores of torch's CUDA reduction kernel (ATen/native/cuda/Reduce.cuh, setReduceConfig and "
    "gpu_reduce_kernel) summing 2,048 rows into the 768- and 3,072-wide bias gradients. A fake tensor runs no "
    "kernel; the estimate now allocates them after each sum/mean/norm/var result from torch's launch "
    "configuration and the GPU's SM count and threads per SM (memprof/measure/cuda_reductions.py), "
    "reproducing these sizes and the traces' others byte for byte (tests/test_cuda_reductions.py).",
    "- Adapprox picks its rank from the data: the estimate is a range (initial rank – every factor at k_max); "
    "the real figures should lie inside it.",
    "- T5-small with transformers' Adafactor, the outlier before (allocated −8.8 %, reserved −15.4 %), is "
    "now 512 B over allocated and 0.5 % under reserved. Its gap was the same kernel: in each step "
    "`update.mean(dim=-2)` of the tied 32128 × 512 fp32 embedding stages 131,596,288 B (502 CTAs per output) "
    "plus 16 B of semaphores, and the 2048 × 512 feed-forward weights 8 MiB each (the 36 blocks of 8 MiB in "
    "the H200 history); the step is this run's peak phase.",
    "- T5-small with Alada stays 0.5 % under allocated and 1.0 % under reserved: not explained yet.",
    "",
]


def main() -> int:
    if sys.argv[1:] == ["--render"]:  # the page again from the CSV, without estimating
        write(read_csv())
        return 0
    rows: list[dict] = []
    for name in RUNS:
        for real in runfile.read(REPORTS / name):
            rows.append(compare(name, real))
            print(markdown_row(rows[-1]), flush=True)
            write(rows)  # after every record: a long run keeps what it measured
    return 0


def compare(name: str, real: RunRecord) -> dict:
    s = real.settings
    model = str(REPORTS.parent / s.model) if s.model.endswith(".json") else s.model
    low, *upper = api.estimate(model, [s.spec], **{**request_fields(s), "device": "cuda", "target_gpu": "h100",
                                                   "timeline": False})
    high = upper[0] if upper else None
    row = {"run": name, "model": s.model, "optimizer": s.spec, "batch_size": s.batch_size, "seq_len": s.seq_len,
           "real_state": real.total("optimizer_state"), "low_state": low.total("optimizer_state"),
           "high_state": high.total("optimizer_state") if high else None}
    for figure, field in FIGURES.items():
        row[f"real_{figure}"] = getattr(real.peaks, REAL[figure])
        row[f"low_{figure}"] = getattr(low.peaks, field)
        row[f"high_{figure}"] = getattr(high.peaks, field) if high else None
    return with_diffs(row)


def with_diffs(row: dict) -> dict:
    """``row`` with each figure's difference from the real one, in percent (0 inside an estimated range)."""
    for figure in ("allocated", "reserved"):
        real, low, high = row[f"real_{figure}"], row[f"low_{figure}"], row[f"high_{figure}"]
        ends = (low,) if high is None else (low, high)
        inside = high is not None and low <= real <= high
        nearest = min(ends, key=lambda end: abs(end - real))
        row[f"{figure}_diff"] = 0.0 if inside else (nearest - real) / real * 100
    return row


def _cell(row: dict, figure: str) -> str:
    mib = 2**20
    low, high = row[f"low_{figure}"], row[f"high_{figure}"]
    return f"{low / mib:,.1f}" + (f" – {high / mib:,.1f}" if high else "")


def _diff(row: dict, figure: str) -> str:
    if row[f"high_{figure}"] and row[f"low_{figure}"] <= row[f"real_{figure}"] <= row[f"high_{figure}"]:
        return "in range"
    return f"{row[f'{figure}_diff']:+.2f} %" + (" (nearest end)" if row[f"high_{figure}"] else "")


def markdown_row(r: dict) -> str:
    mib = 2**20
    if r["high_state"]:
        state = "in range" if r["low_state"] <= r["real_state"] <= r["high_state"] else "OUT of range"
    else:
        state = "yes" if r["real_state"] == r["low_state"] else f"{r['real_state']} vs {r['low_state']}"
    model = Path(r["model"]).parent.name if r["model"].endswith(".json") else r["model"]
    return (f"| {r['run']} | {model} | {r['optimizer']} | {r['batch_size']} × {r['seq_len']} | "
            f"{r['real_allocated'] / mib:,.1f} | {_cell(r, 'allocated')} | {_diff(r, 'allocated')} | "
            f"{_cell(r, 'peak')} | {r['real_reserved'] / mib:,.1f} | {_cell(r, 'reserved')} | {_diff(r, 'reserved')} | "
            f"{state} |")


def read_csv() -> list[dict]:
    import csv

    def number(text: str) -> int | None:
        return int(text) if text else None

    rows = []
    with open(REPORTS / "estimate-accuracy.csv", newline="") as handle:
        for c in csv.DictReader(handle):
            rows.append(with_diffs({
                "run": c["run"], "model": c["model"], "optimizer": c["optimizer"], "batch_size": c["batch_size"],
                "seq_len": c["seq_len"], "real_state": int(c["real_state"]), "low_state": int(c["estimated_state"]),
                "high_state": number(c["estimated_state_upper"]),
                "real_peak": int(c["real_max_allocated"]), "low_peak": int(c["estimated_peak"]),
                "high_peak": number(c["estimated_peak_upper"]),
                "real_allocated": int(c["real_max_allocated"]), "low_allocated": int(c["estimated_max_allocated"]),
                "high_allocated": number(c["estimated_max_allocated_upper"]),
                "real_reserved": int(c["real_max_reserved"]), "low_reserved": int(c["estimated_max_reserved"]),
                "high_reserved": number(c["estimated_max_reserved_upper"])}))
    return rows


def write(rows: list[dict]) -> None:
    def optional(value) -> str:
        return "" if value is None else str(value)

    csv_lines = [HEADER] + [
        f"{r['run']},{r['model']},{r['optimizer']},{r['batch_size']},{r['seq_len']},{r['real_allocated']},"
        f"{r['low_peak']},{optional(r['high_peak'])},{r['low_allocated']},{optional(r['high_allocated'])},"
        f"{r['real_reserved']},{r['low_reserved']},{optional(r['high_reserved'])},{r['allocated_diff']:.2f},"
        f"{r['reserved_diff']:.2f},{r['real_state']},{r['low_state']},{optional(r['high_state'])}" for r in rows]
    within = {figure: sum(abs(r[f"{figure}_diff"]) <= goal for r in rows) for figure, goal in GOALS.items()}
    page = "\n".join([
        "# The estimate against real H100 runs",
        "",
        "Each CUDA run committed in reports/gpu (H100 80GB HBM3, torch 2.11.0+cu130, as many steps as recorded) "
        "estimated with its own settings by `memprof estimate` on a 2-core machine without a GPU (torch 2.14.1): "
        "fake CPU tensors with a CUDA run's kernel choices, the H100's measured 64 MiB library workspace, and "
        "PyTorch's caching allocator simulated on every allocation and free (memprof.allocator, the runs' default "
        "settings). Made with `python reports/estimate_accuracy.py` (this page and estimate-accuracy.csv). "
        "Allocated: the simulated `torch.cuda.max_memory_allocated()` against the real run's; tensors: the "
        "estimate's peak of live tensors (512-B blocks); reserved: the simulated `torch.cuda.max_memory_reserved()` "
        "against the real run's. State: optimizer-state bytes identical, or for Adapprox (rank chosen from the "
        "data) whether the real state lies in the estimated range.",
        "",
        f"{within['allocated']} of {len(rows)} allocated peaks within the {GOALS['allocated']:.0f} % goal; "
        f"{within['reserved']} of {len(rows)} reserved peaks within the {GOALS['reserved']:.0f} % goal.",
        "",
        "| run | model | optimizer | batch × seq | real allocated MiB | estimate MiB | Δ | tensors MiB | "
        "real reserved MiB | estimate MiB | Δ | state |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *(markdown_row(r) for r in rows), "", *READING])
    write_atomic(REPORTS / "estimate-accuracy.csv", "\n".join(csv_lines) + "\n")
    write_atomic(REPORTS / "estimate-accuracy.md", page)


if __name__ == "__main__":
    sys.exit(main())
