"""A CUDA memory snapshot without its Python frames: the allocator's own events and segments, small enough to
commit and to replay on a machine without a GPU (the allocator simulator's test data).

    memprof compare --model gpt2 --opt adam --snapshot snap.pickle ...     # on a GPU
    python benchmarks/allocator_trace.py snap.pickle trace.pkl.xz           # keeps what the allocator did

Kept per trace entry: action, addr, size, stream, time_us; per segment: address, total_size, stream,
segment_type, allocated_size, requested_size and each block's size, requested_size and state; and the
snapshot's other top-level keys (allocator settings, where torch writes them).
"""

from __future__ import annotations

import argparse
import lzma
import pickle

ENTRY_KEYS = ("action", "addr", "size", "stream", "time_us")
SEGMENT_KEYS = ("address", "total_size", "stream", "segment_type", "allocated_size", "requested_size", "device")
BLOCK_KEYS = ("address", "size", "requested_size", "state")


def strip(snapshot: dict) -> dict:
    """``snapshot`` with every frame dropped and only the keys above kept."""
    kept = {k: v for k, v in snapshot.items() if k not in ("segments", "device_traces")}
    kept["segments"] = [
        {**{k: s[k] for k in SEGMENT_KEYS if k in s},
         "blocks": [{k: b[k] for k in BLOCK_KEYS if k in b} for b in s.get("blocks", [])]}
        for s in snapshot.get("segments", [])
    ]
    kept["device_traces"] = [[{k: e[k] for k in ENTRY_KEYS if k in e} for e in trace]
                             for trace in snapshot.get("device_traces", [])]
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("snapshot")
    parser.add_argument("out", help="an .xz-compressed pickle")
    args = parser.parse_args()
    with open(args.snapshot, "rb") as f:
        stripped = strip(pickle.load(f))
    with lzma.open(args.out, "wb") as f:
        pickle.dump(stripped, f, protocol=4)
    print(args.out, sum(len(t) for t in stripped["device_traces"]), "events,", len(stripped["segments"]), "segments")


if __name__ == "__main__":
    main()
