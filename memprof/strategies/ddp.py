"""``DistributedDataParallel``: every rank holds everything; gradients are all-reduced in buckets."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ContextManager

from memprof.strategies.base import Distributed

if TYPE_CHECKING:
    import torch


class DDP(Distributed):
    """``DistributedDataParallel`` around the model as built; the registry's optimizer on every rank."""

    name = "ddp"

    def prepare(self, model: "torch.nn.Module") -> "torch.nn.Module":
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # A simulation skips the initial check and broadcast of the parameters: C++ code that reads
        # values, which fake tensors do not have (setup only: its buffers are freed before step 1).
        wrapped = DistributedDataParallel(model, device_ids=ids, init_sync=not self.simulated)
        if self.simulated:
            wrapped.register_comm_hook(None, _simulated_allreduce)
            wrapped.reducer = _SimulatedReducer(wrapped.reducer)
        self.model = wrapped
        return wrapped

    def micro_batch(self, last: bool) -> ContextManager:
        """``no_sync`` for every micro-batch but the last: gradients accumulate locally and are all-reduced once."""
        return contextlib.nullcontext() if last else self.model.no_sync()


def _simulated_allreduce(state, bucket):  # unannotated: DDP checks the annotations' objects, not strings
    """DDP's default comm hook (all-reduce the bucket in place, average), answering with the bucket as a
    real process group's future does: a fake process group's future holds None, which DDP rejects."""
    import torch
    import torch.distributed as dist

    buffer = bucket.buffer()
    dist.all_reduce(buffer)
    buffer.div_(dist.get_world_size())
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(buffer)
    return future


class _SimulatedReducer:
    """DDP's reducer without the rebuild of its buckets in step 2's forward: the rebuild broadcasts rank 0's
    bucket order in a tensor that C++ fills, which a fake tensor cannot hold. Rebuilt buckets hold the same
    gradients in another order (the same size caps), so the bytes are the same; the moment both sets are
    live during a real rebuild is not simulated."""

    def __init__(self, reducer) -> None:
        self._reducer = reducer

    def _rebuild_buckets(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self._reducer, name)
