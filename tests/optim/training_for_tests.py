"""The small training loop of the optimizer tests: ``train(model, optimizer, (x, y), steps=100)``."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from memprof.optim import protocol

Batch = tuple[torch.Tensor, torch.Tensor]


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Batch | Callable[[int], Batch],
          steps: int | Iterable[int], *, closure: bool = False) -> list[float]:
    """The runner's loop (``memprof.optim.protocol``) on the mean squared error of ``model(x)`` against ``y``, in
    fp32: zero the gradients, back-propagate the loss the optimizer wants, step (given a closure that does the
    first two where ``closure``). ``batches`` is one ``(x, y)`` for every step or a function of the step index;
    ``steps`` a count or the step indices. Returns each step's loss (with a closure, what ``step`` returned)."""

    def loss_of(step: int) -> torch.Tensor:
        x, y = batches(step) if callable(batches) else batches
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        protocol.scale_loss(optimizer, loss).backward()
        return loss

    losses = []
    for step in range(steps) if isinstance(steps, int) else steps:
        if closure:
            losses.append(optimizer.step(lambda: loss_of(step)).item())
        else:
            losses.append(loss_of(step).item())
            optimizer.step()
    return losses
