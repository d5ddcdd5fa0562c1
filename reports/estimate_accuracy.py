"""The estimate against the committed GPU runs: each CUDA record in reports/gpu estimated with its own
settings (fake tensors, this machine, no GPU), its peak against torch.cuda.max_memory_allocated.

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
GOAL = 3.0  # percent
HEADER = ("run,model,optimizer,batch_size,seq_len,real_max_allocated,estimated_peak,estimated_peak_upper,diff_pct,"
          "real_state,estimated_state,estimated_state_upper")


READING = [
    "## Reading",
    "",
    "- The estimate sits below the real peak by 0.0–0.8 % on GPT-2 and T5-small, 0.8–2.8 % on RoBERTa "
    "(most likely the large pool's whole blocks, which the estimate does not model).",
    "- Adapprox picks its rank from the data: the estimate is a range (initial rank – every factor at k_max). The "
    "real state (631.3 MB) lies inside it (499.0–652.1 MB); the real peak is 0.4 % above the upper end's, from the "
    "step transient of the ranks the real run drew.",
    "- T5-small with transformers' Adafactor is the outlier (−8.8 %): the real step transient is 197.9 MB, the "
    "estimate's 131.7 MB; the 66 MB gap is one more temporary the size of T5's tied 32128 × 512 embedding in the "
    "CUDA step. Not explained without a GPU to trace it on (benchmarks/gpu_checks.sh is the place to add it).",
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
    high = upper[0] if upper else low
    peak = real.peaks.max_allocated
    nearest = min((low.peaks.allocated, high.peaks.allocated), key=lambda end: abs(end - peak))
    diff = 0.0 if low.peaks.allocated <= peak <= high.peaks.allocated else (nearest - peak) / peak * 100
    return {"run": name, "model": s.model, "optimizer": s.spec, "batch_size": s.batch_size, "seq_len": s.seq_len,
            "real": peak, "low": low.peaks.allocated, "high": high.peaks.allocated if upper else None,
            "diff": diff, "real_state": real.total("optimizer_state"), "low_state": low.total("optimizer_state"),
            "high_state": high.total("optimizer_state") if upper else None}


def markdown_row(r: dict) -> str:
    mib = 2**20
    estimate = f"{r['low'] / mib:,.1f}" + (f" – {r['high'] / mib:,.1f}" if r["high"] else "")
    if r["high"]:
        state = "in range" if r["low_state"] <= r["real_state"] <= r["high_state"] else "OUT of range"
        diff = "in range" if r["low"] <= r["real"] <= r["high"] else f"{r['diff']:+.2f} % (nearest end)"
    else:
        state = "yes" if r["real_state"] == r["low_state"] else f"{r['real_state']} vs {r['low_state']}"
        diff = f"{r['diff']:+.2f} %"
    model = Path(r["model"]).parent.name if r["model"].endswith(".json") else r["model"]
    return (f"| {r['run']} | {model} | {r['optimizer']} | {r['batch_size']} × {r['seq_len']} | "
            f"{r['real'] / mib:,.1f} | {estimate} | {diff} | {state} |")


def read_csv() -> list[dict]:
    import csv

    rows = []
    with open(REPORTS / "estimate-accuracy.csv", newline="") as handle:
        for c in csv.DictReader(handle):
            high = int(c["estimated_peak_upper"]) if c["estimated_peak_upper"] else None
            real, low = int(c["real_max_allocated"]), int(c["estimated_peak"])
            nearest = low if high is None else min((low, high), key=lambda end: abs(end - real))
            inside = high is not None and low <= real <= high
            rows.append({"run": c["run"], "model": c["model"], "optimizer": c["optimizer"],
                         "batch_size": c["batch_size"], "seq_len": c["seq_len"], "real": real, "low": low,
                         "high": high, "diff": 0.0 if inside else (nearest - real) / real * 100,
                         "real_state": int(c["real_state"]), "low_state": int(c["estimated_state"]),
                         "high_state": int(c["estimated_state_upper"]) if c.get("estimated_state_upper") else None})
    return rows


def write(rows: list[dict]) -> None:
    csv_lines = [HEADER] + [
        f"{r['run']},{r['model']},{r['optimizer']},{r['batch_size']},{r['seq_len']},{r['real']},{r['low']},"
        f"{r['high'] or ''},{r['diff']:.2f},{r['real_state']},{r['low_state']},{r['high_state'] or ''}" for r in rows]
    within = sum(abs(r["diff"]) <= GOAL for r in rows)
    page = "\n".join([
        "# The estimate against real H100 runs",
        "",
        "Each CUDA run committed in reports/gpu (H100 80GB HBM3, torch 2.11.0+cu130, as many steps as recorded) "
        "estimated with its own settings by `memprof estimate` on a 2-core machine without a GPU (torch 2.14.1): "
        "fake CPU tensors with a CUDA run's kernel choices, 512-B block rounding, the H100's measured 64 MiB "
        "library workspace. Made with `python reports/estimate_accuracy.py` (this page and "
        "estimate-accuracy.csv). Peak: the estimate's peak allocated bytes against "
        "`torch.cuda.max_memory_allocated()` of the real run. State: optimizer-state bytes identical, or for "
        "Adapprox (rank chosen from the data) whether the real state lies in the estimated range.",
        "",
        f"{within} of {len(rows)} peaks within the {GOAL:.0f} % goal.",
        "",
        "| run | model | optimizer | batch × seq | real MiB | estimate MiB | Δ | state |",
        "|---|---|---|---|---:|---:|---:|---|",
        *(markdown_row(r) for r in rows), "", *READING])
    write_atomic(REPORTS / "estimate-accuracy.csv", "\n".join(csv_lines) + "\n")
    write_atomic(REPORTS / "estimate-accuracy.md", page)


if __name__ == "__main__":
    sys.exit(main())
