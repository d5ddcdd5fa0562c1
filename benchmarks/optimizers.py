"""The seed optimizers against torch's fused AdamW, measured in one run.

    python benchmarks/optimizers.py --model gpt2 --steps 12 --out reports/optimizers-gpt2.md

For each optimizer (each in its own process): optimizer-state MiB, step-transient MiB, median
``optimizer.step()`` time, and the ratios to fused AdamW measured in the same run. Goal for the
seed optimizers: step <= 2x fused AdamW, and a step transient smaller than the state they save.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memprof.api import measure
from memprof.files import write_atomic
from memprof.runfile import to_json

MiB = 2**20
SEEDS = ["smmf", "smmf:sign_bits=8", "smmf:implementation=torch", "alada", "adamem", "adapprox", "io_adam"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--baseline", default="adamw:fused=true")
    parser.add_argument("--opt", default=",".join(SEEDS))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, help="also write the table as Markdown here")
    parser.add_argument("--json", type=Path, help="also write the summary: gpu, torch, steps, and per optimizer its "
                        "step ms, ratio to the baseline, state and transient bytes")
    parser.add_argument("--records", type=Path, help="also save the run records (for `memprof report`)")
    args = parser.parse_args()
    specs = [args.baseline, *args.opt.split(",")]
    records = measure(args.model, specs, device=args.device, steps=args.steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, timeline=False)
    base = records[0]
    base_state, base_step = base.total("optimizer_state"), base.timings_ms["step"]
    env = base.environment
    lines = [
        f"{args.model} fp32, batch {args.batch_size}, seq {args.seq_len}, {args.steps} steps (median after the first), "
        f"{env.get('gpu', args.device)}, torch {env.get('torch')}, CUDA {env.get('cuda')}",
        "",
        "| optimizer | state MiB | step transient MiB | step ms | step / fused AdamW | state saved MiB | transient / state saved | status |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for record in records:
        if record.status != "ok":
            lines.append(f"| {record.settings.spec} | | | | | | | {record.failure} |")
            continue
        state, transient = record.total("optimizer_state"), record.total("step_transient")
        step = record.timings_ms["step"]
        saved = base_state - state
        lines.append(
            f"| {record.settings.spec} | {state / MiB:.2f} | {transient / MiB:.2f} | {step:.2f} | {step / base_step:.2f}x | "
            f"{saved / MiB:.1f} | {transient / saved:.3f} | ok |" if record is not base else
            f"| {record.settings.spec} | {state / MiB:.2f} | {transient / MiB:.2f} | {step:.2f} | 1.00x | | | baseline |"
        )
    if args.records:
        write_atomic(args.records, to_json(records))
    if args.json:
        write_atomic(args.json, json.dumps(summary(records, args), indent=1) + "\n")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        command = "python benchmarks/optimizers.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("out", "json", "records") and v is not None)
        write_atomic(args.out, f"# Seed optimizers vs fused AdamW\n\nMeasured with `{command}`.\n\n{text}")


def summary(records, args: argparse.Namespace) -> dict:
    """The benchmark as data: each optimizer's step time, its ratio to the baseline measured in the same
    run, its state and step-transient bytes."""
    base = records[0]
    env = base.environment
    return {
        "model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
        "gpu": env.get("gpu", args.device), "torch": env.get("torch"), "cuda": env.get("cuda"),
        "baseline": base.settings.spec,
        "optimizers": {
            r.settings.spec: {
                "status": r.status if r.status == "ok" else r.failure,
                "step_ms": r.timings_ms.get("step"),
                "step_ratio": (r.timings_ms["step"] / base.timings_ms["step"]
                               if r.status == "ok" and base.status == "ok" else None),
                "state_bytes": r.total("optimizer_state"),
                "transient_bytes": r.total("step_transient"),
            } for r in records
        },
    }


if __name__ == "__main__":
    main()
