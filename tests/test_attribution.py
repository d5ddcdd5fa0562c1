"""The core algorithms on synthetic streams: ``assign``, ``replay`` and the caching allocator's block
rules as a real history is replayed (``blocks_from_trace``), plus every registered optimizer's declared roles."""

from __future__ import annotations

import pytest
import torch

from memprof.measure.attribution import assign
from memprof.measure.events import Allocation, PhaseMark, Tag, replay
from memprof.measure.trackers import blocks_from_trace
from memprof.taxonomy import ROLES

MIB = 1 << 20
MARKS = [PhaseMark(0, "warmup", 0), PhaseMark(10, "setup", 0), PhaseMark(20, "forward", 1),
         PhaseMark(30, "backward", 1), PhaseMark(40, "step", 1), PhaseMark(50, "end", 1)]


def tag(time: float, ptr: int, category: str, component: str = "c", nbytes: int = 0) -> Tag:
    return Tag(time, ptr, category, component, nbytes)


# -- assign ------------------------------------------------------------------------------------------
def test_identity_precedence_decides_a_doubly_tagged_allocation():
    weight = Allocation(ptr=1, nbytes=512, start=11)
    assign([weight], [tag(21, 1, "activations", "saved"), tag(12, 1, "weights", "param")], MARKS)
    assert (weight.category, weight.component) == ("weights", "param")


def test_a_tag_goes_to_the_allocation_live_at_its_time_when_a_pointer_is_reused():
    first, second = Allocation(ptr=7, nbytes=512, start=21, end=25), Allocation(ptr=7, nbytes=1024, start=26, end=35)
    assign([first, second], [tag(27, 7, "activations", "saved", 1000)], MARKS)
    assert first.category == "temporaries" and first.component == "forward"
    assert second.category == "activations" and second.tensor_bytes == 1000


def test_a_tag_after_the_free_claims_nothing():
    freed = Allocation(ptr=3, nbytes=512, start=41, end=42)
    assign([freed], [tag(45, 3, "optimizer_state", "moment")], MARKS)
    assert (freed.category, freed.component) == ("step_transient", "step")


@pytest.mark.parametrize("start, expected", [(5, ("context", "library workspace")), (15, ("unattributed", "setup")),
                                             (25, ("temporaries", "forward")), (35, ("temporaries", "backward")),
                                             (45, ("step_transient", "step")), (-1, ("unattributed", "setup"))])
def test_untagged_allocations_take_the_phase_that_made_them(start, expected):
    alloc = Allocation(ptr=9, nbytes=512, start=start)
    assign([alloc], [], MARKS)
    assert (alloc.category, alloc.component) == expected


# -- replay ------------------------------------------------------------------------------------------
def _stream():
    allocations = [
        Allocation(1, 100, start=11),  # a weight, live throughout
        Allocation(2, 50, start=21, end=34),  # a saved activation, freed in backward
        Allocation(3, 30, start=22, end=23),  # a forward temporary
        Allocation(4, 100, start=31),  # the gradient
        Allocation(5, 200, start=41),  # optimizer state, made in the step
        Allocation(6, 70, start=42, end=43),  # a step transient
    ]
    tags = [tag(12, 1, "weights", "param"), tag(21, 2, "activations", "saved"), tag(39, 4, "gradients", "grad"),
            tag(44, 5, "optimizer_state", "moment")]
    assign(allocations, tags, MARKS)
    return allocations


def test_replay_finds_each_phase_peak_and_the_global_peak_composition():
    result = replay(_stream(), MARKS)
    phases = {p["phase"]: p for p in result.phase_peaks}
    assert [p["phase"] for p in result.phase_peaks] == ["warmup", "setup", "forward", "backward", "step"]
    assert (phases["forward"]["start_bytes"], phases["forward"]["peak"], phases["forward"]["end_bytes"]) == (100, 180, 150)
    assert (phases["backward"]["peak"], phases["backward"]["end_bytes"]) == (250, 200)
    assert (phases["step"]["start_bytes"], phases["step"]["peak"], phases["step"]["end_bytes"]) == (200, 470, 400)
    assert result.peak_bytes == 470 and result.peak_phase == ("step", 1)
    assert result.peak_composition == {("weights", "param"): 100, ("gradients", "grad"): 100,
                                       ("optimizer_state", "moment"): 200, ("step_transient", "step"): 70}


