"""``memprof.track`` around a loop written as memprof's runner against ``memprof compare`` for the same run.

    python benchmarks/track_accuracy.py --model gpt2 --opt adam --device cuda --batch-size 4 --seq-len 512

The tracked loop builds the model, batch and optimizer as the runner does (``memprof.models.build_model``,
``memprof.optim.registry.build_optimizer``) and runs ``--steps`` steps in this process; compare measures in
its own (a child process on CUDA). Prints each category and the peak from both, and exits 1 where a
persistent category (weights, gradients, optimizer state) differs.
"""

from __future__ import annotations

import argparse
import sys

import torch

import memprof
from memprof.api import measure
from memprof.models import ModelOptions, build_model
from memprof.optim.registry import build_optimizer, parse_spec

CATEGORIES = ("weights", "gradients", "optimizer_state", "inputs", "activations", "temporaries", "step_transient")


def tracked(args: argparse.Namespace) -> memprof.RunRecord:
    torch.manual_seed(0)
    built = build_model(args.model, ModelOptions(batch_size=args.batch_size, seq_len=args.seq_len), device=args.device)
    optimizer = build_optimizer(parse_spec(args.opt), built.model)

    def step() -> None:
        optimizer.zero_grad()
        loss = built.loss(built.model, built.batch)
        loss.backward()
        del loss
        optimizer.step()

    with memprof.track(built.model, optimizer) as run:
        for _ in range(args.steps):
            step()
    return run.record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--opt", default="adam")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    (compared,) = measure(args.model, args.opt, device=args.device, steps=args.steps, batch_size=args.batch_size,
                          seq_len=args.seq_len)
    record = tracked(args)
    print(f"{args.model} {args.opt} {args.device} batch {args.batch_size} x {args.seq_len}, {args.steps} steps")
    print(f"{'category':<18}{'compare':>14}{'tracked':>14}{'difference':>12}")
    differs = False
    for category in CATEGORIES:
        a, b = compared.total(category), record.total(category)
        differs |= category in ("weights", "gradients", "optimizer_state") and a != b
        print(f"{category:<18}{a:>14,}{b:>14,}{b - a:>12,}")
    a, b = compared.peaks.allocated, record.peaks.allocated
    print(f"{'peak':<18}{a:>14,}{b:>14,}{b - a:>12,}   compare in {compared.peaks.phase} step {compared.peaks.step}, "
          f"tracked in {record.peaks.phase} step {record.peaks.step}")
    if args.device.startswith("cuda"):
        print(f"max_memory_allocated: compare {compared.peaks.max_allocated:,}, tracked {record.peaks.max_allocated:,}")
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
