"""A dummy strategy (DDP under another name), to check that adding one is its module and one table line."""

from memprof.strategies.ddp import DDP


class Dummy(DDP):
    name = "dummy"
