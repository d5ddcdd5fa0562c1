"""An estimate's simulated caching allocator (memprof.measure.reserved): reserved, needs, fits, the first failure."""

from __future__ import annotations

import json

import pytest

from cli_for_tests import invoke
from memprof.api import estimate
from memprof.gpus import fits, need
from memprof.measure.events import Allocation, PhaseMark
from memprof.measure.reserved import describe_failure, phase_reserved, reserved_from_trace, run
from memprof.allocator.config import parse
from memprof.record import PhasePeak
from memprof.taxonomy import FRAGMENTATION

MIB = 1 << 20
# Six GPT-2 blocks: deep enough that a CPU estimate would be probed (memprof.measure.depth).
CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 6, "n_embd": 64, "n_head": 4,
          "vocab_size": 512, "n_positions": 64}
SETTINGS = dict(batch_size=2, seq_len=32, timeline=False, steps=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gpt2") / "config.json"
    path.write_text(json.dumps(CONFIG))
    return str(path)


@pytest.fixture(scope="module")
def adam(model):
    (record,) = estimate(model, ["adam"], **SETTINGS)
    return record


def test_a_cuda_estimate_says_what_the_allocator_would_reserve(adam):
    peaks = adam.peaks
    assert peaks.max_reserved >= peaks.max_allocated >= peaks.allocated > 0
    assert peaks.max_reserved % (2 * MIB) == 0  # whole segments: 2 MiB, 20 MiB, or 2 MiB multiples
    assert peaks.reserved_end <= peaks.max_reserved and peaks.allocated_end <= peaks.max_allocated
    row = next(r for r in adam.breakdown if (r.category, r.component) == FRAGMENTATION)
    assert row.bytes == peaks.max_reserved - peaks.max_allocated
    assert all(p.reserved is not None and p.reserved >= p.peak for p in adam.phase_peaks if p.phase != "warmup")
    assert need(adam) == peaks.max_reserved + next(r.bytes for r in adam.breakdown if r.basis == "gpu table")
    assert not any("extrapolated" in note for note in adam.notes)  # the whole stream: no probes for CUDA
    assert "simulated" in adam.environment["estimate"] and adam.peaks.fails_at is None


def test_the_allocator_settings_change_what_is_reserved(model, adam):
    (expandable,) = estimate(model, ["adam"], alloc_conf="expandable_segments:True", **SETTINGS)
    assert expandable.environment["allocator_config"] == "expandable_segments:True"
    assert expandable.peaks.max_reserved != adam.peaks.max_reserved
    assert expandable.total("optimizer_state") == adam.total("optimizer_state")


def test_over_its_budget_an_estimate_names_the_first_allocation_that_fails(model, adam):
    assert adam.peaks.max_reserved > 70 * MIB
    budget = 786_432_000 + 66 * MIB  # the H100's context outside the allocator, its 64 MiB workspace and 2 MiB
    (record,) = estimate(model, ["adam"], memory=str(budget), **SETTINGS)
    assert not fits(record, budget) and record.peaks.fails_at
    phase, _, what = record.peaks.fails_at.partition(": ")
    assert phase.split(" (")[0] in ("setup", "forward", "backward", "step") and " B for " in what
    (roomy,) = estimate(model, ["adam"], memory="100GB", **SETTINGS)
    assert fits(roomy, 100 * 10**9) and roomy.peaks.fails_at is None


def test_the_cli_shows_reserved_and_the_failing_allocation(model, adam):
    budget = 786_432_000 + 66 * MIB
    result = invoke("estimate", "--model", model, "--opt", "adam", "--batch-size", 2, "--seq-len", 32, "--steps", 2,
                    "--memory", budget, "--unit", "MiB")
    assert result.exit_code == 0, result.output
    assert "reserved" in result.stdout and "the first allocation to fail within the budget" in result.stdout


@pytest.mark.parametrize("args, message", [
    (("--alloc-conf", "max_split_size_mb:5"), "max_split_size_mb too small"),
    (("--alloc-conf", "garbage:1"), "unknown key 'garbage'"),
])
def test_bad_allocator_settings_are_usage_errors(model, args, message):
    result = invoke("estimate", "--model", model, "--opt", "adam", *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_allocator_settings_on_cpu_are_refused():
    result = invoke("compare", "--model", "gpt2", "--opt", "adam", "--device", "cpu", "--alloc-conf",
                    "expandable_segments:True")
    assert result.exit_code == 2 and "cannot take effect on cpu" in result.output


# -- the pieces, on hand-made streams -------------------------------------------------------------------------
def test_a_stream_replays_in_time_order_frees_first():
    allocations = [Allocation(ptr=1, nbytes=12 * MIB, start=1, end=3), Allocation(ptr=2, nbytes=12 * MIB, start=3)]
    simulated = run(allocations, parse(""), device_total=80 << 30)
    assert simulated.allocator.max_reserved == 12 * MIB  # the second reuses the first's freed segment
    assert simulated.reserved == [(1, 12 * MIB)]
    limited = run([Allocation(ptr=1, nbytes=12 * MIB, start=1), allocations[1]], parse(""), device_total=80 << 30,
                  capacity=20 * MIB)
    assert limited.failed is allocations[1]


def test_each_phase_gets_the_most_reserved_in_it():
    marks = [PhaseMark(0, "setup", 0), PhaseMark(10, "forward", 1), PhaseMark(20, "backward", 1)]
    peaks = [PhasePeak(step=1, phase="forward", start=0, peak=5, end=0),
             PhasePeak(step=1, phase="backward", start=0, peak=5, end=0)]
    reserved = [(5.0, 100), (12.0, 300), (15.0, 200), (25.0, 150)]
    assert [p.reserved for p in phase_reserved(peaks, marks, reserved)] == [300, 200]


def test_the_failing_allocation_is_described_by_phase_category_and_op():
    failed = Allocation(ptr=7, nbytes=411_705_344, start=15, category="temporaries", component="forward",
                        origin="aten.mm.default")
    marks = [PhaseMark(0, "setup", 0), PhaseMark(10, "forward", 2)]
    assert describe_failure(failed, marks) == "forward (step 2): 411,705,344 B for temporaries/forward (aten.mm.default)"


def test_a_real_history_gives_reserved_over_time():
    trace = [{"action": "segment_alloc", "addr": 0, "size": 20 * MIB, "time_us": 1},
             {"action": "alloc", "addr": 0, "size": 5, "time_us": 2},
             {"action": "segment_free", "addr": 0, "size": 20 * MIB, "time_us": 3}]
    assert reserved_from_trace(trace) == [(1.0, 20 * MIB), (3.0, 0)]


def test_a_real_history_is_replayed_with_the_runs_allocator_settings():
    from memprof.measure.trackers import blocks_from_trace

    trace = [{"action": "segment_alloc", "addr": 0, "size": 20 * MIB, "time_us": 1},
             {"action": "alloc", "addr": 0, "size": 5 * MIB + 1, "time_us": 2}]
    assert blocks_from_trace(trace)[0].nbytes == 5 * MIB + 512
    assert blocks_from_trace(trace, parse("roundup_power2_divisions:4"))[0].nbytes == 6 * MIB  # 4 … 8 MiB in 1 MiB
