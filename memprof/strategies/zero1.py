"""ZeRO-1 in torch: DDP for the gradients, ``torch.distributed.optim.ZeroRedundancyOptimizer`` for the state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from memprof.strategies.base import NotSupported, refuse_loop_taking
from memprof.strategies.ddp import DDP

if TYPE_CHECKING:
    import torch

    from memprof.optim.registry import OptimizerSpec


class Zero1(DDP):
    """DDP for the gradients, ``torch.distributed.optim.ZeroRedundancyOptimizer`` for the state: each rank
    steps the registry's optimizer on whole parameters assigned to it (greedily, by size) and
    broadcasts them."""

    name = "zero1"
    whole_model_rule = ("ZeroRedundancyOptimizer assigns whole parameters to ranks greedily by size, so which "
                        "blocks a rank holds state for changes with the depth")

    def make_optimizer(self, spec: "OptimizerSpec", model: "torch.nn.Module") -> "torch.optim.Optimizer":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        if spec.entry.params != "parameters":
            given = {"named_parameters": "named parameters", "model": "the model itself"}[spec.entry.params]
            raise NotSupported(f"zero1: {spec.name} is built from {given}; ZeroRedundancyOptimizer hands the "
                               "optimizer parameter groups only")
        optimizer = ZeroRedundancyOptimizer([p for p in model.parameters() if p.requires_grad],
                                            optimizer_class=spec.entry.load(), **{**spec.entry.defaults, **spec.kwargs})
        refuse_loop_taking(optimizer.optim, f"zero1: {spec.name}", "ZeroRedundancyOptimizer")
        return optimizer

    def local_optimizer(self, optimizer: "torch.optim.Optimizer") -> "torch.optim.Optimizer":
        return optimizer.optim
