"""One registered optimizer: how to build it and the role of each state key."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

from memprof.errors import UsageError
from memprof.taxonomy import Role

if TYPE_CHECKING:
    import torch

ParamsMode = Literal["parameters", "named_parameters", "model"]


@dataclass(frozen=True)
class OptimizerEntry:
    """One registered optimizer.

    ``target`` is ``"module:attribute"``: a ``torch.optim.Optimizer`` subclass or a factory
    with the same call shape. ``params`` says what it is called with: ``model.parameters()``,
    ``model.named_parameters()`` or the model itself. ``roles`` maps each state key (the key in
    ``optimizer.state[p]``, or the first attribute on a nested object) to its role; when left
    empty the class's own ``state_roles`` attribute is used. ``defaults`` are memprof's
    overrides of the class defaults (``sgd`` uses momentum 0.9).
    """

    name: str
    target: str
    summary: str
    source: str
    roles: Mapping[str, Role] = field(default_factory=dict)
    params: ParamsMode = "parameters"
    defaults: Mapping[str, Any] = field(default_factory=dict)
    requires: str | None = None  # "cuda" when the optimizer only runs on CUDA
    # State whose size depends on the data (Adapprox's adaptive rank): the hyperparameters that
    # reach its upper bound. An estimate then reports the range, both ends marked as such.
    upper_bound: Mapping[str, Any] = field(default_factory=dict)
    # For an optimizer that runs only in CUDA kernels: "module:function" building an
    # ``memprof.optim.analytic.AnalyticLayout`` with the library's documented state, for estimates.
    analytic: str | None = None

    def load(self) -> Callable[..., "torch.optim.Optimizer"]:
        module, _, attr = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            raise UsageError(
                f"optimizer {self.name!r} needs {exc.name or module}, which is not installed "
                f"(pip install {(exc.name or module).split('.')[0].replace('_', '-')})"
            ) from None

    def state_roles(self) -> Mapping[str, Role]:
        return self.roles or getattr(self.load(), "state_roles", {})

    def signature_defaults(self) -> dict[str, Any]:
        """Hyperparameters and their defaults as memprof builds the optimizer."""
        out: dict[str, Any] = {}
        for name, prm in inspect.signature(self.load()).parameters.items():
            if prm.kind in (prm.VAR_KEYWORD, prm.VAR_POSITIONAL) or name in ("params", "model", "named_parameters"):
                continue
            if prm.default is not inspect.Parameter.empty:
                out[name] = prm.default
        out.update(self.defaults)
        return out
