"""memprof estimate with mixed precision (``--amp``) and on mixture-of-experts models, against real CPU runs."""

from __future__ import annotations

import warnings

import pytest
import torch
from cli_for_tests import invoke
from torch import nn

from memprof.api import estimate, measure
from memprof.measure.cuda_autocast import (
    BANNED,
    FP32,
    FP32_APPEND_DTYPE,
    FP32_SET_OPT_DTYPE,
    KEPT_AS_CPU,
    LOWER_PRECISION,
    PROMOTE,
    CudaAutocast,
)
from memprof.taxonomy import PERSISTENT

CLOSE, SLACK = 0.005, 256  # as tests/test_estimate.py: a real CPU run can lose a small storage to address reuse
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "num_experts_per_tok": 2, "vocab_size": 500, "max_position_embeddings": 128}
MOE = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 8}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 8}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"num_experts": 8, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32}),
}


def moe_config(tmp_path, family: str) -> str:
    """A tiny config.json of ``family`` (8 experts, 2 layers, hidden size 32): built from it, nothing downloaded."""
    import transformers

    config_class, architecture, experts = MOE[family]
    config = getattr(transformers, config_class)(**SMALL, **experts)
    config.architectures = [architecture]
    config.save_pretrained(tmp_path / family)
    return str(tmp_path / family)


def assert_estimates(real, fake) -> None:
    assert real.status == "ok" and fake.status == "ok", (real.failure, fake.failure)
    for category in PERSISTENT:
        assert fake.total(category) == real.total(category), category
    for fake_bytes, real_bytes in ((fake.peaks.allocated, real.peaks.allocated),
                                   (fake.total("activations"), real.total("activations"))):
        assert abs(fake_bytes - real_bytes) <= max(SLACK, CLOSE * real_bytes)


def pair(model: str, spec: str = "adam", **settings):
    settings = {"device": "cpu", "timeline": False, "steps": 1, "seq_len": 16, **settings}
    ((real,), (fake,)) = measure(model, [spec], **settings), estimate(model, [spec], **settings)
    return real, fake


@pytest.mark.parametrize("family, dtype", [("mixtral", "float32"), ("olmoe", "float32"), ("qwen2_moe", "float32"),
                                           ("mixtral", "float16"), ("mixtral", "bfloat16")])
def test_moe_models_estimate_their_cpu_run_in_every_dtype(tmp_path, family, dtype):
    # torch's meta kernel of _grouped_mm took only bf16 (fp16 with cuBLASLt): fp32 and fp16 failed to estimate
    real, fake = pair(moe_config(tmp_path, family), dtype=dtype)
    assert_estimates(real, fake)
    assert fake.model_config["experts_implementation"] == real.model_config["experts_implementation"] == "grouped_mm"


def test_moe_simulated_fsdp2_rank_says_its_shards_are_padding(tmp_path):
    model = moe_config(tmp_path, "mixtral")
    (last,) = estimate(model, "adam", steps=1, seq_len=16, nproc=64, parallel="fsdp2", rank=63)
    (first,) = estimate(model, "adam", steps=1, seq_len=16, nproc=64, parallel="fsdp2", rank=0)
    assert last.status == first.status == "ok", (last.failure, first.failure)
    (note,) = [n for n in last.notes if n.startswith("fsdp2 pads")]
    assert "experts.gate_up_proj, 8 rows, 1 per rank" in note
    # 8 experts over 64 ranks: rank 63 holds no row of any parameter, only padding
    assert f"; {last.total('weights')} B of this rank's shards are padding" in note
    assert last.total("gradients") == last.total("weights") > 0
    assert "; 0 B of this rank's shards are padding" in next(n for n in first.notes if n.startswith("fsdp2 pads"))


class FailsInForward(torch.nn.Module):
    """A layer (one FSDP2 unit: it has parameters) that gives up after gathering them."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        x @ self.weight
        raise RuntimeError("no forward today")


def failing_model(options):
    return FailsInForward(), {"x": torch.randn(options.batch_size, 16)}


def test_a_rank_whose_forward_fails_under_simulated_fsdp2_is_a_row_saying_so():
    # FSDP2 leaves the gathered parameters in the model after a failed forward: its notes read them as shards
    (record,) = estimate(f"{__file__}:failing_model", "adam", steps=1, nproc=4, parallel="fsdp2", rank=1)
    assert record.status == "failed"
    assert record.failure == "failed in forward (step 1): RuntimeError: no forward today"


def test_any_crash_in_a_simulated_rank_is_its_failed_row(mlp_spec, monkeypatch):
    from memprof.measure import runner

    def attribute(*args, **kwargs):
        raise ValueError("the replay broke")

    monkeypatch.setattr(runner, "attribute", attribute)
    (record,) = estimate(mlp_spec, "adam", steps=1, nproc=4, parallel="fsdp2", rank=1)
    assert record.status == "failed" and record.failure == "failed: ValueError: the replay broke"
    assert record.settings.rank == 1 and record.notes[0].startswith("simulated rank 1 of 4")


# -- --amp ---------------------------------------------------------------------------------------------------
ROWS, WIDTH, HIDDEN = 256, 64, 256


def two_linears(options):
    """Linear, GELU, Linear, MSE: ops CPU and CUDA autocast treat alike (linear in bf16, mse_loss in fp32)."""
    model = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, WIDTH))
    return model, {"input": torch.randn(ROWS, WIDTH), "labels": torch.randn(ROWS, WIDTH)}


def with_layer_norm(options):
    """A LayerNorm between the linears: CUDA autocast runs it in fp32, CPU autocast in the input's bf16."""
    model = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, WIDTH))
    return model, {"input": torch.randn(ROWS, WIDTH), "labels": torch.randn(ROWS, WIDTH)}


