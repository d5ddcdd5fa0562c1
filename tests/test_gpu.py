"""GPU checks (run on the GPU machine: `pytest -m gpu tests/test_gpu.py`)."""

import pytest
import torch

from memprof.api import measure

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PERSISTENT = ("weights", "gradients", "optimizer_state")


RECIPES = [
    ("gpt2", {"batch_size": 4, "seq_len": 512}),
    ("resnet50", {"batch_size": 32}),
    ("gpt2", {"batch_size": 4, "seq_len": 512, "checkpointing": "full"}),
    ("gpt2", {"batch_size": 4, "seq_len": 512, "checkpointing": "selective", "amp": "bf16"}),
    ("gpt2", {"batch_size": 4, "seq_len": 512, "lora": "r=8"}),
    ("gpt2", {"batch_size": 4, "seq_len": 512, "lora": "r=8,quant=nf4", "checkpointing": "every:2"}),
    ("gpt2", {"batch_size": 2, "seq_len": 512, "grad_accum": 2}),
    ("resnet50", {"batch_size": 32, "checkpointing": "full"}),
]


@pytest.mark.parametrize("model, kwargs", RECIPES)
def test_peak_composition_adds_up_to_max_memory_allocated(model, kwargs):
    for record in measure(model, "adam,smmf", device="cuda", steps=3, **kwargs):
        assert record.status == "ok", record.failure
        total = sum(r.bytes for r in record.peak)
        assert total == record.peaks.allocated == record.peaks.max_allocated
        unattributed = record.total("unattributed", at_peak=True)
        assert unattributed < 0.01 * total, (unattributed, total)
        # the replayed stream equals the allocator's own counter at every phase mark
        for phase in record.phase_peaks:
            assert phase.start == phase.allocator_at_start, phase


def test_tensor_bytes_match_allocator_blocks_up_to_rounding():
    (record,) = measure("gpt2", "adam", device="cuda", steps=2, batch_size=2, seq_len=128)
    for category in PERSISTENT:
        tensor = record.total(category)
        blocks = record.total(category, at_peak=True)
        # Blocks are 512-byte multiples, and the allocator hands out a whole free block rather than
        # split off a remainder of 1 MiB or less in its large pool: at most that much more per tensor
        # (the H200 run of 2026-12-04 gave gradients 4.8 MiB over on 148 tensors, 1.0 %).
        bound = len(record.parameters) * ((1 << 20) + 512)
        assert 0 <= blocks - tensor <= bound, (category, tensor, blocks)


def test_state_bytes_identical_on_cpu_and_cuda():
    spec = "adam,sgd,adafactor,smmf,adamem,alada"
    kwargs = dict(steps=1, batch_size=1, seq_len=32)
    cpu = measure("gpt2", spec, device="cpu", **kwargs)
    cuda = measure("gpt2", spec, device="cuda", **kwargs)
    for a, b in zip(cpu, cuda):
        for category in PERSISTENT:
            assert a.components(category) == b.components(category), (a.settings.spec, category)


def test_each_optimizer_runs_in_its_own_process():
    first, second = measure("gpt2", "adam,adam:lr=0.001", device="cuda", steps=2, batch_size=2, seq_len=128)
    assert first.peaks.max_allocated == second.peaks.max_allocated
    assert first.peaks.reserved_end == second.peaks.reserved_end
