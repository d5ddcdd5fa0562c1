"""memprof's activations under --checkpointing against torch's own accounting (MemTracker), on CPU.

    python benchmarks/checkpointing_memtracker.py --model gpt2-tiny --batch-size 4 --seq-len 64
    python benchmarks/checkpointing_memtracker.py --model resnet18 --batch-size 4 --image-size 64

For none, full and selective checkpointing, one training step (step 1: no gradients or optimizer state yet)
of the same model, checkpointed the same way (memprof.measure.checkpointing.apply), measured twice:
memprof's runner, and a plain forward and backward under torch.distributed._tools.mem_tracker.MemTracker.
Printed as a Markdown table (docs/recipes.md): at the start of backward, memprof's saved activations against
MemTracker's "Activation" (every tensor the forward made that is still live); at the peak of backward,
memprof's activations (saved + recomputed), temporaries and gradients against MemTracker's "Activation",
"Temp" and "Gradient", and the peak itself.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

GPT2_TINY = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 4, "n_embd": 128, "n_head": 4,
             "vocab_size": 1024, "n_positions": 256, "bos_token_id": 0, "eos_token_id": 0}


def memprof_figures(model: str, value: str, settings: dict) -> dict[str, int]:
    from memprof.api import measure

    (record,) = measure(model, ["adam"], device="cpu", steps=1, checkpointing=value, timeline=False, **settings)
    backward = next(p for p in record.phase_peaks if (p.step, p.phase) == (1, "backward"))
    at_peak = {}
    for row in backward.composition:
        at_peak[row.category] = at_peak.get(row.category, 0) + row.bytes
    saved = sum(r.bytes for r in record.breakdown if (r.category, r.component) == ("activations", "saved"))
    return {"saved at backward start": saved, "activations at peak": at_peak.get("activations", 0),
            "temporaries at peak": at_peak.get("temporaries", 0), "gradients at peak": at_peak.get("gradients", 0),
            "backward peak": backward.peak}


def memtracker_figures(model: str, value: str, settings: dict) -> dict[str, int]:
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from memprof.measure import checkpointing
    from memprof.measure.attribution import Capture
    from memprof.measure.trackers import CpuTracker
    from memprof.models import ModelOptions, build_model

    built = build_model(model, ModelOptions(**settings))
    checkpointing.apply(built.model, value, Capture(CpuTracker()), model)  # the capture's tags go unused here
    tracker = MemTracker()
    tracker.track_external(built.model, *built.batch.values())
    torch.manual_seed(0)
    with tracker:
        loss = built.loss(built.model, built.batch)
        after_forward = tracker.get_tracker_snapshot()[torch.device("cpu")]
        loss.backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {"saved at backward start": after_forward.get("Activation", 0),
            "activations at peak": peak.get("Activation", 0), "temporaries at peak": peak.get("Temp", 0),
            "gradients at peak": peak.get("Gradient", 0), "backward peak": peak["Total"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-tiny", help="gpt2-tiny (4 blocks, 128 wide) or any memprof model")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    settings = {"batch_size": args.batch_size, "seq_len": args.seq_len, "image_size": args.image_size}
    with tempfile.TemporaryDirectory() as folder:
        model = args.model
        if model == "gpt2-tiny":
            model = str(Path(folder, "config.json"))
            Path(model).write_text(json.dumps(GPT2_TINY))
        print(f"| {args.model} | checkpointing | figure | memprof (B) | MemTracker (B) | MemTracker − memprof |")
        print("|---|---|---|---:|---:|---:|")
        for value in ("none", "full", "selective"):
            ours, torchs = memprof_figures(model, value, settings), memtracker_figures(model, value, settings)
            for name in ours:
                print(f"| | {value} | {name} | {ours[name]:,} | {torchs[name]:,} | {torchs[name] - ours[name]:+,} |")


if __name__ == "__main__":
    main()
