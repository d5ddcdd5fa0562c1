"""How long `memprof estimate` takes for a model that does not fit, end to end, and where the time goes.

    python benchmarks/estimate.py                          # LLaMA-7B, batch 1 x 2048, six optimizers
    python benchmarks/estimate.py --model reports/configs/llama-2-70b/config.json --opt adam,smmf

Prints: the wall time of the whole command in a fresh interpreter, imports included, for each of
``--repeat`` runs and their median (the goal for LLaMA-7B with the six optimizers is 20 s on a 2-core
machine), then, in this process, the time per optimizer and the functions that take the most time for
one of them (cProfile, own time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import subprocess
import sys
import time

SIX = "adam,smmf,adafactor,adamem,alada,io_adam"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-7b")
    parser.add_argument("--opt", default=SIX)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="end-to-end runs (the median is printed)")
    args = parser.parse_args()
    common = ["--model", args.model, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
              "--steps", str(args.steps)]

    print(f"reference (this machine's speed now): {_reference_cpu():.2f} s of CPU for 10M Python additions")
    walls = []
    for _ in range(args.repeat):  # this machine's speed varies from run to run: the median of a few
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "memprof.cli", "estimate", *common, "--opt", args.opt],
                              capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        if proc.returncode not in (0, 3):
            print(proc.stderr)
    print(proc.stdout)
    print(f"end to end (fresh interpreter, imports included), {args.repeat} runs: "
          f"{', '.join(f'{w:.1f}' for w in walls)} s; median {statistics.median(walls):.1f} s, exit {proc.returncode}\n")

    start = time.perf_counter()
    from memprof import api

    import transformers  # noqa: F401  (counted here: the model zoo needs it)

    print(f"imports: {time.perf_counter() - start:.1f} s")
    settings = dict(batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps, timeline=False)
    for spec in args.opt.split(","):
        start = time.perf_counter()
        (record, *_) = api.estimate(args.model, [spec], **settings)
        print(f"{spec}: {time.perf_counter() - start:.1f} s ({record.status})")
    profiler = cProfile.Profile()
    first = args.opt.split(",")[0]
    profiler.enable()
    api.estimate(args.model, [first], **settings)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
    print(f"\nwhere the time goes for {first} (own time, top 12):")
    print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:4000])



def _reference_cpu() -> float:
    """CPU seconds for a fixed pure-Python loop. On a shared machine the same estimate took 21.6 to 38 s of
    CPU within one evening; this tells a slow hour apart from a slower memprof."""
    start = time.process_time()
    total = 0
    for i in range(10_000_000):
        total += i
    return time.process_time() - start


if __name__ == "__main__":
    main()
