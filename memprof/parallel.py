"""The parallel strategies memprof knows (``--parallel``): each name, the class that implements it and
how ``--parallel``'s help names it.

Plain data at the bottom of the layers: ``memprof.settings`` takes the choices and the help from it,
``memprof.strategies`` imports the class a run asks for. Adding a strategy is its module under
``memprof/strategies/`` and one line in ``STRATEGIES``.
"""

from __future__ import annotations

from typing import NamedTuple


class Choice(NamedTuple):
    """One ``--parallel`` choice."""

    path: str
    """``module:Class`` of the strategy."""
    help: str
    """How ``--parallel``'s help names it; empty where an earlier choice's words cover it (or for none)."""


STRATEGIES: dict[str, Choice] = {
    "none": Choice("memprof.strategies.base:Strategy", ""),
    "ddp": Choice("memprof.strategies.ddp:DDP", "ddp"),
    "fsdp2": Choice("memprof.strategies.fsdp2:FSDP2", "fsdp2 (fully_shard)"),
    "zero1": Choice("memprof.strategies.zero1:Zero1", "zero1 (DDP + ZeroRedundancyOptimizer)"),
    "deepspeed-zero1": Choice("memprof.strategies.deepspeed:DeepSpeedZero1", "deepspeed-zero1/2/3 (needs deepspeed)"),
    "deepspeed-zero2": Choice("memprof.strategies.deepspeed:DeepSpeedZero2", ""),
    "deepspeed-zero3": Choice("memprof.strategies.deepspeed:DeepSpeedZero3", ""),
}

HELP = "How the ranks share the model: " + ", ".join(c.help for c in STRATEGIES.values() if c.help) + "."
"""``--parallel``'s help."""
