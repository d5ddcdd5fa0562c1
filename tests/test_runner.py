"""The measurement engine on CPU: exact bytes, deduplication, attribution, OOM."""

import math

import pytest
import torch
from zoo_for_tests import MLP_SHAPES

from memprof import runfile
from memprof.api import measure
from memprof.errors import UsageError
from memprof.taxonomy import CATEGORIES

BYTES = {"float32": 4, "bfloat16": 2}
N_MLP = sum(math.prod(s) for s in MLP_SHAPES)
STEP = 4  # torch keeps `step` as a float32 scalar tensor per parameter


def adafactor_state(b: int) -> int:
    factored = sum(s[0] + s[1] for s in MLP_SHAPES if len(s) == 2)
    full = sum(s[0] for s in MLP_SHAPES if len(s) == 1)
    return (factored + full) * b + len(MLP_SHAPES) * STEP


EXPECTED_STATE = {
    "adam": lambda b: 2 * N_MLP * b + len(MLP_SHAPES) * STEP,
    "adamw": lambda b: 2 * N_MLP * b + len(MLP_SHAPES) * STEP,
    "adam:amsgrad=true": lambda b: 3 * N_MLP * b + len(MLP_SHAPES) * STEP,
    "sgd": lambda b: N_MLP * b,
    "adafactor": adafactor_state,
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exact_bytes_for_baselines(mlp_spec, dtype):
    specs = list(EXPECTED_STATE)
    records = measure(mlp_spec, specs, device="cpu", dtype=dtype, steps=2, batch_size=4)
    b = BYTES[dtype]
    for spec, record in zip(specs, records):
        assert record.status == "ok", record.failure
        assert record.total("weights") == N_MLP * b
        assert record.total("gradients") == N_MLP * b
        assert record.total("optimizer_state") == EXPECTED_STATE[spec](b), spec
        assert record.total("inputs") == 4 * 16 * b + 4 * 8  # float input + int64 labels
        assert not record.inferred_roles


def test_state_components_follow_roles(mlp_spec):
    adafactor, adam = measure(mlp_spec, "adafactor,adam", device="cpu", steps=1)
    assert adafactor.components("optimizer_state") == {
        "factor": (32 + 16 + 4 + 32) * 4,
        "moment": (32 + 4) * 4,  # 1-D parameters keep a full second moment
        "other": 4 * STEP,
    }
    assert adam.components("optimizer_state") == {"moment": 2 * N_MLP * 4, "other": 4 * STEP}
    unfactored = {p.name for p in adafactor.parameters if p.unfactored}
    assert unfactored == {"0.bias", "2.bias"}


def test_tied_weights_counted_once(gpt2_spec):
    (record,) = measure(gpt2_spec, "sgd", device="cpu", steps=1)
    from zoo_for_tests import tiny_gpt2

    from memprof.models import ModelOptions

    model, _ = tiny_gpt2(ModelOptions())
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = sum(p.numel() for p in model.parameters()) * 4  # parameters() already dedups tied ones
    naive = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False)) * 4
    assert record.total("weights") == unique < naive
    assert record.total("optimizer_state") == unique  # one momentum buffer for the tied pair


def test_activations_recorded_and_peak_adds_up(gpt2_spec):
    (record,) = measure(gpt2_spec, "adam", device="cpu", steps=3)
    assert record.total("activations") > 0
    assert record.total("temporaries") > 0
    assert sum(r.bytes for r in record.peak) == record.peaks.allocated
    assert {r.category for r in record.peak} <= set(CATEGORIES)
    phases = [(p.step, p.phase) for p in record.phase_peaks]
    assert phases[-3:] == [(3, "forward"), (3, "backward"), (3, "step")]
    assert set(record.timings_ms) == {"forward", "backward", "step"}


def test_step_transient_seen_for_single_tensor_adam(mlp_spec):
    single, fused_free = measure(mlp_spec, "adam:foreach=false,sgd", device="cpu", steps=3)
    # single-tensor Adam materialises sqrt(v) and its quotient for one parameter at a time
    assert single.total("step_transient") == 2 * 32 * 16 * 4
    assert fused_free.total("step_transient") == 0


def test_step_is_steady_after_state_init(gpt2_spec):
    (record,) = measure(gpt2_spec, "adam", device="cpu", steps=3)
    step2, step3 = ([p for p in record.phase_peaks if p.step == s and p.phase == "step"][0] for s in (2, 3))
    assert step2.start == step3.start and step2.peak == step3.peak


def test_record_round_trips_through_json(mlp_spec, tmp_path):
    (record,) = measure(mlp_spec, "adafactor", device="cpu", steps=1)
    path = tmp_path / "run.json"
    runfile.write(path, [record])
    (loaded,) = runfile.read(path)
    assert loaded.breakdown == record.breakdown and loaded.parameters == record.parameters
    assert loaded.peaks == record.peaks and loaded.phase_peaks == record.phase_peaks


class ExplodingAdam(torch.optim.Adam):
    """Runs out of memory in its first step, like an optimizer too big for the card."""

    def step(self, closure=None):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


def test_oom_is_a_result_not_a_crash(mlp_spec):
    records = measure(mlp_spec, "sgd,test_runner.ExplodingAdam,adam", device="cpu", steps=2)
    assert [r.status for r in records] == ["ok", "oom", "ok"]
    assert records[1].failure == "OOM in step (step 1)"
    assert records[1].peaks.allocated > 0


def test_unknown_dotted_path_is_usage_error(mlp_spec):
    with pytest.raises(UsageError, match="unknown optimizer"):
        measure(mlp_spec, "torch.optim.NoSuchThing", device="cpu")
