"""How one rank shares the model with the others (``--parallel``): the runner's only hook for
distributed training.

``memprof.parallel.STRATEGIES`` is the one list of them (each name, the class that implements it, one
module per backend behind the hooks of ``memprof.strategies.base.Strategy``); adding a strategy is its
module and one line there. This module imports neither torch nor a backend: ``for_settings`` imports
the one a run asks for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from memprof.parallel import STRATEGIES
from memprof.strategies.base import NotSupported, Strategy

if TYPE_CHECKING:
    import torch

    from memprof.settings import Settings

__all__ = ["NotSupported", "Strategy", "for_settings", "problem", "strategy_class"]




def strategy_class(name: str) -> "type[Strategy]":
    """The class of the strategy ``name`` (a key of ``STRATEGIES``), its module imported."""
    module, _, cls = STRATEGIES[name].path.partition(":")
    return getattr(importlib.import_module(module), cls)


def problem(settings: "Settings") -> str | None:
    """Why the strategy ``settings.parallel`` names cannot run with these settings (None when it can).
    Checked once per request, before any rank starts (``memprof.distributed.launch.check``)."""
    return strategy_class(settings.parallel).problem(settings)


def for_settings(settings: "Settings", device: "torch.device | None" = None) -> "Strategy":
    """The strategy ``settings.parallel`` names, for this rank (the default process group is initialised);
    ``device``: where the model lives, when not ``settings.device`` (a simulation's fake CPU tensors)."""
    import torch

    strategy = strategy_class(settings.parallel)
    if settings.parallel == "none":
        return strategy()
    device = device or torch.device(settings.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return strategy(device, settings)
