"""Activation checkpointing (--checkpointing): the engines applied, what recomputation allocates, estimates."""

from __future__ import annotations

import json

import pytest
from configs_for_tests import GPT2
from cli_for_tests import invoke

from memprof.api import estimate, measure
from memprof.taxonomy import PERSISTENT

CLOSE, SLACK = 0.005, 256  # tests/test_estimate.py's tolerance for a peak and the activations
TEXT = dict(batch_size=2, seq_len=32, steps=2, timeline=False)
VISION = dict(batch_size=2, image_size=32, steps=1, timeline=False)
COMPARED = ("breakdown", "peak", "peaks", "phase_peaks", "n_params", "parameters", "model_config", "status",
            "hyperparameters")  # tests/test_depth.py's



def _rows(record) -> dict[tuple[str, str], int]:
    return {(r.category, r.component): r.bytes for r in record.breakdown}


def test_checkpointing_keeps_fewer_activations_and_shows_what_recomputation_allocates(tiny_configs):
    runs = {c: measure(tiny_configs["gpt2"], ["adam"], device="cpu", checkpointing=c, **TEXT)[0]
            for c in ("none", "full", "selective")}
    saved = {c: _rows(r)[("activations", "saved")] for c, r in runs.items()}
    assert saved["full"] < saved["selective"] < saved["none"], saved
    assert ("activations", "recomputed") not in _rows(runs["none"])
    for name in ("full", "selective"):
        record = runs[name]
        assert record.status == "ok", record.failure
        assert _rows(record)[("activations", "recomputed")] > 0 and _rows(record)[("temporaries", "recompute")] > 0
        assert "transformers' activation_checkpointing_enable (non-reentrant) on the 2 GPT2Block layers" in \
            " ".join(record.notes)
        # Checkpointed runs peak in backward, where the recomputed block's saved tensors are live.
        assert record.peaks.phase == "backward" and record.components("activations", at_peak=True)["recomputed"] > 0
        for category in PERSISTENT:
            assert record.total(category) == runs["none"].total(category), (name, category)


@pytest.mark.parametrize("model, value", [("gpt2", "full"), ("gpt2", "selective"), ("gpt2", "every:2"),
                                          ("llama", "full"), ("llama", "selective"), ("resnet18", "full")])
def test_a_checkpointed_cpu_run_is_estimated_exactly(tiny_configs, model, value):
    name, settings = (model, VISION) if model == "resnet18" else (tiny_configs[model], TEXT)
    (real,) = measure(name, ["adam"], device="cpu", checkpointing=value, **settings)
    (fake,) = estimate(name, ["adam"], device="cpu", checkpointing=value, **settings)
    assert real.status == fake.status == "ok", (real.failure, fake.failure)
    for category in PERSISTENT:
        assert fake.total(category) == real.total(category), category
    assert _rows(fake).keys() == _rows(real).keys()
    for key, real_bytes in _rows(real).items():
        assert abs(_rows(fake)[key] - real_bytes) <= max(SLACK, CLOSE * real_bytes), key
    assert abs(fake.peaks.allocated - real.peaks.allocated) <= max(SLACK, CLOSE * real.peaks.allocated)
    assert fake.peaks.phase == real.peaks.phase


@pytest.mark.parametrize("value, blocks, probes", [("full", 6, "1, 2, 3"), ("selective", 6, "1, 2, 3"),
                                                   ("every:2", 12, "2, 4, 6")])
def test_depth_probes_extrapolate_a_checkpointed_model_exactly(tmp_path, value, blocks, probes):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**GPT2, "n_layer": blocks}))
    settings = dict(batch_size=4, seq_len=64, timeline=False, checkpointing=value, device="cpu")  # CUDA: not probed
    (full,) = estimate(str(path), ["adam"], full_depth=True, **settings)
    (probed,) = estimate(str(path), ["adam"], **settings)
    assert f"extrapolated to {blocks} blocks from probes of {probes} blocks" in probed.notes[-1]
    for key in COMPARED:
        assert getattr(probed, key) == getattr(full, key), key


def test_fit_under_checkpointing_finds_a_larger_batch_and_its_plot_names_the_recipe(tiny_configs):
    from memprof.api import fit
    from memprof.report.plot import plot_fit

    found = {c: fit(tiny_configs["gpt2"], "adam", "batch-size", memory="12MiB", seq_len=32, device="cpu",
                    checkpointing=c)[0] for c in ("none", "full")}
    assert 0 < found["none"].value < found["full"].value, {c: f.value for c, f in found.items()}
    assert found["full"].record.settings.checkpointing == "full"
    assert "(checkpointing full): largest batch size" in plot_fit([found["full"]]).axes[0].get_title(loc="left")


def test_other_models_get_torch_checkpoint_wrapper_on_every_nth_block_with_their_own_names():
    (plain,) = measure("resnet18", ["adam"], device="cpu", **VISION)
    (record,) = measure("resnet18", ["adam"], device="cpu", checkpointing="every:3", **VISION)
    assert record.status == "ok", record.failure
    assert "torch's apply_activation_checkpointing (checkpoint_wrapper, non-reentrant) on 3 of the 8 repeated " \
           "blocks (BasicBlock)" in " ".join(record.notes)
    assert [p.name for p in record.parameters] == [p.name for p in plain.parameters]  # no _checkpoint_wrapped_module
    assert _rows(record)[("activations", "saved")] < _rows(plain)[("activations", "saved")]


@pytest.mark.parametrize("args, message", [
    (["--checkpointing", "full"], "has no repeated blocks to checkpoint"),
    (["--checkpointing", "every:0"], "unknown --checkpointing 'every:0'; choose none, full, selective, every:N"),
    (["--checkpointing", "partial"], "unknown --checkpointing 'partial'"),
])
def test_bad_checkpointing_is_one_line(mlp_spec, args, message):
    result = invoke("compare", "--model", mlp_spec, "--opt", "adam", "--device", "cpu", "--steps", "1", *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_fit_plot_where_nothing_fits_still_names_the_recipe():
    from memprof.fit import Fit
    from memprof.record import RunRecord
    from memprof.report.plot import plot_fit
    from memprof.settings import Settings

    estimate_at_1 = RunRecord.failed(Settings(model="llama-7b", checkpointing="selective", grad_accum=2), "too big")
    nothing = Fit(spec="adam", setting="batch_size", budget=10, value=0, record=None, probes=[(1, 20)],
                  estimates=[estimate_at_1])
    title = plot_fit([nothing]).axes[0].get_title(loc="left")
    assert title == "llama-7b (checkpointing selective · grad-accum 2): largest batch size that fits"
