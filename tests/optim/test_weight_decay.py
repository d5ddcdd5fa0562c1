"""Decoupled weight decay on bf16 parameters: W <- W (1 - lr wd), rounded to bf16 once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memprof.optim import protocol
from memprof.optim.registry import build_optimizer, parse_spec

LR, WD = 0.01, 0.3  # lr * wd = 3e-3: 1 - 3e-3 rounded to bf16 is 0.99609375, a 0.39 % shrink

# Every decoupled-decay path. Alada is left out: a zero gradient is a zero momentum, which defers
# its first step (test_alada checks its decay where the momentum is zero).
SPECS = {
    "adamem_projected": "adamem:rank=2",  # the two matrices are projected, the biases are vectors
    "adamem_full_rank": "adamem:rank=None",  # factored Adafactor matrices
    "adapprox": "adapprox",
    "io_adam": "io_adam",  # folded linear weights, AdamW biases
    "smmf": "smmf",  # weight_decay_mode="adamw" (the default)
}


@pytest.mark.parametrize("name", list(SPECS))
def test_bf16_decay_is_rounded_once_from_the_exact_factor(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).to(torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(parse_spec(f"{SPECS[name]}:lr={LR}:weight_decay={WD}"), model)
    optimizer.zero_grad()
    # A zero loss: every update is 0 / (sqrt(0) + eps) = 0, so only the decay moves the weights.
    loss = protocol.scale_loss(optimizer, 0.0 * model(torch.randn(4, 12, dtype=torch.bfloat16)).float().sum())
    loss.backward()
    optimizer.step()
    for (param_name, param), old in zip(model.named_parameters(), before):
        expected = (old.float() * (1.0 - LR * WD)).to(torch.bfloat16)
        assert torch.equal(param.detach(), expected), param_name
