"""--lora: PEFT adapters on a frozen base, measured, estimated and probed in depth, against hand counts."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from cli_for_tests import invoke

from memprof.api import estimate, measure
from memprof.errors import UsageError
from memprof.lora import ALL_LINEAR, LoraRequest, parse
from memprof.optim.registry import registry
from memprof.taxonomy import PERSISTENT

GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_embd": 32, "n_head": 2,
        "vocab_size": 128, "n_positions": 32, "bos_token_id": 0, "eos_token_id": 0}
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 128,
         "max_position_embeddings": 32}
TINY = dict(batch_size=1, seq_len=8, steps=1, timeline=False)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="PEFT is not installed: pip install '.[lora]' runs these tests")


def _config(tmp_path_factory, name: str, config: dict) -> str:
    path = tmp_path_factory.mktemp(name) / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> str:
    return _config(tmp_path_factory, "gpt2", GPT2)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return _config(tmp_path_factory, "llama", LLAMA)


def test_the_text_parses_strictly():
    assert parse("r=8,alpha=16,targets=q_proj+v_proj,dropout=0.05,quant=nf4") == LoraRequest(
        r=8, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj"), quant="nf4")
    assert parse("targets=ALL-LINEAR").targets == ALL_LINEAR and parse("r=2").targets is None
    for text, message in [("r=0", "r must be a positive integer"), ("r=-3", "positive integer"),
                          ("r=2.5", "positive integer"), ("rank=8", "unknown key 'rank'; valid keys: r, alpha"),
                          ("r=8,targets=q,v", "joined by '+'"), ("alpha=0", "alpha must be a positive number"),
                          ("dropout=1", "below 1"), ("quant=nf3", "choose nf4, int8"), ("r=8,r=4", "given twice"),
                          ("targets=q+q", "twice"), ("targets=q proj", "module names joined by '+'")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse(text)


@pytest.mark.parametrize("lora, message", [
    ("r=0", "--lora: r must be a positive integer"),
    ("rank=4", "--lora: unknown key 'rank'; valid keys"),
    ("targets=q_proj", "has no layer named 'q_proj'; layers LoRA adapts here: wte, wpe, c_attn, c_proj, c_fc"),
])
def test_bad_lora_is_one_line_and_exit_2(gpt2, lora, message):
    result = invoke("compare", "--model", gpt2, "--opt", "adam", "--device", "cpu", "--steps", "1", "--seq-len", "8",
                    "--lora", lora)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_without_peft_lora_is_one_line_naming_the_extra(mlp_spec, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(UsageError, match=r"--lora needs PEFT, which is not installed: pip install 'memprof\[lora\]'"):
        measure(mlp_spec, ["adam"], device="cpu", lora="r=2,targets=0", **TINY)


def test_a_model_without_default_targets_names_its_layers(mlp_spec):
    with pytest.raises(UsageError, match=r"PEFT has no default targets for .*: 0, 2"):
        measure(mlp_spec, ["adam"], device="cpu", lora="r=2", **TINY)
    (record,) = measure(mlp_spec, ["adam"], device="cpu", lora="r=2,targets=0", **TINY)
    assert record.components("weights") == {"adapter": (16 * 2 + 2 * 32) * 4, "frozen": (16 * 32 + 32 + 32 * 4 + 4) * 4}


def test_every_registered_optimizer_steps_the_adapters_alone(gpt2):
    names = [name for name, entry in registry().items() if entry.requires is None]
    for record in measure(gpt2, names, device="cpu", lora="r=2", **TINY):
        assert record.status == "ok", (record.settings.spec, record.failure)
        assert {p.component for p in record.parameters} == {"adapter"}, record.settings.spec
        assert all(".lora_" in p.name for p in record.parameters), record.settings.spec
        assert set(record.components("weights")) == {"adapter", "frozen"}
        # The adapters' gradients: c_attn (32 → 96) with rank 2, in each of the 2 blocks (IO-Adam keeps none).
        assert record.total("gradients") in (0, 2 * (32 * 2 + 2 * 96) * 4), record.settings.spec


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_the_estimate_counts_what_a_cpu_run_holds_and_adam_holds_two_moments_per_adapter(model, request):
    path = request.getfixturevalue(model)
    settings = dict(TINY, steps=2, lora="r=4,targets=all-linear")
    (real,) = measure(path, ["adam"], device="cpu", **settings)
    (fake,) = estimate(path, ["adam"], device="cpu", **settings)
    for category in PERSISTENT:
        assert fake.components(category) == real.components(category), category
    adapters = sum(p.param_bytes for p in real.parameters)
    assert real.components("weights")["adapter"] == adapters
    assert real.components("gradients") == {"grad": adapters}
    # Adam: exp_avg and exp_avg_sq per adapter (fp32, as the adapters), and a 4-byte step counter for each.
    assert real.components("optimizer_state") == {"moment": 2 * adapters, "other": 4 * len(real.parameters)}
    assert fake.peaks.allocated == real.peaks.allocated
    assert real.model_config["lora"]["trainable_parameters"] * 4 == adapters


def test_bf16_base_keeps_fp32_adapters_as_peft_does(gpt2):
    (record,) = estimate(gpt2, ["adam"], device="cpu", dtype="bfloat16", lora="r=2", **TINY)
    assert {p.dtype for p in record.parameters} == {"float32"}
    frozen = record.components("weights")["frozen"]
    (full,) = estimate(gpt2, ["adam"], device="cpu", dtype="bfloat16", **TINY)
    assert frozen == full.total("weights") and record.total("gradients") == sum(p.param_bytes for p in record.parameters)


def test_the_record_and_its_reproduce_command_carry_the_setting(gpt2, tmp_path):
    from memprof import runfile
    from memprof.settings import reproduce_command

    (record,) = measure(gpt2, ["sgd"], device="cpu", lora="r=2,targets=c_attn+c_fc", **TINY)
    assert "--lora r=2,targets=c_attn+c_fc" in reproduce_command(record.settings, ["sgd"])
    assert record.notes[0].startswith("LoRA (PEFT ") and "rank 2 adapters on 4 layers (c_attn, c_fc)" in record.notes[0]
    for suffix in ("csv", "json"):
        path = tmp_path / f"run.{suffix}"
        runfile.write(path, [record])
        (back,) = runfile.read(path, "run")
        assert back.settings.lora == "r=2,targets=c_attn+c_fc"


COMPARED = ("breakdown", "peak", "peaks", "phase_peaks", "n_params", "parameters", "model_config", "status",
            "hyperparameters")


@pytest.mark.parametrize("lora", ["r=4,targets=all-linear", "r=4,quant=nf4"])
def test_depth_probes_stay_exact_under_lora(tmp_path_factory, lora):
    # Over a frozen embedding the first block's input needs no gradient, so block 0 differs from the others:
    # probes of 1-3 blocks are not affine, probes of 2-4 are (10 blocks: deep enough to probe them).
    deep = _config(tmp_path_factory, "gpt2-10", {**GPT2, "n_layer": 10, "vocab_size": 1024})
    settings = dict(batch_size=2, seq_len=16, timeline=False, lora=lora, device="cpu")  # CUDA: not probed
    (full,) = estimate(deep, ["adam"], full_depth=True, **settings)
    (probed,) = estimate(deep, ["adam"], **settings)
    # A CUDA target is no longer probed (its allocator is simulated at full depth); on a CPU target the probes
    # are not affine under LoRA and the estimate falls back to the whole model: either way, the same figures.
    assert probed.notes[-1].startswith(("extrapolated to 10 blocks", "estimated op by op at full depth"))
    for key in COMPARED:
        assert getattr(probed, key) == getattr(full, key), key
    assert probed.notes[:-1] == full.notes and probed.environment["estimate"] == full.environment["estimate"]


@pytest.mark.slow  # two gloo ranks, each a process of its own
def test_fsdp2_shards_frozen_base_and_adapters_in_one_unit_and_the_simulation_agrees(gpt2):
    # FSDP2 accepts a block whose parameters mix requires_grad (the frozen base and its adapters): each rank holds
    # half of each, gradients and Adam state for its half of the adapters alone.
    settings = dict(TINY, lora="r=4,targets=all-linear", nproc=2, parallel="fsdp2")
    ranks = measure(gpt2, ["adam"], device="cpu", **settings)
    (single,) = measure(gpt2, ["adam"], device="cpu", **{**TINY, "lora": settings["lora"]})
    adapters = single.components("weights")["adapter"]
    for rank, real in enumerate(ranks):
        assert real.status == "ok", real.failure
        assert real.components("weights")["adapter"] == adapters // 2
        assert real.components("gradients") == {"grad": adapters // 2}
        assert real.components("optimizer_state")["moment"] == adapters
        (simulated,) = estimate(gpt2, ["adam"], device="cpu", rank=rank, **settings)
        for category in ("weights", "gradients", "optimizer_state"):
            assert simulated.components(category) == real.components(category), category


# -- QLoRA: the frozen base quantized, in bitsandbytes' documented layout (analytic) -------------------------------
def test_nf4_and_int8_round_trip_within_their_step():
    import torch

    from memprof.models.quant import BLOCK, NF4_TABLE, storage_bytes

    weight = torch.randn(48, 70) * 0.02  # 3,360 weights: blocks of 64 and nibble pairs do not divide the rows
    for kind, worst in (("nf4", max(b - a for a, b in zip(NF4_TABLE, NF4_TABLE[1:])) / 2), ("int8", 0.5 / 127)):
        storage = torch.ops.memprof.quantize(weight, kind)
        assert [t.untyped_storage().nbytes() for t in storage] == list(storage_bytes(kind, 48, 70).values())
        back = torch.ops.memprof.dequantize(storage, 48, 70, torch.float32)
        scale = weight.abs().amax(dim=1, keepdim=True) if kind == "int8" else \
            torch.cat([weight.reshape(-1), weight.new_zeros(-weight.numel() % BLOCK)]).view(-1, BLOCK).abs().amax(1)
        error = (back - weight).abs()
        bound = scale if kind == "int8" else scale.repeat_interleave(BLOCK)[:weight.numel()].view(48, 70)
        assert (error <= worst * bound * 1.02 + 1e-6).all(), kind  # 2 %: the absmax's own 8-bit code (nf4)


@pytest.mark.parametrize("model", ["gpt2", "llama"])
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_qlora_base_is_codes_and_scales_and_the_estimate_counts_them_exactly(model, quant, request):
    import torch

    from memprof.models.quant import storage_bytes

    path = request.getfixturevalue(model)
    settings = dict(TINY, lora=f"r=2,quant={quant}")
    (real,) = measure(path, ["adam"], device="cpu", **settings)
    (fake,) = estimate(path, ["adam"], device="cpu", **settings)
    assert real.status == "ok" and not any(n.startswith("loss became") for n in real.notes), real.failure
    for category in PERSISTENT:
        assert fake.components(category) == real.components(category), category
    assert fake.peaks.allocated == real.peaks.allocated
    # Hand count: every linear layer but the head, from the model's own shapes.
    config = GPT2 if model == "gpt2" else LLAMA
    hidden = config.get("n_embd", config.get("hidden_size"))
    if model == "gpt2":
        shapes = [(3 * hidden, hidden), (hidden, hidden), (4 * hidden, hidden), (hidden, 4 * hidden)]
    else:
        kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
        inner = config["intermediate_size"]
        shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inner, hidden), (inner, hidden),
                  (hidden, inner)]
    layers = [storage_bytes(quant, *shape) for shape in shapes] * 2  # two blocks
    weights = real.components("weights")
    assert weights["quant codes"] == sum(layer["codes"] for layer in layers)
    assert weights["quant scales"] == sum(sum(layer.values()) - layer["codes"] for layer in layers)
    # The parameter count is the base's (a code stands for a weight) and the adapters'; a tied head stays tied.
    adapters = real.model_config["lora"]["trainable_parameters"]
    assert real.n_params == real.model_config["parameters"] == _unquantized_count(path) + adapters
    assert any(note.startswith(f"analytic: QLoRA base quantized to {quant}") for note in real.notes)
    assert torch.ops.memprof.dequantize.default  # the op a tracker sees (its output only)


def _unquantized_count(path: str) -> int:
    from memprof.models import ModelOptions, build_model

    return sum(p.numel() for p in build_model(path, ModelOptions(seq_len=8), device="meta").model.parameters())


def test_qlora_under_fsdp2_is_one_line_and_exit_2(gpt2):
    for args in (["compare", "--nproc", "2", "--device", "cpu"], ["estimate", "--world-size", "2"]):
        result = invoke(*args, "--model", gpt2, "--opt", "adam", "--steps", "1", "--seq-len", "8", "--parallel",
                        "fsdp2", "--lora", "r=2,quant=nf4")
        assert result.exit_code == 2 and "cannot be sharded by FSDP2" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1


def test_fit_searches_under_lora_and_its_figure_says_which_recipe(mlp_spec):
    from memprof.api import fit
    from memprof.gpus import need
    from memprof.report.plot import plot_fit

    settings = dict(device="cpu", steps=2, lora="r=2,targets=0+2")
    (at_8,) = estimate(mlp_spec, "sgd", batch_size=8, **settings)
    (result,) = fit(mlp_spec, "sgd", "batch-size", memory=f"{need(at_8)}B", **settings)
    assert result.value == 8 and result.record.settings.lora == "r=2,targets=0+2"
    assert result.record.components("weights")["adapter"] == at_8.components("weights")["adapter"] > 0
    assert "LoRA r=2,targets=0+2" in plot_fit([result]).axes[0].get_title(loc="left")
