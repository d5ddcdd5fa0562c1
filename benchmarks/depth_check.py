"""Extrapolated estimates (probes of a few blocks) against the whole model op by op: fields and times.

    python benchmarks/depth_check.py --model gpt2 --opt adam,smmf,io_adam --batch-size 2 --seq-len 64
    python benchmarks/depth_check.py --model llama-7b --opt adam --seq-len 512 --world-size 64 --parallel fsdp2
    python benchmarks/depth_check.py --model path/to/qwen2.5/config.json --opt adam --seq-len 512

For each optimizer: the seconds each took, how the probed record was made (its note), and every field
that differs from the full-depth record (none, when the extrapolation is exact).
"""

from __future__ import annotations

import argparse
import time

FIELDS = ("breakdown", "peak", "peaks", "phase_peaks", "n_params", "parameters", "model_config", "status",
          "failure", "hyperparameters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--opt", default="adam,smmf")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--parallel", default="none")
    parser.add_argument("--rank", type=int, default=0)
    args = parser.parse_args()
    from memprof import api

    settings = dict(batch_size=args.batch_size, seq_len=args.seq_len, nproc=args.world_size,
                    parallel=args.parallel, rank=args.rank, timeline=False)
    for spec in args.opt.split(","):
        start = time.perf_counter()
        full = api.estimate(args.model, [spec], full_depth=True, **settings)
        middle = time.perf_counter()
        probed = api.estimate(args.model, [spec], **settings)
        end = time.perf_counter()
        print(f"{spec}: full depth {middle - start:.1f} s, probed {end - middle:.1f} s")
        for a, b in zip(full, probed):
            print(f"  {b.notes[-1] if b.notes else ''}")
            differ = [name for name in FIELDS if getattr(a, name) != getattr(b, name)]
            print(f"  fields that differ: {', '.join(differ) or 'none'}")


if __name__ == "__main__":
    main()
