"""How long `memprof estimate` takes to simulate one rank of a large FSDP2 run, end to end.

    python benchmarks/simulate.py                    # LLaMA-7B, adam, 64 ranks of FSDP2, batch 1 x 512, 2 steps
    python benchmarks/simulate.py --world-size 1024 --rank 1023 --parallel zero1

Runs the command in a fresh interpreter (imports included; the goal for the default is 30 s on a 2-core
machine) and prints its wall time and the rank's figures (the command's table, GiB).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-7b")
    parser.add_argument("--opt", default="adam")
    parser.add_argument("--world-size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--parallel", default="fsdp2")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    command = [sys.executable, "-m", "memprof.cli", "estimate", "--model", args.model, "--opt", args.opt,
               "--world-size", str(args.world_size), "--rank", str(args.rank), "--parallel", args.parallel,
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--unit", "GiB"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    print(proc.stdout)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
    print(f"simulated rank {args.rank} of {args.world_size} ({args.parallel}), {args.model}, {args.opt}: "
          f"{wall:.1f} s wall (fresh interpreter, imports included), exit {proc.returncode}")


if __name__ == "__main__":
    main()
