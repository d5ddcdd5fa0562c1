"""Optimizers that misbehave on purpose, loaded by dotted path (``optim_for_tests.SleepySGD``)."""

import os
import time
from pathlib import Path

import torch


class SleepySGD(torch.optim.SGD):
    """Writes its process id to $MEMPROF_TEST_PIDFILE in step(), then sleeps: a child to kill the parent of."""

    def step(self, closure=None):
        Path(os.environ["MEMPROF_TEST_PIDFILE"]).write_text(str(os.getpid()))
        time.sleep(120)


class ExitingSGD(torch.optim.SGD):
    """Calls sys.exit in step(), as user code may."""

    def step(self, closure=None):
        raise SystemExit(4)


class NappingSGD(torch.optim.SGD):
    """SGD that, in step(), leaves a file named ``<pid>-<nap>`` in $MEMPROF_TEST_PIDDIR and sleeps ``nap`` seconds."""

    def __init__(self, params, lr=0.01, nap=0.0):
        super().__init__(params, lr=lr)
        self.nap = nap

    def step(self, closure=None):
        Path(os.environ["MEMPROF_TEST_PIDDIR"], f"{os.getpid()}-{self.nap:g}").touch()
        time.sleep(self.nap)
        return super().step(closure)
