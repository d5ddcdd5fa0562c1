"""How an optimizer takes part in the training loop, without special cases in the runner.

Most optimizers only need ``zero_grad()`` and ``step()``. A few need more, and say so through
this small protocol; memprof's runner and a plain training loop use it the same way::

    optimizer.zero_grad()                 # Alada overrides it: grad *= beta1 instead of None
    loss = scale_loss(optimizer, loss_fn(model(batch)))
    loss.backward()
    optimizer.step()

* ``scale_loss(loss) -> Tensor`` (optional method): the loss to back-propagate. Alada returns
  ``(1 - beta1) * loss`` so that backward accumulates its first moment in the gradient buffer.
* ``gradient_component: str`` (optional attribute): what ``p.grad`` holds, as shown in the
  gradients row (default ``"grad"``; Alada says ``"grad+first_moment"``).
* Construction with the model: a registry entry with ``params="model"`` receives the
  ``nn.Module`` itself (IO-Adam registers forward/backward hooks on its linear layers).
  Such optimizers release their hooks in ``remove_hooks()``, which the runner calls when done.
* ``telemetry(names) -> dict[str, float]`` (optional method): numbers worth recording after
  each step, keyed by a readable label; ``names`` maps each parameter to its qualified name.
  Adapprox reports each parameter's current rank (``"rank/<param name>"``).
"""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import torch


@runtime_checkable
class ScalesLoss(Protocol):
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class HoldsHooks(Protocol):
    def remove_hooks(self) -> None: ...


@runtime_checkable
class ReportsTelemetry(Protocol):
    def telemetry(self, names: Mapping[torch.Tensor, str]) -> dict[str, float]: ...


def scale_loss(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> torch.Tensor:
    """The loss the optimizer wants back-propagated (the loss itself unless it says otherwise)."""
    return optimizer.scale_loss(loss) if isinstance(optimizer, ScalesLoss) else loss


def gradient_component(optimizer: torch.optim.Optimizer) -> str:
    """What the optimizer keeps in ``p.grad``: ``"grad"`` unless it declares more."""
    return getattr(optimizer, "gradient_component", "grad")


def release(optimizer: torch.optim.Optimizer) -> None:
    """Remove the hooks an optimizer put on the model, if it put any."""
    if isinstance(optimizer, HoldsHooks):
        optimizer.remove_hooks()


def telemetry(optimizer: torch.optim.Optimizer, names: Mapping[torch.Tensor, str]) -> dict[str, float]:
    """Per-step numbers the optimizer reports (empty unless it implements ``telemetry``)."""
    return optimizer.telemetry(names) if isinstance(optimizer, ReportsTelemetry) else {}
