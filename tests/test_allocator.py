"""The caching-allocator simulator against hand-worked traces, one rule each (memprof.allocator)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memprof.allocator.config import NO_LIMIT, parse, problem
from memprof.allocator.replay import replay_trace
from memprof.allocator.simulator import CachingAllocator, OutOfMemory, block_for, round_size
from memprof.errors import UsageError

MIB = 1 << 20
DEFAULT = parse("")


def segments(allocator: CachingAllocator) -> list[tuple[str, int]]:
    return [(action, size) for action, _, size in allocator.events]


# -- rounding, pools, segment sizes ------------------------------------------------------------------------
@pytest.mark.parametrize("requested, block", [(1, 512), (512, 512), (513, 1024), (1000, 1024), (3 * MIB + 5, 3 * MIB + 512)])
def test_requests_are_rounded_up_to_512_bytes(requested, block):
    allocator = CachingAllocator(DEFAULT)
    assert allocator.malloc(requested).size == block


@pytest.mark.parametrize("requested, segment", [
    (MIB, 2 * MIB),  # up to 1 MiB: the small pool's 2 MiB segment
    (MIB + 1, 20 * MIB),  # above: the large pool, a 20 MiB segment under 10 MiB
    (9 * MIB, 20 * MIB),
    (10 * MIB, 10 * MIB),  # from 10 MiB: its own segment, rounded up to 2 MiB
    (11 * MIB, 12 * MIB),
])
def test_the_pool_and_the_segment_follow_the_request_size(requested, segment):
    allocator = CachingAllocator(DEFAULT)
    allocator.malloc(requested)
    assert segments(allocator) == [("segment_alloc", segment)]


def test_small_requests_share_one_2_mib_segment():
    allocator = CachingAllocator(DEFAULT)
    blocks = [allocator.malloc(100_000) for _ in range(20)]  # 20 × 100,352 B = 1.9 MiB
    assert segments(allocator) == [("segment_alloc", 2 * MIB)]
    assert len({b.ptr for b in blocks}) == 20 and allocator.allocated == 20 * 100_352


def test_the_large_segment_size_setting_changes_the_shared_segment():
    allocator = CachingAllocator(parse("large_segment_size_mb:32"))
    allocator.malloc(5 * MIB)
    assert segments(allocator) == [("segment_alloc", 32 * MIB)]


# -- splitting -----------------------------------------------------------------------------------------------
def test_the_large_pool_hands_out_a_whole_block_when_at_most_1_mib_would_remain():
    allocator = CachingAllocator(DEFAULT)
    allocator.malloc(5 * MIB)  # a 20 MiB segment, split: 15 MiB stay free
    whole = allocator.malloc(14 * MIB + MIB // 2)  # 0.5 MiB would remain: not split off
    assert whole.size == 15 * MIB and allocator.allocated == 20 * MIB
    assert segments(allocator) == [("segment_alloc", 20 * MIB)]


def test_the_large_pool_splits_when_more_than_1_mib_remains():
    allocator = CachingAllocator(DEFAULT)
    allocator.malloc(5 * MIB)
    assert allocator.malloc(13 * MIB).size == 13 * MIB  # 2 MiB remain: split off
    assert allocator.malloc(2 * MIB).size == 2 * MIB  # … and handed out next, no new segment
    assert segments(allocator) == [("segment_alloc", 20 * MIB)]


def test_the_small_pool_splits_off_any_remainder_of_512_bytes():
    allocator = CachingAllocator(DEFAULT)
    allocator.malloc(MIB)
    assert allocator.malloc(MIB - 512).size == MIB - 512  # 512 B remain in the 2 MiB segment
    assert allocator.malloc(512).size == 512
    assert segments(allocator) == [("segment_alloc", 2 * MIB)]


@pytest.mark.parametrize("requested, extent, block", [
    (1, None, 512), (513, None, 1024),  # everything rounds up to 512 B
    (1000, 4096, 1024),  # small pool: a remainder of >= 512 B is split off
    (1000, 1024 + 511, 1024 + 511),  # small pool: a remainder under 512 B stays in the block
    (4 * MIB, 4 * MIB + MIB // 2, 4 * MIB + MIB // 2),  # large pool: a remainder of <= 1 MiB is not split off …
    (4 * MIB, 5 * MIB, 5 * MIB),
    (4 * MIB, 5 * MIB + 512, 4 * MIB),  # … one above 1 MiB is
    (MIB, MIB + 512, MIB),  # exactly 1 MiB is still the small pool's rule
])
def test_block_for_a_free_run_follows_the_split_rule(requested, extent, block):
    assert block_for(requested, extent, DEFAULT) == block


# -- best fit, streams, merging ------------------------------------------------------------------------------
def test_the_smallest_free_block_that_fits_is_taken():
    allocator = CachingAllocator(DEFAULT)
    a, b = allocator.malloc(12 * MIB), allocator.malloc(16 * MIB)
    allocator.free(b)
    allocator.free(a)
    assert allocator.malloc(11 * MIB).ptr == a.ptr  # 12 MiB fits better than 16 MiB


def test_a_free_block_serves_only_its_own_stream():
    allocator = CachingAllocator(DEFAULT)
    allocator.free(allocator.malloc(12 * MIB, stream=1))
    allocator.malloc(12 * MIB, stream=0)
    assert segments(allocator) == [("segment_alloc", 12 * MIB)] * 2


def test_freed_neighbours_merge_back_into_one_block():
    allocator = CachingAllocator(DEFAULT)
    a, b = allocator.malloc(5 * MIB), allocator.malloc(5 * MIB)  # one 20 MiB segment: a, b, 10 MiB free
    allocator.free(a)
    allocator.free(b)
    assert allocator.malloc(19 * MIB).ptr == a.ptr  # the whole segment again
    assert segments(allocator) == [("segment_alloc", 20 * MIB)]


# -- max_split_size_mb, max_non_split_rounding_mb, roundup_power2_divisions ------------------------------------
def test_an_oversize_block_is_not_handed_out_for_a_smaller_request():
    allocator = CachingAllocator(parse("max_split_size_mb:40"))
    allocator.free(allocator.malloc(50 * MIB))  # oversize: >= 40 MiB
    assert allocator.malloc(30 * MIB).size == 30 * MIB  # not the cached 50 MiB: a new segment
    assert segments(allocator) == [("segment_alloc", 50 * MIB), ("segment_alloc", 30 * MIB)]


def test_an_oversize_block_serves_an_oversize_request_whole_within_the_rounding_limit():
    allocator = CachingAllocator(parse("max_split_size_mb:40"))
    allocator.free(allocator.malloc(50 * MIB))
    assert allocator.malloc(45 * MIB).size == 50 * MIB  # not split; 50 < 45 + 20
    allocator.free(allocator.malloc(70 * MIB))
    assert allocator.malloc(46 * MIB).size == 46 * MIB  # 70 >= 46 + 20: a new segment instead
    allocator2 = CachingAllocator(parse("max_split_size_mb:40,max_non_split_rounding_mb:30"))
    allocator2.free(allocator2.malloc(70 * MIB))
    assert allocator2.malloc(46 * MIB).size == 70 * MIB  # 70 < 46 + 30


def test_roundup_power2_divisions_rounds_to_a_division_of_the_power_of_two():
    config = parse("roundup_power2_divisions:4")
    assert round_size(1_200_000, config) == 1_310_720  # 1 MiB … 2 MiB in steps of 256 KiB
    assert round_size(3 * MIB, config) == 3 * MIB  # on a step already
    assert round_size(1500, config) == 1536  # 1024 … 2048 in steps of 256
    assert round_size(1 << 30, config) == 1 << 30  # a power of two stays
    assert CachingAllocator(config).malloc(5 * MIB + 1).size == 6 * MIB
    per_interval = parse("roundup_power2_divisions:[256:2,512:8,>:1]")
    assert round_size(300 * MIB, per_interval) == 384 * MIB and round_size(600 * MIB, per_interval) == 640 * MIB
    assert round_size(100 * MIB, per_interval) == 128 * MIB  # below the first interval: its divisions
    assert round_size(3000 * MIB + 1, per_interval) == 3000 * MIB + 512  # '>': 1 division, none


# -- expandable segments ---------------------------------------------------------------------------------------
def test_expandable_segments_map_pages_as_needed_and_split_any_remainder():
    allocator = CachingAllocator(parse("expandable_segments:True"), device_total=80 << 30)
    a = allocator.malloc(5 * MIB)  # one 20 MiB page mapped; 15 MiB free after a
    b = allocator.malloc(20 * MIB)  # the free 15 MiB and one more page: the segment grows in place
    assert (a.size, b.size, b.ptr) == (5 * MIB, 20 * MIB, a.ptr + 5 * MIB)
    assert segments(allocator) == [("segment_map", 20 * MIB), ("segment_map", 20 * MIB)]
    c = allocator.malloc(15 * MIB - 512)  # the large pool splits off 512 B under expandable segments
    assert c.size == 15 * MIB - 512 and allocator.reserved == 40 * MIB


def test_expandable_segments_unmap_free_pages_when_the_cache_is_released():
    allocator = CachingAllocator(parse("expandable_segments:True"), device_total=80 << 30)
    a, b = allocator.malloc(30 * MIB), allocator.malloc(5 * MIB)
    allocator.free(a)
    allocator.release_cached()  # the pages wholly inside a's freed 30 MiB: one of the two under it
    assert segments(allocator)[-1] == ("segment_unmap", 20 * MIB) and allocator.reserved == 20 * MIB
    allocator.free(b)
    allocator.release_cached()
    assert allocator.reserved == 0


# -- garbage collection, freeing cached blocks before an OOM -----------------------------------------------------
def test_the_garbage_collector_frees_old_cached_segments_past_its_threshold():
    config = parse("garbage_collection_threshold:0.25,per_process_memory_fraction:1.0")
    allocator = CachingAllocator(config, device_total=200 * MIB)  # threshold: 50 MiB
    a = allocator.malloc(40 * MIB)
    allocator.malloc(20 * MIB)
    allocator.free(a)  # 60 MiB reserved, 40 cached
    allocator.malloc(50 * MIB)
    assert segments(allocator)[2:] == [("segment_free", 40 * MIB), ("segment_alloc", 50 * MIB)]
    without = CachingAllocator(parse("per_process_memory_fraction:1.0"), device_total=200 * MIB)
    a = without.malloc(40 * MIB)
    without.malloc(20 * MIB)
    without.free(a)
    without.malloc(50 * MIB)
    assert without.reserved == 110 * MIB  # no threshold: the cached 40 MiB stays


def test_cached_segments_are_freed_and_the_allocation_retried_before_an_oom():
    allocator = CachingAllocator(DEFAULT, capacity=60 * MIB)
    allocator.free(allocator.malloc(40 * MIB))
    allocator.malloc(50 * MIB)  # 40 + 50 > 60: the cached 40 MiB is freed, then it fits
    assert segments(allocator) == [("segment_alloc", 40 * MIB), ("segment_free", 40 * MIB),
                                   ("segment_alloc", 50 * MIB)]


def test_oversize_cached_blocks_are_freed_first_with_max_split_size():
    allocator = CachingAllocator(parse("max_split_size_mb:20"), capacity=70 * MIB)
    small = allocator.malloc(12 * MIB)
    allocator.free(allocator.malloc(50 * MIB))  # oversize, cached
    allocator.free(small)  # not oversize, cached
    allocator.malloc(22 * MIB)  # not the 50 MiB (>= 22 + 20); 62 + 22 > 70: the oversize block alone goes
    assert segments(allocator)[2:] == [("segment_free", 50 * MIB), ("segment_alloc", 22 * MIB)]
    allocator.free(allocator.malloc(30 * MIB))  # 64 MiB reserved, 30 + 12 cached
    allocator.malloc(40 * MIB)  # freeing the oversize 30 MiB is not enough (< 40): every cached segment goes
    assert segments(allocator)[-3:] == [("segment_free", 30 * MIB), ("segment_free", 12 * MIB),
                                        ("segment_alloc", 40 * MIB)]


def test_the_first_allocation_that_cannot_be_met_raises_out_of_memory():
    allocator = CachingAllocator(DEFAULT, capacity=30 * MIB)
    allocator.malloc(5 * MIB)  # a 20 MiB segment
    allocator.malloc(12 * MIB)  # from its free 15 MiB: split, 3 MiB stay cached (split: cannot be freed)
    with pytest.raises(OutOfMemory) as caught:
        allocator.malloc(12 * MIB)  # a 12 MiB segment: 32 MiB > 30
    assert caught.value.requested == 12 * MIB and caught.value.reserved == 20 * MIB


# -- replaying a recorded history ----------------------------------------------------------------------------------
def _event(action: str, addr: int, size: int) -> dict:
    return {"action": action, "addr": addr, "size": size, "stream": 0, "time_us": 0}


def test_a_recorded_history_replays_to_the_same_segments():
    base = 1 << 32
    trace = [_event("segment_alloc", base, 20 * MIB), _event("alloc", base, 5 * MIB),
             _event("alloc", base + 5 * MIB, 14 * MIB + 1), _event("free_requested", base, 5 * MIB),
             _event("free_completed", base, 5 * MIB), _event("segment_alloc", base + 64 * MIB, 12 * MIB),
             _event("alloc", base + 64 * MIB, 11 * MIB), _event("segment_free", base + 64 * MIB, 12 * MIB)]
    trace.insert(-1, _event("free_completed", base + 64 * MIB, 11 * MIB))
    replay = replay_trace(trace, DEFAULT)
    assert replay.same_segments and replay.other_address == 0  # the last free: an empty_cache call
    assert replay.recorded_max_reserved == replay.simulated_max_reserved == 32 * MIB


# -- the settings ------------------------------------------------------------------------------------------------
def test_settings_parse_as_torch_reads_them():
    config = parse(" max_split_size_mb:64 , roundup_power2_divisions:4,expandable_segments:True")
    assert (config.max_split_size, config.divisions(5 * MIB), config.expandable_segments) == (64 * MIB, 4, True)
    assert parse("").max_split_size == NO_LIMIT and parse("").large_segment_size == 20 * MIB


BAD = ["foo:1", "max_split_size_mb:10", "max_split_size_mb", "expandable_segments:yes",
       "roundup_power2_divisions:3", "roundup_power2_divisions:[64:8", "garbage_collection_threshold:1.5",
       "large_segment_size_mb:10", "per_process_memory_fraction:2", "max_split_size_mb:20,large_segment_size_mb:25",
       "max_non_split_rounding_mb:5"]
GOOD = ["", "max_split_size_mb:64,roundup_power2_divisions:4", "expandable_segments:True",
        "roundup_power2_divisions:[64:8,128:2,>:1]", "garbage_collection_threshold:0.6", "large_segment_size_mb:32",
        "max_non_split_rounding_mb:40", "release_lock_on_cudamalloc:True", "pinned_num_register_threads:8"]


@pytest.mark.parametrize("text", BAD)
def test_bad_settings_are_one_line_usage_errors(text):
    with pytest.raises(UsageError) as caught:
        parse(text)
    assert "\n" not in str(caught.value) and str(caught.value).startswith("--alloc-conf")


def test_torch_accepts_and_refuses_the_same_settings():
    """Torch's own parser (which needs no GPU) agrees on each text, in a process of its own (it keeps them)."""
    script = ("import json, sys, torch\nout = []\nfor text in json.loads(sys.argv[1]):\n    try:\n"
              "        torch.cuda.memory._set_allocator_settings(text); out.append(True)\n"
              "    except Exception:\n        out.append(False)\nprint(json.dumps(out))")
    texts = BAD + GOOD
    done = subprocess.run([sys.executable, "-c", script, json.dumps(texts)], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [problem(t) is None for t in texts]


# -- real histories (an H200 run each, torch 2.11; benchmarks/allocator_replay.py replays them all) ---------------
TRACES = sorted((Path(__file__).parent / "data" / "allocator").glob("*.pkl.xz"))


@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.name.removesuffix(".pkl.xz"))
def test_a_real_run_replays_to_its_segments_and_its_max_reserved(path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from allocator_replay import compare

    row = compare(path)
    assert row["allocs"] > 3000 and row["same"] and row["other_address"] == 0
    assert row["simulated"] == row["recorded"] == row["torch"]
