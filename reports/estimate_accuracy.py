"""The estimate against the committed GPU runs: each CUDA record in reports/gpu estimated with its own
settings (fake tensors, this machine, no GPU), peak against torch.cuda.max_memory_allocated.

    python reports/estimate_accuracy.py            # writes reports/estimate-accuracy.{csv,md}
"""

from __future__ import annotations

import sys
from pathlib import Path

from memprof import api, runfile
from memprof.files import write_atomic
from memprof.settings import request_fields

REPORTS = Path(__file__).resolve().parent
RUNS = ("gpu/optimizers-gpt2-h100.json", "gpu/alada-table4.json", "gpu/io-adam-table2.json")
GOAL = 3.0  # percent


def main() -> int:
    lines, rows = [], ["run,model,optimizer,batch_size,seq_len,real_max_allocated,estimated_peak,diff_pct,"
                       "real_state,estimated_state"]
    for name in RUNS:
        for real in runfile.read(REPORTS / name):
            s = real.settings
            settings = {**request_fields(s), "device": "cuda", "target_gpu": "h100", "timeline": False}
            model = str(REPORTS.parent / s.model) if s.model.endswith(".json") else s.model
            (est, *_) = api.estimate(model, [s.spec], **settings)
            diff = (est.peaks.allocated - real.peaks.max_allocated) / real.peaks.max_allocated * 100
            state_real, state_est = real.total("optimizer_state"), est.total("optimizer_state")
            rows.append(f"{name},{s.model},{s.spec},{s.batch_size},{s.seq_len},{real.peaks.max_allocated},"
                        f"{est.peaks.allocated},{diff:.2f},{state_real},{state_est}")
            lines.append(f"| {name} | {Path(s.model).name if '/' in s.model else s.model} | {s.spec} | "
                         f"{s.batch_size} × {s.seq_len} | {real.peaks.max_allocated / 2**20:,.1f} | "
                         f"{est.peaks.allocated / 2**20:,.1f} | {diff:+.2f} % | "
                         f"{'yes' if state_real == state_est else f'{state_real} vs {state_est}'} |")
            print(lines[-1], flush=True)
    within = sum(abs(float(r.split(",")[7])) <= GOAL for r in rows[1:])
    page = "\n".join([
        "# The estimate against real H100 runs",
        "",
        "Each CUDA run committed in reports/gpu (H100 80GB HBM3, torch 2.11, steps as recorded) estimated "
        "with its own settings on a machine without a GPU (torch 2.14.1 CPU wheel context, fake tensors): "
        "`python reports/estimate_accuracy.py`. Peak: the estimate's peak allocated bytes against "
        "`torch.cuda.max_memory_allocated()` of the real run. State: optimizer-state bytes, exact or not.",
        "",
        f"{within} of {len(rows) - 1} peaks within the {GOAL:.0f} % goal.",
        "",
        "| run | model | optimizer | batch × seq | real MiB | estimate MiB | Δ | state identical |",
        "|---|---|---|---|---:|---:|---:|---|",
        *lines, ""])
    write_atomic(REPORTS / "estimate-accuracy.csv", "\n".join(rows) + "\n")
    write_atomic(REPORTS / "estimate-accuracy.md", page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
