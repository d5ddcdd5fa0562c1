"""A training loop's step time tracked by ``memprof.track`` over the same loop untracked, measured in one run.

    python benchmarks/track_overhead.py                       # CPU, a small GPT-2 (goal: <= 1.5x)
    python benchmarks/track_overhead.py --device cuda --layers 12 --width 768 --batch-size 8 --seq-len 512

Blocks of ``--steps`` steps alternate, untracked then tracked, ``--rounds`` times, after two warm-up steps;
each step is timed alone (forward, backward, AdamW step, zero_grad; the device synchronized), so that the
record built when a tracked block ends is not counted. Prints the median step of each and their ratio: on CPU
in this process's CPU time (``time.process_time``, one intra-op thread by default), which other processes on a
shared machine do not inflate as they do wall time (printed too); on CUDA in wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import memprof


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU: intra-op threads")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 64), vocab_size=8192,
                        n_positions=args.seq_len, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)

    def timed_step() -> tuple[float, float]:
        sync(device)
        start, wall = clock(), time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sync(device)
        return (clock() - start) * 1000.0, (time.perf_counter() - wall) * 1000.0

    for _ in range(2):
        timed_step()
    plain, tracked = [], []
    for _ in range(args.rounds):
        plain += [timed_step() for _ in range(args.steps)]
        with memprof.track(model, optimizer) as run:
            tracked += [timed_step() for _ in range(args.steps)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"GPT-2 {args.layers} layers x {args.width}, batch {args.batch_size} x {args.seq_len}, AdamW, {name}; "
          f"{args.rounds} rounds of {args.steps} steps each")
    what = "wall" if device.type == "cuda" else "CPU"
    (plain_ms, plain_wall), (tracked_ms, tracked_wall) = (
        [statistics.median(t[i] for t in times) for i in (0, 1)] for times in (plain, tracked))
    print(f"untracked step {plain_ms:9.2f} ms {what} ({plain_wall:.2f} ms wall)")
    print(f"tracked step   {tracked_ms:9.2f} ms {what} ({tracked_wall:.2f} ms wall)   the last block's peak: "
          f"{run.record.peaks.allocated / 2**20:.1f} MiB in {run.record.peaks.phase}")
    print(f"overhead ratio {tracked_ms / plain_ms:9.3f}x ({tracked_wall / plain_wall:.3f}x wall)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
