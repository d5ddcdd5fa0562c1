"""The hooks every strategy answers, the single process that answers them plainly, and what the
distributed strategies share.

The runner (``memprof.measure.runner.measure``) calls, in order: ``watch(capture)`` around the whole
capture, ``prepare(model)`` after the model is built (on the meta device where ``builds_on_meta`` says
so: ``prepare`` then materialises this rank's share), ``make_optimizer(spec, model)`` after that,
``held_parameters(model)`` for the tensors that are this rank's weights, ``local_optimizer(optimizer)``
for the optimizer whose state this rank holds; in each step ``optimizer.zero_grad()``, the forward,
``backward(loss)`` (``loss.backward()`` unless the strategy's engine runs it) and ``optimizer.step()``,
each micro-batch's forward and backward inside
``micro_batch(last)`` (``--grad-accum``), with ``gradients(params)`` after the backward and at the end; ``notes`` last. A strategy whose engine
owns the loop (DeepSpeed: ``engine.backward``, ``engine.step``) answers ``make_optimizer`` with an
object whose ``zero_grad``/``step`` drive the engine, so the runner has no branch for it.
Kept free of torch.distributed imports until a distributed strategy is built.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ContextManager, Protocol

if TYPE_CHECKING:
    import torch

    from memprof.optim.registry import OptimizerSpec
    from memprof.settings import Settings


class Capture(Protocol):
    """What a strategy asks of the runner's capture (``memprof.measure.attribution.Capture``)."""

    def collectives(self) -> ContextManager:
        """A context that tags the buffers of torch.distributed's collectives."""

    def collective_buffer(self, tensors: list["torch.Tensor"], category: str, component: str) -> None:
        """Tag buffers a strategy's engine made for its collectives."""


class NotSupported(Exception):
    """This optimizer cannot run under this strategy; the message says why (the row's failure)."""


class Strategy:
    """A single process: the model as built, the registry's optimizer, no collectives."""

    name = "none"
    builds_on_meta = False
    """Whether the runner builds the model's parameters and buffers on the meta device (no memory) and
    ``prepare`` materialises what this rank holds; else the model is built whole on the device."""
    whole_model_rule: str | None = None
    """What a rule over all the parameters decides of this rank's share, where one does: its figures then change
    with the depth other than block by block, and a deep model's estimate is made op by op, not extrapolated
    from shallow probes (``memprof.measure.depth``)."""
    communicators = 0
    """NCCL communicators each rank holds on CUDA (``memprof.nccl`` sizes each): none in a single process."""

    @classmethod
    def problem(cls, settings: "Settings") -> str | None:
        """Why this strategy cannot run with these settings (None when it can); checked once per request."""
        return None

    def watch(self, capture: Capture) -> ContextManager:
        """Entered around the capture (the model is built inside it)."""
        return contextlib.nullcontext()

    def prepare(self, model: "torch.nn.Module") -> "torch.nn.Module":
        """The model this rank trains (wrapped or sharded), built before the optimizer."""
        return model

    def make_optimizer(self, spec: "OptimizerSpec", model: "torch.nn.Module") -> "torch.optim.Optimizer":
        from memprof.optim.registry import build_optimizer

        return build_optimizer(spec, model)

    def held_parameters(self, model: "torch.nn.Module") -> dict["torch.Tensor", str]:
        """This rank's weights, by parameter name: the parameters themselves (DeepSpeed ZeRO-3: its partitions)."""
        return {p: n for n, p in model.named_parameters()}

    def local_optimizer(self, optimizer: "torch.optim.Optimizer") -> "torch.optim.Optimizer":
        """The optimizer whose ``state`` this rank holds (ZeRO wraps one)."""
        return optimizer

    def micro_batch(self, last: bool) -> ContextManager:
        """Entered around each micro-batch's forward and backward (``--grad-accum``); ``last``: the one whose
        backward ends the optimizer step. A single process, and FSDP2 as torchtitan runs it, reduce every
        micro-batch's gradients alike."""
        return contextlib.nullcontext()

    def backward(self, loss: "torch.Tensor") -> None:
        """Back-propagate one micro-batch's loss."""
        loss.backward()

    def gradients(self, params: list["torch.Tensor"]) -> list["torch.Tensor"]:
        """The gradient tensors this rank holds now: each parameter's ``grad`` (DeepSpeed: its flat buffers)."""
        return [p.grad for p in params if p.grad is not None]

    def notes(self, model: "torch.nn.Module", optimizer: "torch.optim.Optimizer") -> list[str]:
        """What the record should say about how the optimizer saw the parameters."""
        return []


class Distributed(Strategy):
    """A rank of an initialised default process group; collectives' buffers are tagged. Built by
    ``memprof.strategies.for_settings`` with the device the model lives on and the run's settings."""

    communicators = 1
    """The default process group's: DDP and ZeroRedundancyOptimizer use it, and FSDP2's 1-D device mesh over
    every rank reuses it (torch.distributed.device_mesh: a mesh dimension spanning the world takes the default
    group)."""

    def __init__(self, device: "torch.device", settings: "Settings") -> None:
        import torch.distributed as dist

        self.device = device
        self.settings = settings
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.simulated = dist.get_backend() == "fake"  # memprof.distributed.simulate: one rank, no peers

    def watch(self, capture: Capture) -> ContextManager:
        return capture.collectives()

    def notes(self, model: "torch.nn.Module", optimizer: "torch.optim.Optimizer") -> list[str]:
        return [structure(model, optimizer)]


def refuse_loop_taking(optimizer: "torch.optim.Optimizer", who: str, engine: str) -> None:
    """``NotSupported`` for an optimizer that takes part in the training loop, which ``engine`` never calls."""
    import torch

    from memprof.optim import protocol

    if (isinstance(optimizer, protocol.ScalesLoss) or protocol.gradient_component(optimizer) != "grad"
            or type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad):
        raise NotSupported(f"{who} takes part in the training loop (its own zero_grad/scale_loss, "
                           f"memprof/optim/protocol.py); {engine} calls neither")


def structure(model: "torch.nn.Module", optimizer: "torch.optim.Optimizer") -> str:
    """Whether the optimizer sees the parameters' shapes or flat partitions (ZeRO's 1-D buffers), which
    a factored or matrix optimizer needs."""
    seen = [p for group in optimizer.param_groups for p in group["params"]]
    matrices = sum(1 for p in model.parameters() if p.ndim >= 2)
    if not seen:
        return "this rank steps no parameter"
    if matrices and not any(p.ndim >= 2 for p in seen):
        return "structure lost: flat partition (the optimizer sees 1-D partitions, not the parameters' matrices)"
    return f"structure kept: the optimizer sees whole parameters ({len(seen)} of {sum(1 for _ in model.parameters())} on this rank)"