def test_a_cuda_estimate_with_amp_saves_matmul_outputs_in_bf16():
    model = f"{__file__}:two_linears"
    (fp32,), (bf16,) = (estimate(model, "sgd", steps=1, amp=amp) for amp in (None, "bf16"))
    (cpu,) = measure(model, "sgd", device="cpu", steps=1, amp="bf16")
    assert bf16.settings.device == "cuda" and "cast as CUDA autocast casts" in bf16.environment["estimate"]
    # fp32: both linears' outputs (the GELU's input and the second linear's) in 4 bytes, the prediction for MSE
    assert fp32.total("activations") == (2 * ROWS * HIDDEN + ROWS * WIDTH) * 4
    # bf16: those two in 2 bytes, the bf16 copies of the input and of the second weight, the fp32 prediction
    assert bf16.total("activations") == (2 * ROWS * HIDDEN + ROWS * WIDTH + HIDDEN * WIDTH) * 2 + ROWS * WIDTH * 4
    assert bf16.total("activations") == cpu.total("activations")  # the op lists agree on these ops
    assert bf16.total("weights") == fp32.total("weights") and bf16.peaks.allocated < fp32.peaks.allocated


def test_a_cuda_estimate_runs_layer_norm_in_fp32_where_cpu_autocast_does_not():
    model = f"{__file__}:with_layer_norm"
    (cuda,) = estimate(model, "sgd", steps=1, amp="bf16")
    (cpu,) = measure(model, "sgd", device="cpu", steps=1, amp="bf16")
    # CUDA saves the norm's fp32 copy of its input (4 B) where CPU saves the bf16 input (2 B); the next
    # linear saves a bf16 copy of the norm's fp32 output where CPU saves the bf16 output itself
    assert cuda.total("activations") - cpu.total("activations") == ROWS * HIDDEN * 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_casts_as_cuda_lists_say(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = nn.Linear(8, 8)
    region = CudaAutocast(dtype)
    with FakeTensorMode(allow_non_fake_inputs=True), region:
        x = torch.randn(4, 8)
        y = layer(x)
        assert y.dtype == dtype  # lower_precision_fp
        assert nn.functional.layer_norm(y, (8,)).dtype == y.exp().dtype == torch.float32  # fp32 (CPU: dtype)
        assert y.softmax(-1).dtype == y.sum().dtype == torch.float32  # fp32_set_opt_dtype
        assert y.sum(dtype=torch.float64).dtype == torch.float64  # a dtype the call names is kept
        assert torch.norm(y).dtype == torch.float32 and torch.addcmul(y, y, x).dtype == torch.float32
        assert torch._addmm_activation(x[:, 0], x, x.T).dtype == torch.float32  # CPU-only lower_precision_fp: not cast
        assert region.cast(layer.weight, dtype) is region.cast(layer.weight, dtype)  # a weight is cast once
        with pytest.raises(RuntimeError, match="unsafe to autocast"):
            nn.functional.binary_cross_entropy(y.sigmoid(), torch.rand(4, 8))
    with torch.autocast("cpu", dtype=dtype):  # CPU autocast's own kernels are back
        assert nn.functional.layer_norm(torch.randn(4, 8).to(dtype), (8,)).dtype == dtype


def test_cuda_autocast_lists_are_the_ones_torch_registers_for_cuda():
    listed = {*LOWER_PRECISION, *FP32, *FP32_SET_OPT_DTYPE, *FP32_APPEND_DTYPE, *PROMOTE, *BANNED, *KEPT_AS_CPU}
    cuda_only = {"cudnn_convolution", "cudnn_convolution_transpose", "_cudnn_rnn"}  # never reached by CPU tensors
    registrations = torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCUDA")
    registered = {name.removeprefix("aten::") for name in registrations if name.startswith("aten::")}
    assert listed | cuda_only == registered


def test_amp_that_cannot_take_effect_is_a_usage_error(mlp_spec, monkeypatch):
    class Unsupported(torch.autocast):  # as torch.autocast does for a dtype the device cannot run
        def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
            warnings.warn(f"In {device_type.upper()} autocast, but the target dtype is not supported. "
                          "Disabling autocast.")
            super().__init__(device_type, dtype=dtype, enabled=False, cache_enabled=cache_enabled)

    monkeypatch.setattr(torch, "autocast", Unsupported)
    result = invoke("compare", "--model", mlp_spec, "--opt", "sgd", "--device", "cpu", "--steps", "1", "--amp", "fp16")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "error: --amp fp16 cannot take effect on cpu: In CPU autocast, but the target dtype is not supported. "
        "Disabling autocast. (try --amp bf16, or no --amp)"]
