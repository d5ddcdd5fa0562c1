"""A deep model's estimate from shallow probes (memprof.measure.depth) against the whole model, op by op."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from memprof.api import estimate
from memprof.measure.depth import NotAffine, _affine, _check_blocks, _prose, probe
from memprof.models.base import ModelOptions
from memprof.settings import Settings, declared_fields

# Six GPT-2 blocks, small enough that the full-depth estimate takes seconds.
CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 6, "n_embd": 64, "n_head": 4,
          "vocab_size": 512, "n_positions": 64}
SETTINGS = dict(batch_size=2, seq_len=32, timeline=False, device="cpu")  # a CUDA target is not probed
COMPARED = ("breakdown", "peak", "peaks", "phase_peaks", "n_params", "parameters", "model_config", "status",
            "failure", "hyperparameters")


def _config(tmp_path_factory, config: dict) -> str:
    path = tmp_path_factory.mktemp(config["model_type"]) / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def deep_config(tmp_path_factory) -> str:
    return _config(tmp_path_factory, CONFIG)


def _both(model: str, spec: str, **settings):
    """The full-depth and the probed estimate of one optimizer."""
    (full,) = estimate(model, [spec], full_depth=True, **SETTINGS, **settings)
    (probed,) = estimate(model, [spec], **SETTINGS, **settings)
    return full, probed


def _assert_equal(probed, full) -> None:
    for key in COMPARED:
        assert getattr(probed, key) == getattr(full, key), key


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
    _assert_equal(probed, full)
    assert probed.environment["estimate"] == full.environment["estimate"]  # host reads counted for 6 blocks


# Each recipe: the model's changes to CONFIG (its depth: the blocks probed in all may not exceed it), the run's
# settings and the probes that serve. Sizes matter: where a figure is not affine at the probes (checkpointing at
# batch 2 × 32 peaks in backward at one block and in the step from two; LoRA's peaks at 512 tokens of vocabulary)
# the model is estimated op by op, equal by construction, so each recipe has sizes whose probes serve. LoRA: over
# a frozen embedding block 0's input needs no gradient, so block 0 differs (probes from 2). FSDP2: at one block
# no all-gather is prefetched while another is held (probes from 2, from 10 blocks); under mixed precision the
# peak before the blocks in step 2's forward grows by 313,344 B, 412,160 B, then 413,696 B per block from 2 to 5
# blocks, affine from 4: probes of 4, 5, 6 blocks, which only a model of 21 blocks or more gets (1 + 2 + … + 6).
RECIPES = {
    "checkpointing full": ({"n_layer": 6}, dict(checkpointing="full", batch_size=4, seq_len=64), "1, 2, 3"),
    "checkpointing selective": ({"n_layer": 6}, dict(checkpointing="selective", batch_size=4, seq_len=64), "1, 2, 3"),
    "checkpointing every:2": ({"n_layer": 12}, dict(checkpointing="every:2"), "2, 4, 6"),
    "amp and checkpointing": ({"n_layer": 6}, dict(amp="bf16", checkpointing="full", batch_size=4, seq_len=64),
                              "1, 2, 3"),
    # all-linear targets on a CPU target are not affine at these sizes (the estimate then runs at full depth)
    "lora": ({"n_layer": 10}, dict(lora="r=4"), "2, 3, 4"),
    "qlora": ({"n_layer": 10}, dict(lora="r=4,quant=nf4"), "2, 3, 4"),
    "grad-accum": ({"n_layer": 6}, dict(grad_accum=2), "1, 2, 3"),
    "fsdp2": ({"n_layer": 10}, dict(nproc=2, parallel="fsdp2", rank=1), "2, 3, 4"),
    "fsdp2 mixed precision": ({"n_layer": 21}, dict(nproc=2, parallel="fsdp2", fsdp_mixed_precision="bf16", rank=1),
                              "4, 5, 6"),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_depth_probes_stay_exact_under_every_recipe(tmp_path_factory, recipe):
    changes, settings, probes = RECIPES[recipe]
    (full,) = estimate(_config(tmp_path_factory, {**CONFIG, **changes}), ["adam"], full_depth=True,
                       **{**SETTINGS, **settings})
    (probed,) = estimate(full.settings.model, ["adam"], **{**SETTINGS, **settings})
    assert full.status == "ok", full.failure
    assert probed.notes[-1].startswith(f"extrapolated to {changes['n_layer']} blocks from probes of {probes} blocks")
    _assert_equal(probed, full)
    assert probed.notes[:-1] == full.notes and probed.environment["estimate"] == full.environment["estimate"]


def test_a_peak_that_moves_within_a_phase_is_caught(deep_config):
    # IO-Adam keeps every gradient until the next step. On GPT-2 (12 blocks, batch 2 x 64) step 2's forward
    # peaks at its start (the gradients) at 1-3 blocks and after the blocks (the activations) at 12: two lines
    # that cross beyond the probes, which only the peaks followed within the phase reveal.
    from memprof.measure.runner import measure

    settings = Settings(model=deep_config, optimizer="io_adam", spec="io_adam", estimate=True,
                        steps=2, **SETTINGS)
    three = measure(probe(settings, 3))
    forward = next(p for p in three.phase_peaks if (p.phase, p.step) == ("forward", 2))
    assert set(forward.blocks) == {"before", "first block", "last block", "after"}
    assert max(forward.blocks.values()) <= forward.peak
    _check_blocks(three, three, 3)
    moved = dataclasses.replace(forward, blocks={**forward.blocks, "after": forward.peak + 1})
    with pytest.raises(NotAffine, match=r"forward \(step 2\) peaks after at 12 blocks"):
        _check_blocks(three, dataclasses.replace(three, phase_peaks=[moved]), 12)


@pytest.mark.parametrize("spec", ["io_adam"])
def test_a_fallback_or_an_extrapolation_gives_the_full_depth_figures(estimated, spec):
    full, probed = estimated(spec, full_depth=True), estimated(spec)
    _assert_equal(probed, full)


@pytest.mark.parametrize("spec", ["io_adam", "galore"])
def test_the_step_and_the_parameter_table_of_a_llama(tmp_path_factory, spec):
    # IO-Adam creates the matrices' state in backward (listed last block first) and the norms' in the step
    # (first block first). GaLore's step 1 peaks early (the embeddings' update) at 1-3 blocks, at its end at 8.
    full, probed = _both(_config(tmp_path_factory, LLAMA), spec)
    _assert_equal(probed, full)


def test_shallow_models_and_full_depth_are_estimated_whole(mlp_spec, estimated):
    (mlp,) = estimate(mlp_spec, ["adam"], device="cpu", steps=1, timeline=False)
    assert not any("blocks" in note for note in mlp.notes)
    full = estimated("adam", full_depth=True)
    assert full.timeline.time == [] and not any("extrapolated" in note for note in full.notes)


# Eight LLaMA blocks of 41,088 parameters under embeddings of 196,608 each.
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 8, "hidden_size": 64,
         "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 3072,
         "max_position_embeddings": 64, "tie_word_embeddings": False}


def test_a_partition_over_all_the_parameters_is_not_extrapolated(tmp_path_factory):
    # ZeroRedundancyOptimizer hands whole parameters to ranks greedily, largest first: on 3 ranks rank 0 holds
    # the embedding alone at 1-3 blocks (its figures affine: constant) and block parameters too at 8.
    full, probed = _both(_config(tmp_path_factory, LLAMA), "adam", nproc=3, parallel="zero1")
    assert any(".layers." in row.name and row.state_bytes for row in full.parameters)
    assert probed.notes[-1].startswith("estimated op by op at full depth: --parallel zero1: ZeroRedundancyOptimizer")
    _assert_equal(probed, full)


def test_batches_over_all_the_parameters_are_not_extrapolated(tmp_path_factory):
    # AdaMeM steps the matrices of one shape from every block together: the step transient of the blocks'
    # batch grows with the depth and overtakes another's beyond the probes (extrapolated: 5 % low).
    full, probed = _both(_config(tmp_path_factory, LLAMA), "adamem")
    assert probed.notes[-1].startswith("estimated op by op at full depth: adamem: it steps the matrices of one shape")
    _assert_equal(probed, full)


QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 8, "hidden_size": 64,
         "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
         "max_position_embeddings": 64, "use_sliding_window": False}
GEMMA2 = {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "num_hidden_layers": 8, "hidden_size": 64,
          "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "vocab_size": 512, "max_position_embeddings": 64, "sliding_window": 16}  # sliding and full in turn


@pytest.mark.parametrize("config", [QWEN2, GEMMA2], ids=["qwen2", "gemma2"])
def test_per_layer_config_lists_extrapolate(tmp_path_factory, config):
    full, probed = _both(_config(tmp_path_factory, config), "adam")
    assert len(full.model_config["hf_config"]["layer_types"]) == 8
    assert probed.notes[-1].startswith("extrapolated to 8 blocks from probes of 1, 2, 3 blocks")
    _assert_equal(probed, full)


def test_a_kind_of_block_the_probes_did_not_add_is_not_extrapolated(tmp_path_factory):
    # Sliding windows from block 4 on: probes of 1-3 blocks add full-attention blocks only (extrapolated, the
    # peaks would be wrong).
    config = {**QWEN2, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 4}
    full, probed = _both(_config(tmp_path_factory, config), "adam")
    assert probed.notes[-1] == ("estimated op by op at full depth: probes of 1, 2, 3 blocks: block 4 has layer_types "
                                "'sliding_attention', which no block they added has")
    _assert_equal(probed, full)


def test_an_optimizer_that_fails_at_every_probe_gives_the_models_failed_row(deep_config):
    full, probed = _both(deep_config, "optim_for_tests.ExitingSGD")  # raises SystemExit in step()
    assert probed.status == "failed" and probed.n_params == full.n_params > 0
    assert probed.notes[-1].startswith("extrapolated to 6 blocks")
    _assert_equal(probed, full)


def test_a_probe_that_failed_before_measuring_is_the_models_row(deep_config):
    full, probed = _both(deep_config, "io_adam", nproc=2, parallel="fsdp2")  # its hooks cannot run under FSDP2
    assert probed.status == "failed" and probed.failure.startswith("cannot run: fsdp2: io_adam hooks")
    assert probed.notes[-1] == "failed on a probe of 1 of the model's 6 blocks, before anything was measured"
    _assert_equal(probed, full)


def test_a_probes_block_count_is_no_setting(deep_config):
    settings = Settings(model=deep_config, optimizer="adam", spec="adam", estimate=True, device="cuda")
    two = probe(settings, 2)
    assert ModelOptions.of(two).blocks == 2 and ModelOptions.of(settings).blocks is None
    assert two != probe(settings, 3) and two.replace(timeline=True) != settings
    assert {"blocks", "depth"}.isdisjoint(f.name for f in declared_fields())


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
