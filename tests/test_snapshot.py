"""``--snapshot`` off CUDA: PyTorch's memory_viz format written from a CPU run's and an estimate's allocations."""

from __future__ import annotations

import json
import pickle

from cli_for_tests import invoke

from memprof.measure import depth
from memprof.measure.events import Allocation, PhaseMark
from memprof.measure.snapshot import snapshot, snapshot_file
from memprof.settings import Settings


def allocated_over_time(snap: dict) -> tuple[int, int]:
    """(the most bytes allocated at once, bytes allocated at the end), replayed from the trace."""
    live = most = 0
    for entry in snap["device_traces"][0]:
        live += {"alloc": entry["size"], "free_requested": -entry["size"]}.get(entry["action"], 0)
        most = max(most, live)
    return most, live


def check_memory_viz(snap: dict) -> None:
    """torch.cuda._memory_viz reads the snapshot: its summary balances, its trace replays, its pages build."""
    from torch.cuda import _memory_viz

    assert "total_reserved" in _memory_viz.segsum(snap)  # asserts allocated + free == reserved per segment
    assert "TOTAL MEM" in _memory_viz.trace(snap)
    assert "snapshot.pickle" in _memory_viz.trace_plot(snap) and "snapshot.pickle" in _memory_viz.segment_plot(snap)
    for segment in snap["segments"]:  # memory_viz places each block at its segment's address plus the sizes before
        assert sum(block["size"] for block in segment["blocks"]) == segment["total_size"]


def test_every_allocation_is_an_alloc_and_a_free_with_its_category_and_phase():
    allocations = [Allocation(ptr=1, nbytes=1024, start=0.0, category="weights", component="param"),
                   Allocation(ptr=2, nbytes=4096, start=3.0, end=5.0, category="activations", component="saved"),
                   Allocation(ptr=2, nbytes=512, start=5.0, end=6.0, category="temporaries", component="backward")]
    marks = [PhaseMark(1.0, "setup", 0), PhaseMark(2.0, "forward", 1), PhaseMark(4.0, "backward", 1)]
    snap = snapshot(allocations, marks)
    check_memory_viz(snap)
    actions = [(e["action"], e["size"]) for e in snap["device_traces"][0]]
    assert actions == [("segment_alloc", 1024), ("alloc", 1024), ("segment_alloc", 4096), ("alloc", 4096),
                       ("free_requested", 4096), ("free_completed", 4096), ("segment_free", 4096),
                       ("segment_alloc", 512), ("alloc", 512), ("free_requested", 512), ("free_completed", 512),
                       ("segment_free", 512)]  # at equal times the free comes first
    frames = {e["size"]: [f["name"] for f in e["frames"]] for e in snap["device_traces"][0]}
    assert frames == {1024: ["weights · param", "setup"], 4096: ["activations · saved", "forward (step 1)"],
                      512: ["temporaries · backward", "backward (step 1)"]}
    assert [s["total_size"] for s in snap["segments"]] == [1024]  # what is live at the end
    addresses = [e["addr"] for e in snap["device_traces"][0] if e["action"] == "alloc"]
    assert len(set(addresses)) == 3  # never reused, though the tracker's pointers were


def _snapshot_of(tmp_path, *args) -> dict:
    """The snapshot a command writes with ``--snapshot``, checked as memory_viz reads it and against the
    record's peak (the same allocations as the record's)."""
    path, run = tmp_path / "snapshot.pickle", tmp_path / "run.json"
    result = invoke(*args, "--snapshot", path, "--json", run)
    assert result.exit_code == 0, result.output
    snap = pickle.loads(path.read_bytes())
    check_memory_viz(snap)
    (record,) = json.loads(run.read_text())["records"]
    assert allocated_over_time(snap)[0] == record["peaks"]["allocated"]
    return snap


def test_a_cpu_run_writes_a_snapshot_memory_viz_reads(tmp_path, gpt2_spec):
    snap = _snapshot_of(tmp_path, "compare", "--model", gpt2_spec, "--opt", "adam", "--device", "cpu", "--steps", "2",
                        "--seq-len", "16")
    names = {f["name"] for e in snap["device_traces"][0] for f in e["frames"]}
    assert {"optimizer_state · moment", "gradients · grad", "activations · saved", "step (step 2)"} <= names


def test_an_estimate_writes_a_snapshot_memory_viz_reads(tmp_path, gpt2_spec):
    snap = _snapshot_of(tmp_path, "estimate", "--model", gpt2_spec, "--opt", "adam", "--seq-len", "16",
                        "--world-size", "2", "--parallel", "fsdp2")
    sizes = {e["size"] for e in snap["device_traces"][0]}
    assert all(size % 512 == 0 for size in sizes)  # a CUDA target's blocks
    names = {f["name"] for e in snap["device_traces"][0] for f in e["frames"]}
    assert "context · library workspace" in names and "temporaries · all-gather" in names


def test_a_snapshot_estimates_the_whole_model_not_probes():
    settings = Settings(model="llama-7b", spec="adam", estimate=True, device="cpu")  # a CUDA target is never probed
    assert depth._probed_depth(settings) == 32
    assert depth._probed_depth(settings.replace(snapshot="s.pickle")) is None


def test_each_launched_rank_writes_its_own_snapshot():
    launched = Settings(spec="adam", device="cpu", nproc=2, parallel="ddp", rank=1, snapshot="out/s.pickle")
    assert snapshot_file(launched) == "out/s-rank1.pickle"
    assert snapshot_file(launched.replace(estimate=True)) == "out/s.pickle"  # a simulated rank is the only one
    assert snapshot_file(launched.replace(nproc=1, parallel="none", rank=0)) == "out/s.pickle"


def test_snapshot_with_fit_is_a_usage_error(tmp_path):
    result = invoke("estimate", "--model", "gpt2", "--opt", "adam", "--fit", "batch-size", "--gpu", "h100",
                    "--snapshot", tmp_path / "s.pickle")
    assert result.exit_code == 2 and "--fit makes many" in result.stderr