def test_replay_frees_before_allocations_at_the_same_instant():
    allocations = [Allocation(1, 100, start=21, end=25), Allocation(2, 100, start=25, end=26)]
    assign(allocations, [], MARKS)
    assert replay(allocations, MARKS).peak_bytes == 100


def test_replay_timeline_keeps_every_bucket_maximum():
    result = replay(_stream(), MARKS, timeline_points=3)
    assert max(result.timeline["total"]) == 470
    assert set(result.timeline["categories"]) >= {"weights", "optimizer_state", "step_transient"}


# -- the caching allocator's block rules ------------------------------------------------------------
def _event(action: str, addr: int, size: int, t: int) -> dict:
    return {"action": action, "addr": addr, "size": size, "time_us": t}


def test_blocks_from_trace_gives_a_whole_free_block_in_the_large_pool():
    base = 1 << 30
    trace = [
        _event("segment_alloc", base, 20 * MIB, 1),
        _event("alloc", base, 12 * MIB, 2),  # 8 MiB would remain: split
        _event("alloc", base + 12 * MIB, 7 * MIB + 1, 3),  # 7 MiB + 512 → < 1 MiB remains: whole rest
        _event("free_requested", base, 12 * MIB, 4),
        _event("free_completed", base, 12 * MIB, 5),
        _event("alloc", base, 11 * MIB, 6),  # a 12 MiB gap up to the next used block: 1 MiB left, not split
    ]
    blocks = blocks_from_trace(trace)
    assert [b.nbytes for b in blocks] == [12 * MIB, 8 * MIB, 12 * MIB]
    assert (blocks[0].start, blocks[0].end) == (2.0, 4.0) and blocks[1].end is None


def test_blocks_from_trace_under_expandable_segments_rounds_the_request():
    # Expandable segments map ranges (segment_map) instead of allocating segments: no extent is
    # known, so a block is its rounded request (CudaTracker flags such replays as approximate).
    trace = [_event("segment_map", 0, 2 * MIB, 1), _event("alloc", 0, 1000, 2), _event("alloc", 1024, 3 * MIB + 5, 3)]
    assert [b.nbytes for b in blocks_from_trace(trace)] == [1024, 3 * MIB + 512]


# -- every registered optimizer's declared roles against a real step -------------------------------
def test_every_registered_optimizer_declares_the_role_of_each_state_tensor(mlp_spec):
    from memprof.api import measure
    from memprof.optim.registry import registry

    names = [name for name, entry in registry().items() if entry.requires is None]
    for record in measure(mlp_spec, names, device="cpu", steps=1, batch_size=1, timeline=False):
        assert record.status == "ok", (record.settings.spec, record.failure)
        assert not record.inferred_roles, record.settings.spec
        assert set(record.components("optimizer_state")) <= set(ROLES), record.settings.spec
        assert record.total("optimizer_state") > 0, record.settings.spec


def test_the_fake_tracker_does_not_count_dtensor_sharding_propagation(monkeypatch):
    # DTensor runs each new op once on fake tensors of the global shape, under the active fake mode, to
    # learn the output's shape: a real rank allocates nothing there, so an estimate must not count it.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    from memprof.measure.trackers import FakeTracker

    seen = []

    def propagate(self, op_schema):
        seen.append(tracker.paused)
        return torch.empty(1 << 20)  # the global shape's fake output

    monkeypatch.setattr(ShardingPropagator, "_propagate_tensor_meta_non_cached", propagate)
    tracker = FakeTracker(torch.device("cpu"))
    with FakeTensorMode(), tracker:
        ShardingPropagator._propagate_tensor_meta_non_cached(None, None)
        kept = torch.empty(16)
    assert seen == [True] and not tracker.paused
    assert [a.nbytes for a in tracker.allocations] == [kept.untyped_storage().nbytes()]
    assert ShardingPropagator._propagate_tensor_meta_non_cached is propagate  # put back
