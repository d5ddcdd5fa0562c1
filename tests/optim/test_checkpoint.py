"""Checkpoint and resume: every seed optimizer continues bit-identically from saved state dicts."""

from __future__ import annotations

import functools
import io

import pytest
import torch
from torch import nn
from training_for_tests import train

from memprof.optim import protocol
from memprof.optim.registry import build_optimizer, parse_spec

# Hyperparameters that reach every state path within six steps: AdaMeM refreshes its projector
# and Adapprox searches its rank (drawing random test matrices) after the resume too; with one
# power iteration, Adapprox's factors (and so the weights) depend on every draw.
SPECS = {
    "smmf": "smmf:weight_decay=0.01",
    "alada": "alada:weight_decay=0.01",
    "adamem": "adamem:rank=2:update_proj_gap=2",
    "adapprox": "adapprox:rank_interval=2:power_iters=1",
    "io_adam": "io_adam:weight_decay=0.01:buffer_size=2",
}
STEPS = 3  # before the checkpoint, and again after it


class Net(nn.Module):
    """Two linear layers (IO-Adam folds them) and a free 1-D gain (a dense/vector state path).
    fc1 is 16 x 12 so that Adapprox's sketches (k + 5 columns) are narrower than the matrix and
    its random draws matter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 5)
        self.gain = nn.Parameter(torch.ones(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))) * self.gain


def build(name: str, dtype: torch.dtype, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net().to(dtype)
    return model, build_optimizer(parse_spec(SPECS[name]), model)


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch per step index."""
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 12, generator=g).to(dtype), torch.randn(4, 5, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(SPECS))
def test_resume_from_saved_state_dicts_is_bit_identical(name: str, dtype: torch.dtype) -> None:
    batches = functools.partial(batch, dtype=dtype)
    reference, reference_opt = build(name, dtype, seed=0)
    train(reference, reference_opt, batches, range(2 * STEPS))

    model, optimizer = build(name, dtype, seed=0)
    train(model, optimizer, batches, range(STEPS))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    protocol.release(optimizer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)

    resumed, resumed_opt = build(name, dtype, seed=1)  # a different init: the load must overwrite it
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_opt, batches, range(STEPS, 2 * STEPS))
    for (param_name, expected), actual in zip(reference.named_parameters(), resumed.parameters()):
        assert torch.equal(actual, expected), param_name
    assert_same(resumed_opt.state_dict(), reference_opt.state_dict())


def assert_same(actual: object, expected: object, path: str = "state_dict") -> None:
    """Equal nested state: the same keys, and tensors of the same dtype and bits."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), path
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), path
    else:
        assert actual == expected, path
