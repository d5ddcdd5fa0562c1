"""An optimizer that kills its own process on rank 1 of a distributed run (``--opt crash_for_tests.KilledOnRank1``)."""

import os
import signal

import torch
import torch.distributed as dist


class KilledOnRank1(torch.optim.Adam):
    """Adam, except that rank 1 dies of SIGKILL in its first step (no Python cleanup, no record)."""

    def step(self, closure=None):
        if dist.is_initialized() and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().step(closure)


class RaisesOnRank1(torch.optim.Adam):
    """Adam, except that rank 1 raises in its first step (the runner catches it: a failed record)."""

    def step(self, closure=None):
        if dist.is_initialized() and dist.get_rank() == 1:
            raise RuntimeError("rank 1 gave up")
        return super().step(closure)
