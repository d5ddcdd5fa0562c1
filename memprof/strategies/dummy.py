"""A dummy strategy: DDP's behaviour under another name (checks that a strategy is its module and one table line)."""

from memprof.strategies.ddp import DDP


class Dummy(DDP):
    name = "dummy"
