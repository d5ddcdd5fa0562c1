"""Replay real runs' allocator histories through memprof's simulator and compare the segments (issue 22).

    python benchmarks/allocator_replay.py /work/gpu-results/traces tests/data
    python benchmarks/allocator_replay.py traces/ --markdown          # the table as Markdown

Each NAME.pkl.xz is a snapshot stripped by benchmarks/allocator_trace.py, beside it NAME.json, memprof's record
of that run (its allocator settings and its torch.cuda.max_memory_reserved). Per trace: the recorded and
simulated segment events (segment_alloc/free, under expandable segments segment_map/unmap; equal when they match
one for one, in order, action and size), the allocations the simulator placed at another address, and the most
reserved: as the history adds it up, as the simulator does, and as torch reported it.
"""

from __future__ import annotations

import argparse
import json
import lzma
import pickle
import sys
from pathlib import Path

from memprof.allocator.config import parse
from memprof.allocator.replay import replay_trace

MIB = 2**20


def compare(path: Path) -> dict:
    """One trace's replay against its run (the record beside it, where there is one)."""
    with lzma.open(path, "rb") as handle:
        snapshot = pickle.load(handle)
    record_path = path.with_name(path.name.removesuffix(".pkl.xz") + ".json")
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    records = record.get("records", [record]) if isinstance(record, dict) else record
    first = records[0] if records else {}
    settings = first.get("environment", {}).get("allocator_config") or ""
    total = first.get("environment", {}).get("gpu_memory") or 1 << 40
    trace = max(snapshot["device_traces"], key=len)
    replay = replay_trace(trace, parse(settings), device_total=total)
    torch_reserved = first.get("peaks", {}).get("max_reserved")
    return {"trace": path.name.removesuffix(".pkl.xz"), "settings": settings or "(defaults)",
            "events": len(trace), "allocs": replay.allocs, "segments": len(replay.recorded),
            "same": replay.same_segments, "first_difference": replay.first_difference(),
            "other_address": replay.other_address, "recorded": replay.recorded_max_reserved,
            "simulated": replay.simulated_max_reserved, "torch": torch_reserved}


def table(rows: list[dict]) -> str:
    lines = ["| trace | settings | allocs | segment events | same segments | other address | max reserved: "
             "history MiB | simulated MiB | torch MiB |", "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        same = "yes" if r["same"] else f"no (from event {r['first_difference']})"
        torch_mib = f"{r['torch'] / MIB:,.1f}" if r["torch"] else "n/a"
        lines.append(f"| {r['trace']} | {r['settings']} | {r['allocs']:,} | {r['segments']:,} | {same} | "
                     f"{r['other_address']:,} | {r['recorded'] / MIB:,.1f} | {r['simulated'] / MIB:,.1f} | {torch_mib} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders of NAME.pkl.xz (and NAME.json) files")
    parser.add_argument("--markdown", action="store_true", help="print only the Markdown table")
    args = parser.parse_args()
    rows = [compare(path) for folder in args.folders for path in sorted(folder.glob("*.pkl.xz"))]
    print(table(rows))
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
