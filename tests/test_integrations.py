"""The Hugging Face Trainer and Lightning callbacks, through the runnable examples: a window of the trainer's own
steps measured on CPU and written, the optimizer's state split by role."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest

from memprof import runfile

EXAMPLES = Path(__file__).parents[1] / "examples"


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"memprof_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_trainer_callback_measures_steps_of_a_tiny_gpt2(tmp_path):
    callback = example("hf_trainer").main(output=str(tmp_path / "hf.json"), steps=2, skip=1)
    (record,) = runfile.read(tmp_path / "hf.json")
    assert record.status == "ok" and record.settings.steps == 2 and record.settings.spec == "adamw"
    assert record.settings.model == "GPT2LMHeadModel" and record.settings.batch_size == 2
    params = sum(p.param_bytes for p in record.parameters)
    assert record.components("optimizer_state") == {"moment": 2 * params, "other": record.components(
        "optimizer_state")["other"]}
    assert record.total("gradients") == params and record.total("activations") > 0
    assert callback.record.peaks.allocated == record.peaks.allocated


def test_the_lightning_callback_measures_steps_of_a_tiny_module(tmp_path):
    pytest.importorskip("lightning")
    callback = example("lightning_module").main(output=str(tmp_path / "pl.csv"), steps=2, skip=1)
    (record,) = runfile.read(tmp_path / "pl.csv")
    assert record.status == "ok" and record.settings.steps == 2
    assert record.settings.model == "TinyRegressor" and record.settings.spec == "adam"
    params = (32 * 64 + 64 + 64 + 1) * 4
    assert record.components("optimizer_state") == {"moment": 2 * params, "other": 4 * 4}
    assert callback.record.parameters[0].name == "net.0.weight"


def test_a_window_longer_than_the_training_is_a_warning_and_no_file(tmp_path):
    pytest.importorskip("lightning")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback = example("lightning_module").main(output=str(tmp_path / "pl.csv"), steps=3, skip=1,
                                                                 train_steps=3)
    assert callback.record is None and not (tmp_path / "pl.csv").exists()
    assert any("memprof: nothing written" in str(w.message) and "steps=3 after skip=1 but saw 3 optimizer step(s)" in str(w.message)
               for w in caught)
