"""Optimizer registry: names, how to build each optimizer, and the role of each state key.

A spec is ``NAME`` or ``NAME:key=value[:key=value…]``; ``--opt`` takes a comma-separated
list of specs (commas inside brackets belong to a value: ``adam:betas=(0.9,0.95)``). NAME is a
registry name or a dotted path to any ``torch.optim.Optimizer`` subclass (``torch.optim.RAdam``,
``mypkg.module.MyOpt``); unregistered classes get heuristic state roles, flagged as inferred.

Nothing here imports an optimizer's module until it is built or described, so listing names
stays cheap.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

from memprof.errors import UsageError, closest

if TYPE_CHECKING:
    import torch

Role = Literal["moment", "factor", "sign", "projection", "quant", "other"]
ROLES: tuple[str, ...] = ("moment", "factor", "sign", "projection", "quant", "other")
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


def _entries() -> dict[str, OptimizerEntry]:
    from memprof.optim.baselines import BASELINES
    from memprof.optim.seeds import SEEDS

    return {e.name: e for e in (*SEEDS, *BASELINES)}


def registry() -> dict[str, OptimizerEntry]:
    """All registered optimizers by name."""
    return _entries()


@dataclass(frozen=True)
class OptimizerSpec:
    """A parsed ``--opt`` item: the text as written, the entry, and its hyperparameters."""

    text: str
    entry: OptimizerEntry
    kwargs: Mapping[str, Any]
    inferred_roles: bool

    @property
    def name(self) -> str:
        return self.entry.name


def split_specs(text: str) -> list[str]:
    """Split a comma-separated list of specs, keeping commas inside brackets or quotes."""
    items, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    items.append("".join(current).strip())
    return [item for item in items if item]


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def _entry_for_dotted_path(path: str) -> OptimizerEntry:
    import torch

    module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise UsageError(
            f"unknown optimizer {path!r}: not a registry name and not importable; "
            f"registry names: {', '.join(sorted(registry()))}"
        ) from None
    if not (inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)):
        raise UsageError(f"{path!r} is not a torch.optim.Optimizer subclass")
    return OptimizerEntry(
        name=path,
        target=f"{module_name}:{attr}",
        summary=(inspect.getdoc(obj) or attr).splitlines()[0],
        source=module_name.split(".")[0],
    )


def parse_spec(text: str) -> OptimizerSpec:
    """Parse ``NAME[:key=value…]`` into a spec, validating the name and the keys."""
    name, *pairs = [part.strip() for part in text.split(":")]
    known = registry()
    if name in known:
        entry, inferred = known[name], False
    elif "." in name:
        entry = _entry_for_dotted_path(name)
        inferred = not entry.state_roles()
    else:
        raise UsageError(f"unknown optimizer {name!r}; closest: {closest(name, sorted(known))} (see `memprof optimizers`)")
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"optimizer {name}: expected key=value, got {pair!r}")
        kwargs[key.strip()] = _parse_value(value)
    _check_keys(entry, kwargs)
    return OptimizerSpec(text=text, entry=entry, kwargs=kwargs, inferred_roles=inferred)


def parse_specs(text: str) -> list[OptimizerSpec]:
    specs = [parse_spec(item) for item in split_specs(text)]
    if not specs:
        raise UsageError("no optimizer given; try --opt adam (see `memprof optimizers`)")
    return specs


def _check_keys(entry: OptimizerEntry, kwargs: Mapping[str, Any]) -> None:
    signature = inspect.signature(entry.load())
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return
    valid = sorted(entry.signature_defaults())
    for key in kwargs:
        if key not in valid:
            raise UsageError(f"optimizer {entry.name}: unknown hyperparameter {key!r}; valid: {', '.join(valid)}")


def build_optimizer(spec: OptimizerSpec, model: "torch.nn.Module") -> "torch.optim.Optimizer":
    """Attach the optimizer a spec names to ``model``. Bad values raise ``UsageError``."""
    factory = spec.entry.load()
    kwargs = {**spec.entry.defaults, **spec.kwargs}
    first: Any = {
        "parameters": lambda: [p for p in model.parameters() if p.requires_grad],
        "named_parameters": lambda: [(n, p) for n, p in model.named_parameters() if p.requires_grad],
        "model": lambda: model,
    }[spec.entry.params]()
    try:
        return factory(first, **kwargs)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"optimizer {spec.name}: {exc}") from None


def infer_role(state_tensor: "torch.Tensor", param: "torch.Tensor | None") -> Role:
    """Heuristic role for state of an optimizer that declares none (marked as inferred)."""
    import torch

    n = state_tensor.numel()
    if n <= 1:
        return "other"
    if param is not None:
        if state_tensor.dtype in (torch.bool, torch.uint8) and abs(n - (param.numel() + 7) // 8) <= state_tensor.shape[0]:
            return "sign"
        if state_tensor.dtype in (torch.uint8, torch.int8):
            return "quant"
        if n == param.numel():
            return "moment"
    return "factor"


def role_of(roles: Mapping[str, Role], key: str, state_tensor: "torch.Tensor", param: "torch.Tensor | None") -> tuple[Role, bool]:
    """The declared role of a state key, or an inferred one (second item True when inferred)."""
    if key in roles:
        return roles[key], False
    return infer_role(state_tensor, param), True
