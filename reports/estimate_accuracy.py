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
HEADER = "run,model,optimizer,batch_size,seq_len,real_max_allocated,estimated_peak,estimated_peak_upper,diff_pct,real_state,estimated_state"


def main() -> int:
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
    inside = low.peaks.allocated <= peak <= high.peaks.allocated
    diff = 0.0 if upper and inside else (low.peaks.allocated - peak) / peak * 100
    return {"run": name, "model": s.model, "optimizer": s.spec, "batch_size": s.batch_size, "seq_len": s.seq_len,
            "real": peak, "low": low.peaks.allocated, "high": high.peaks.allocated if upper else None,
            "diff": diff, "real_state": real.total("optimizer_state"), "low_state": low.total("optimizer_state"),
            "high_state": high.total("optimizer_state") if upper else None}


def markdown_row(r: dict) -> str:
    mib = 2**20
    estimate = f"{r['low'] / mib:,.1f}" + (f" – {r['high'] / mib:,.1f}" if r["high"] else "")
    if r["high"]:
        state = "in range" if r["low_state"] <= r["real_state"] <= r["high_state"] else "OUT of range"
        diff = "in range" if r["low"] <= r["real"] <= r["high"] else f"{r['diff']:+.2f} % (lower end)"
    else:
        state = "yes" if r["real_state"] == r["low_state"] else f"{r['real_state']} vs {r['low_state']}"
        diff = f"{r['diff']:+.2f} %"
    model = Path(r["model"]).parent.name if r["model"].endswith(".json") else r["model"]
    return (f"| {r['run']} | {model} | {r['optimizer']} | {r['batch_size']} × {r['seq_len']} | "
            f"{r['real'] / mib:,.1f} | {estimate} | {diff} | {state} |")


def write(rows: list[dict]) -> None:
    csv_lines = [HEADER] + [
        f"{r['run']},{r['model']},{r['optimizer']},{r['batch_size']},{r['seq_len']},{r['real']},{r['low']},"
        f"{r['high'] or ''},{r['diff']:.2f},{r['real_state']},{r['low_state']}" for r in rows]
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
        *(markdown_row(r) for r in rows), ""])
    write_atomic(REPORTS / "estimate-accuracy.csv", "\n".join(csv_lines) + "\n")
    write_atomic(REPORTS / "estimate-accuracy.md", page)


if __name__ == "__main__":
    sys.exit(main())
