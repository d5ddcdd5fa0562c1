"""Instrumented vs plain training-step time on one model, measured in the same run.

    python benchmarks/overhead.py --model gpt2 --opt adamw:fused=true --steps 20

Prints the median step time (forward + backward + optimizer step) of a plain loop and of
memprof's instrumented loop (allocator history, saved-tensor hooks, phase marks), and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memprof.api import measure
from memprof.models import ModelOptions, build_model
from memprof.optim.registry import build_optimizer, parse_spec


def plain_step_ms(model_name: str, spec: str, steps: int, options: ModelOptions, device: str) -> float:
    built = build_model(model_name, options, device=device)
    optimizer = build_optimizer(parse_spec(spec), built.model)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad()
        built.loss(built.model, built.batch).backward()
        optimizer.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--opt", default="adamw:fused=true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    options = ModelOptions(batch_size=args.batch_size, seq_len=args.seq_len)
    plain = plain_step_ms(args.model, args.opt, args.steps, options, "cuda")
    (record,) = measure(args.model, args.opt, device="cuda", steps=args.steps, batch_size=args.batch_size,
                        seq_len=args.seq_len)
    instrumented = sum(record.timings_ms[p] for p in ("forward", "backward", "step"))
    print(f"model={args.model} opt={args.opt} batch={args.batch_size} seq={args.seq_len} steps={args.steps} "
          f"gpu={torch.cuda.get_device_name()}")
    print(f"plain step        {plain:8.2f} ms")
    print(f"instrumented step {instrumented:8.2f} ms  (forward {record.timings_ms['forward']:.2f}, "
          f"backward {record.timings_ms['backward']:.2f}, step {record.timings_ms['step']:.2f})")
    print(f"overhead ratio    {instrumented / plain:8.3f}x")


if __name__ == "__main__":
    main()
