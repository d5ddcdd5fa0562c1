"""What is live at the peak of a CUDA memory snapshot, largest first, with the frames that allocated it.

    memprof compare --model t5-small --opt hf_adafactor --snapshot snap.pickle ...   # on a GPU
    python benchmarks/snapshot_peak.py snap.pickle --min-mib 1

For finding an allocation a real run makes and an estimate does not: run both, then compare this list
with the estimate's composition at its peak. Reads the allocator's history as recorded (requested
sizes; ``alloc`` to ``free_requested``), device 0 unless ``--device``.
"""

from __future__ import annotations

import argparse
import pickle

MIB = 1 << 20


def live_at_peak(trace: list[dict]) -> tuple[int, list[dict]]:
    """The peak of the requested bytes live in ``trace`` and the entries live then."""
    total = peak = peak_index = 0
    sizes: dict[int, int] = {}
    for index, entry in enumerate(trace):
        total += _change(entry, sizes)
        if total > peak:
            peak, peak_index = total, index
    live: dict[int, dict] = {}
    for entry in trace[: peak_index + 1]:
        if entry["action"] == "alloc":
            live[entry["addr"]] = entry
        elif entry["action"] == "free_requested":
            live.pop(entry["addr"], None)
    return peak, sorted(live.values(), key=lambda e: -e["size"])


def _change(entry: dict, sizes: dict[int, int]) -> int:
    if entry["action"] == "alloc":
        sizes[entry["addr"]] = entry["size"]
        return entry["size"]
    if entry["action"] == "free_requested":
        return -sizes.pop(entry["addr"], 0)
    return 0


def where(entry: dict, frames: int) -> str:
    """The innermost Python frames outside torch's own files."""
    outside = [f for f in entry.get("frames", []) if "/torch/" not in f["filename"]]
    return " < ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in outside[:frames])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("snapshot")
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--min-mib", type=float, default=1.0)
    parser.add_argument("--frames", type=int, default=4)
    args = parser.parse_args()
    with open(args.snapshot, "rb") as file:
        trace = pickle.load(file)["device_traces"][args.device]
    peak, live = live_at_peak(trace)
    shown = [e for e in live if e["size"] >= args.min_mib * MIB]
    print(f"peak: {peak / MIB:,.1f} MiB requested, {len(live)} allocations live; {len(shown)} of "
          f"{args.min_mib:g} MiB or more:")
    for entry in shown:
        print(f"{entry['size'] / MIB:10,.2f} MiB  {where(entry, args.frames) or '(no Python frames)'}")


if __name__ == "__main__":
    main()
