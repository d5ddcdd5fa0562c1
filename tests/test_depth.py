"""A deep model's estimate from shallow probes (memprof.measure.depth) against the whole model, op by op."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from memprof.api import estimate
from memprof.measure.depth import NotAffine, _affine, _check_blocks, _prose

# Six GPT-2 blocks, small enough that the full-depth estimate takes seconds.
CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 6, "n_embd": 64, "n_head": 4,
          "vocab_size": 512, "n_positions": 64}
SETTINGS = dict(batch_size=2, seq_len=32, timeline=False)
COMPARED = ("breakdown", "peak", "peaks", "phase_peaks", "n_params", "parameters", "model_config", "status",
            "hyperparameters")


@pytest.fixture(scope="module")
def deep_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gpt2-6") / "config.json"
    path.write_text(json.dumps(CONFIG))
    return str(path)


@pytest.fixture(scope="module")
def estimated(deep_config):
    """The deep model's estimate for one spec (extrapolated, or with ``full_depth``): made once for the module,
    a copy each time asked."""
    made = {}

    def estimated_for(spec: str, full_depth: bool = False):
        if (spec, full_depth) not in made:
            (made[spec, full_depth],) = estimate(deep_config, [spec], full_depth=full_depth, **SETTINGS)
        return copy.deepcopy(made[spec, full_depth])

    return estimated_for


@pytest.mark.parametrize("spec", ["adam", "smmf", "adafactor", "sgd"])
def test_extrapolated_estimate_equals_the_full_depth_one(estimated, spec):
    full, probed = estimated(spec, full_depth=True), estimated(spec)
    assert "extrapolated to 6 blocks from probes of 1, 2, 3 blocks" in probed.notes[-1]
    assert not any("extrapolated" in note for note in full.notes)
    for key in COMPARED:
        assert getattr(probed, key) == getattr(full, key), key
    assert probed.environment["estimate"] == full.environment["estimate"]  # host reads counted for 6 blocks


def test_a_peak_that_moves_within_a_phase_is_caught(deep_config):
    # IO-Adam keeps every gradient until the next step. On GPT-2 (12 blocks, batch 2 x 64) step 2's forward
    # peaks at its start (the gradients) at 1-3 blocks and after the blocks (the activations) at 12: two lines
    # that cross beyond the probes, which only the peaks followed within the phase reveal.
    (probe,) = estimate(deep_config, ["io_adam"], depth=3, **SETTINGS)
    forward = next(p for p in probe.phase_peaks if (p.phase, p.step) == ("forward", 2))
    assert set(forward.blocks) == {"before", "first block", "last block", "after"}
    assert max(forward.blocks.values()) <= forward.peak
    _check_blocks(probe, probe, 3)
    moved = dataclasses.replace(forward, blocks={**forward.blocks, "after": forward.peak + 1})
    with pytest.raises(NotAffine, match=r"forward \(step 2\) peaks after at 12 blocks"):
        _check_blocks(probe, dataclasses.replace(probe, phase_peaks=[moved]), 12)


@pytest.mark.parametrize("spec", ["io_adam"])
def test_a_fallback_or_an_extrapolation_gives_the_full_depth_figures(estimated, spec):
    full, probed = estimated(spec, full_depth=True), estimated(spec)
    for key in ("breakdown", "peak", "peaks", "n_params"):
        assert getattr(probed, key) == getattr(full, key), key


def test_shallow_models_and_full_depth_are_estimated_whole(mlp_spec, estimated):
    (mlp,) = estimate(mlp_spec, ["adam"], device="cpu", steps=1, timeline=False)
    assert not any("blocks" in note for note in mlp.notes)
    full = estimated("adam", full_depth=True)
    assert full.timeline.time == [] and not any("extrapolated" in note for note in full.notes)


def test_affine_figures_extrapolate_and_others_refuse():
    depths = (1, 2, 3)
    assert _affine([{"a": 10, "b": [1, "x"]}, {"a": 13, "b": [1, "x"]}, {"a": 16, "b": [1, "x"]}], depths, 32,
                   "record") == {"a": 103, "b": [1, "x"]}
    with pytest.raises(NotAffine, match=r"record.a is 10, 13, 17 at 1, 2, 3 blocks"):
        _affine([{"a": 10}, {"a": 13}, {"a": 17}], depths, 32, "record")
    with pytest.raises(NotAffine, match="other keys"):
        _affine([{"a": 1}, {"a": 1}, {"b": 1}], depths, 32, "record")
    with pytest.raises(NotAffine, match="differs"):
        _affine([1.0, 2.0, 3.0], depths, 32, "record")


def test_prose_extrapolates_its_counts_and_keeps_other_numbers():
    texts = ["driver 580.159.04; 1,000 host reads", "driver 580.159.04; 1,500 host reads",
             "driver 580.159.04; 2,000 host reads"]
    assert _prose(texts, (1, 2, 3), 32, "note") == "driver 580.159.04; 16,500 host reads"
    with pytest.raises(NotAffine, match="words"):
        _prose(["3 blocks", "4 layers", "5 blocks"], (1, 2, 3), 32, "note")


@pytest.mark.slow
def test_probes_forked_as_jobs_of_their_own_give_the_records_made_in_turn(deep_config, estimated):
    # A fresh process forks workers and each probe is a job (io_adam's later probes or full-depth estimate
    # are jobs that the first probes did not foresee); this process has trained, so here they run in turn.
    import os
    import subprocess
    import sys

    if sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("estimates fork workers only on Linux with two cores or more")
    specs = ["adam", "io_adam"]
    script = (
        "import json\n"
        "from memprof import api\n"
        f"records = api.estimate({deep_config!r}, {specs!r}, **{SETTINGS!r})\n"
        "print(json.dumps([r.to_dict() for r in records]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    forked = json.loads(done.stdout.strip().splitlines()[-1])
    in_turn = json.loads(json.dumps([estimated(spec).to_dict() for spec in specs]))
    for record in forked + in_turn:
        record["environment"].pop("command")
    assert forked == in_turn


def test_probes_not_started_ahead_are_measured_when_asked_for(estimated, monkeypatch):
    # What a later set of probes (the first was not affine) goes through: a job started when asked for.
    from concurrent.futures import ThreadPoolExecutor

    from memprof import execute
    from memprof.measure import depth

    in_turn = estimated("adam")
    monkeypatch.setattr(depth, "first_measurements", lambda settings: [])
    with ThreadPoolExecutor(1) as pool:
        jobs = execute._ForkedEstimates(pool, distributed=False)
        jobs.start(in_turn.settings)
        assert not jobs.futures
        (record,) = jobs.records(in_turn.settings)
    for each in (record, in_turn):
        each.environment.pop("command")  # what was typed: estimate() replaces it
    assert record.to_dict() == in_turn.to_dict() and not jobs.futures
