"""memprof estimate with mixed precision (``--amp``) and on mixture-of-experts models, against real CPU runs."""

from __future__ import annotations

import pytest
import torch

from memprof.api import estimate, measure
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
