"""Gradient accumulation (--grad-accum N): N micro-batches per optimizer step, each with its own peaks."""

from __future__ import annotations

import json

import pytest
from configs_for_tests import GPT2
from cli_for_tests import invoke

from memprof import runfile
from memprof.api import estimate, measure
from memprof.runfile import to_json
from memprof.settings import Settings
from memprof.taxonomy import PERSISTENT

CLOSE, SLACK = 0.005, 256  # tests/test_estimate.py's tolerance for a peak and the activations
TEXT = dict(batch_size=2, seq_len=32, steps=2, timeline=False)



def test_micro_batches_accumulate_gradients_and_each_has_its_peaks(tiny_configs, tmp_path):
    (single,) = measure(tiny_configs["gpt2"], ["adam"], device="cpu", **TEXT)
    (record,) = measure(tiny_configs["gpt2"], ["adam"], device="cpu", grad_accum=3, **TEXT)
    assert record.status == "ok", record.failure
    order = [(p.step, p.micro, p.phase) for p in record.phase_peaks if p.phase in ("forward", "backward", "step")]
    expected = []
    for step in (1, 2):
        expected += [(step, micro, phase) for micro in range(3) for phase in ("forward", "backward")]
        expected.append((step, 0, "step"))
    assert order == expected
    for category in PERSISTENT:  # one set of gradients, accumulated in place
        assert record.total(category) == single.total(category), category
    backward = {p.micro: p for p in record.phase_peaks if (p.step, p.phase) == (2, "backward")}
    # From the second micro-batch on, the accumulated gradients are live beside the new activations.
    assert backward[1].start > backward[0].start and backward[1].peak == backward[2].peak
    assert record.peaks.allocated > single.peaks.allocated and record.peaks.micro >= 1
    loaded = runfile.read(_written(tmp_path, record))[0]
    assert [p.micro for p in loaded.phase_peaks] == [p.micro for p in record.phase_peaks]
    assert loaded.settings.grad_accum == 3


def _written(tmp_path, record):
    path = tmp_path / "run.json"
    path.write_text(to_json([record]))
    return path


@pytest.mark.parametrize("model, extra", [("gpt2", {}), ("llama", {}), ("gpt2", {"checkpointing": "full"})])
def test_an_accumulating_cpu_run_is_estimated_exactly(tiny_configs, model, extra):
    (real,) = measure(tiny_configs[model], ["adam"], device="cpu", grad_accum=2, **extra, **TEXT)
    (fake,) = estimate(tiny_configs[model], ["adam"], device="cpu", grad_accum=2, **extra, **TEXT)
    assert real.status == fake.status == "ok", (real.failure, fake.failure)
    for category in PERSISTENT:
        assert fake.total(category) == real.total(category), category
    for fake_bytes, real_bytes in ((fake.peaks.allocated, real.peaks.allocated),
                                   (fake.total("activations"), real.total("activations"))):
        assert abs(fake_bytes - real_bytes) <= max(SLACK, CLOSE * real_bytes)
    assert [(p.micro, p.peak) for p in fake.phase_peaks] == [(p.micro, p.peak) for p in real.phase_peaks]


def test_depth_probes_extrapolate_an_accumulating_run_exactly(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**GPT2, "n_layer": 6}))
    settings = dict(batch_size=4, seq_len=64, timeline=False, grad_accum=2, checkpointing="full", device="cpu")
    (full,) = estimate(str(path), ["adam"], full_depth=True, **settings)
    (probed,) = estimate(str(path), ["adam"], **settings)
    assert "extrapolated to 6 blocks from probes of 1, 2, 3 blocks" in probed.notes[-1]
    for key in ("breakdown", "peak", "peaks", "phase_peaks", "n_params", "parameters", "status"):
        assert getattr(probed, key) == getattr(full, key), key


def test_simulated_ddp_reduces_once_per_optimizer_step(mlp_spec, monkeypatch):
    from memprof.strategies import ddp

    calls = []
    original = ddp._simulated_allreduce

    def counted(state, bucket):
        calls.append(bucket.index())
        return original(state, bucket)

    monkeypatch.setattr(ddp, "_simulated_allreduce", counted)
    (record,) = estimate(mlp_spec, "adam", device="cpu", steps=1, nproc=2, parallel="ddp", grad_accum=3)
    assert record.status == "ok", record.failure
    assert calls == [0]  # no_sync for the first two micro-batches: one bucket, all-reduced once
    assert sorted({p.micro for p in record.phase_peaks if p.phase == "backward"}) == [0, 1, 2]


def test_deepspeed_is_told_the_micro_batches():
    from memprof.strategies.deepspeed import ds_config

    assert ds_config(Settings(grad_accum=4), 2, 100)["gradient_accumulation_steps"] == 4


def test_grad_accum_0_is_one_line(mlp_spec):
    result = invoke("compare", "--model", mlp_spec, "--opt", "adam", "--device", "cpu", "--grad-accum", "0")
    assert result.exit_code == 2 and "--grad-accum" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    with pytest.raises(Exception, match="--grad-accum must be at least 1, got 0"):
        Settings(grad_accum=0)


def test_recipes_are_config_keys_csv_columns_and_reproduce_flags(tmp_path):
    from memprof.config import requests
    from memprof.record import Peaks, Row, RunRecord
    from memprof.settings import reproduce_command

    config = tmp_path / "run.toml"
    config.write_text('model = "gpt2"\nopt = "adam"\ngrad_accum = 3\ncheckpointing = "every:2"\n')
    (request,) = requests({}, config=config)
    assert (request.settings["grad_accum"], request.settings["checkpointing"]) == (3, "every:2")
    record = RunRecord(settings=Settings(spec="adam", optimizer="adam", device="cpu", grad_accum=3,
                                         checkpointing="every:2"), environment={},
                       breakdown=[Row("weights", "param", 8)], peak=[Row("weights", "param", 8, "allocator")],
                       peaks=Peaks(allocated=8))
    path = tmp_path / "run.csv"
    path.write_text(runfile.to_csv([record]))
    (loaded,) = runfile.read(path)
    assert (loaded.settings.grad_accum, loaded.settings.checkpointing) == (3, "every:2")
    assert "--checkpointing every:2 --grad-accum 3" in reproduce_command(record.settings, ["adam"])


def test_real_and_simulated_fsdp2_ranks_agree_under_both_recipes(gpt2_spec):
    import torch.distributed

    if not torch.distributed.is_available():
        pytest.skip("torch built without torch.distributed")
    settings = dict(device="cpu", steps=1, nproc=2, parallel="fsdp2", grad_accum=2, checkpointing="full",
                    timeline=False)
    real = measure(gpt2_spec, "adam", **settings)
    (simulated,) = estimate(gpt2_spec, "adam", rank=0, **settings)
    assert [r.status for r in real] == ["ok", "ok"] and simulated.status == "ok", simulated.failure
    for category in ("weights", "gradients", "optimizer_state"):
        assert simulated.components(category) == real[0].components(category), category
    assert abs(simulated.peaks.allocated - real[0].peaks.allocated) <= 0.05 * real[0].peaks.allocated
    for record in (*real, simulated):
        assert record.components("activations")["recomputed"] > 0
        assert {p.micro for p in record.phase_peaks if p.phase == "backward"} == {0, 1}
