"""The CUDA reduction kernel's global staging, as an estimate allocates it (memprof.measure.cuda_reductions).

The sizes are the H200 allocator histories' (reports/gpu/traces-h200, torch 2.11): each followed the op's
result and was freed right after."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memprof.gpus import GPUS
from memprof.measure.cuda_reductions import Launch, scratch

aten = torch.ops.aten
H200 = GPUS["h200"]


def _scratch(func, shape, *args, gpu=H200, dtype=torch.float32):
    source = torch.empty(shape, dtype=dtype, device="meta")  # shapes only: nothing allocated or summed
    return scratch(func, (source, *args), {}, func(source, *args), gpu)


@pytest.mark.parametrize("shape, dims, expected", [
    ((2048, 768), [0], Launch(12_582_912, 24)),  # RoBERTa/GPT-2 bias gradients of 768 columns (540 in roberta-io-adam)
    ((2048, 3072), [0], Launch(50_331_648, 96)),  # the MLP's 3,072 (108 in roberta-io-adam)
    ((2048, 2304), [0], Launch(37_748_736, 72)),  # GPT-2's fused q/k/v bias (36 in gpt2-adam)
    ((16, 128, 3072), [0, 1], Launch(50_331_648, 96)),  # the same rows before the view: dims coalesce
])
def test_bias_gradient_sums_stage_what_the_h200_histories_show(shape, dims, expected):
    assert _scratch(aten.sum.dim_IntList, shape, dims, True) == (0, [expected])


def test_adafactor_means_of_the_embedding_stage_as_on_the_h200():
    # t5-adafactor: update.mean(dim=-2) of the 32128 x 512 tied embedding, 3 steps; the FF's 2048 x 512 too.
    assert _scratch(aten.mean.dim, (32128, 512), [-2]) == (0, [Launch(131_596_288, 16)])
    assert _scratch(aten.mean.dim, (2048, 512), [-2]) == (0, [Launch(8_388_608, 16)])
    # update.mean(dim=-1) just before it made its 128,512-B result and nothing else: no global reduction.
    assert _scratch(aten.mean.dim, (32128, 512), [-1]) == (0, [])


def test_full_reductions_stage_a_few_bytes_per_cta():
    # t5-adafactor's 4-B results followed by 128 B (+ 4 B of semaphore) for 512 x 512 matrices, and by
    # 2,112 B where the CTAs per output reach the target grid: 132 SMs x 2,048 threads / 512 threads = 528.
    assert _scratch(aten.linalg_vector_norm.default, (512, 512)) == (0, [Launch(128, 4)])
    assert _scratch(aten.linalg_vector_norm.default, (32128, 512)) == (0, [Launch(2_112, 4)])
    fewer_sms = GPUS["a100-80gb"]  # 108 SMs: 432 CTAs
    assert _scratch(aten.linalg_vector_norm.default, (32128, 512), gpu=fewer_sms) == (0, [Launch(1_728, 4)])


def test_small_reductions_and_other_ops_stage_nothing():
    assert _scratch(aten.sum.dim_IntList, (64, 768), [0], True) == (0, [])
    assert _scratch(aten.amax.default, (2048, 768), [0]) == (0, [])


def test_a_reduction_beyond_32_bit_indexing_launches_per_part_with_an_accumulation_buffer():
    # 2^31 bf16 elements of 4 GiB: with_32bit_indexing halves the input until each part fits; a bf16 output
    # cannot accumulate, so an fp32 twin of it spans the launches.
    accumulation, launches = _scratch(aten.sum.dim_IntList, (2**20, 2048), [0], True, dtype=torch.bfloat16)
    assert accumulation == 2048 * 4 and len(launches) == 2
    assert _scratch(aten.sum.dim_IntList, (2**20, 2048), [0], True)[0] == 0  # fp32 accumulates in its output
    assert _scratch(aten.var.correction, (2**20, 2048), [0])[0] == 2048 * 16  # Welford's (mean, m2, n, nf)


def test_the_fake_tracker_allocates_the_staging_after_the_result_and_frees_it_at_once():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memprof.measure.trackers import FakeTracker

    tracker = FakeTracker(torch.device("cuda"), gpu=H200)
    with FakeTensorMode(), tracker:
        grad = torch.empty(2048, 768)
        bias_grad = grad.sum(0, keepdim=True)
    result, buffer, semaphores = tracker.allocations[1:]
    assert (result.nbytes, buffer.nbytes, semaphores.nbytes) == (3072, 12_582_912, 512)
    assert result.start < buffer.start < semaphores.start < semaphores.end < buffer.end and result.end is None
    del bias_grad


class WideLinear(nn.Module):
    """One 768 x 768 layer with a bias: its gradient is a sum of the batch's rows into 768 columns."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(768, 768)

    def forward(self, input, labels):
        return nn.functional.cross_entropy(self.layer(input), labels)


def wide_linear(options):
    x = torch.randn(options.batch_size, 768)
    return WideLinear(), {"input": x, "labels": torch.randint(0, 768, (options.batch_size,))}


def test_a_cuda_estimate_holds_the_bias_gradients_staging_in_backward(monkeypatch):
    from memprof.api import estimate
    from memprof.measure import trackers

    spec = f"{__file__}:wide_linear"
    (staged,) = estimate(spec, "sgd", batch_size=2048, steps=1, target_gpu="h200")
    monkeypatch.setattr(trackers, "REDUCTIONS", {})
    (plain,) = estimate(spec, "sgd", batch_size=2048, steps=1, target_gpu="h200")
    # The 12 MiB staging block needs a segment of its own (the caching allocator's large pool): reserved grows
    # by it; the allocated peak of backward (at the weight gradient's mm) grows by what was live beside it.
    assert staged.peaks.max_reserved - plain.peaks.max_reserved == 12_582_912
    assert staged.peaks.phase == plain.peaks.phase == "backward" and staged.peaks.allocated > plain.peaks.allocated
    assert "Reduce.cuh) for 132 SMs x 2048 threads: measured" in staged.environment["estimate"]
