"""Optimizer registry: every registered name, parsing ``--opt`` specs, building an optimizer.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from memprof.errors import UsageError, closest, user_code
from memprof.limits import check_value
from memprof.optim.entry import OptimizerEntry
from memprof.optim.library import LIBRARY
from memprof.optim.papers import PAPERS

if TYPE_CHECKING:
    import torch


def registry() -> dict[str, OptimizerEntry]:
    """All registered optimizers by name: the paper implementations first, then the library ones."""
    return {e.name: e for e in (*PAPERS, *LIBRARY)}


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


def spec_name(text: str) -> str:
    """The optimizer one spec names, as ``parse_spec`` reads it: a registry name or a dotted path."""
    return text.split(":")[0].strip()


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
    unknown = UsageError(f"unknown optimizer {path!r}: not a registry name and not importable; "
                         f"registry names: {', '.join(sorted(registry()))}")
    if not all(part.isidentifier() for part in path.split(".")):
        raise unknown
    # The module is the user's code: a failure while importing it is one line naming it.
    with user_code(f"optimizer {path} (importing {module_name})"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not f"{module_name}.".startswith(f"{exc.name}."):
                raise  # the module exists; something it imports does not
            raise unknown from None
        obj = getattr(module, attr, None)
    if obj is None:
        raise unknown
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
    name, pairs = spec_name(text), [part.strip() for part in text.split(":")[1:]]
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
        if key.strip() in kwargs:
            raise UsageError(f"optimizer {name}: {key.strip()} is given twice in {text!r}; give each key once")
        check_value(value.strip(), f"optimizer {name}: {key.strip()}")
        kwargs[key.strip()] = _parse_value(value)
    _check_keys(entry, kwargs)
    return OptimizerSpec(text=text, entry=entry, kwargs=kwargs, inferred_roles=inferred)


def parse_specs(text: str) -> list[OptimizerSpec]:
    """Every spec of a comma-separated list, parsed; the same optimizer twice is a usage error."""
    specs = [parse_spec(item) for item in split_specs(text)]
    if not specs:
        raise UsageError("no optimizer given; try --opt adam (see `memprof optimizers`)")
    seen: dict[tuple[str, str], str] = {}
    for spec in specs:
        key = (spec.name, repr(sorted(spec.kwargs.items())))
        if key in seen:
            same = "twice" if seen[key] == spec.text else f"twice ({seen[key]!r} and {spec.text!r})"
            raise UsageError(f"--opt names {spec.text!r} {same}; give each optimizer once")
        seen[key] = spec.text
    return specs


def _check_keys(entry: OptimizerEntry, kwargs: Mapping[str, Any]) -> None:
    try:
        signature = inspect.signature(entry.load())
    except UsageError:
        if entry.analytic is None:
            raise
        return  # the library is missing: only an estimate's analytic layout can run, and it takes any key
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return
    valid = sorted(entry.signature_defaults())
    for key in kwargs:
        if key not in valid:
            raise UsageError(f"optimizer {entry.name}: unknown hyperparameter {key!r}; valid: {', '.join(valid)}")


def entry_of(optimizer: "torch.optim.Optimizer") -> OptimizerEntry | None:
    """The entry that builds ``optimizer``'s class, or its nearest registered base class; None for any other
    class (its state roles are then inferred). Imports no library: an entry whose library is not imported
    cannot have built this instance."""
    import sys

    classes: dict[type, OptimizerEntry] = {}
    for entry in registry().values():
        module = entry.target.partition(":")[0]
        if module not in sys.modules and not module.startswith("memprof."):
            continue
        try:
            loaded = entry.load()
        except UsageError:
            continue
        built = loaded if inspect.isclass(loaded) else getattr(loaded, "builds", None)
        if built is not None:
            classes.setdefault(built, entry)
    return next((classes[cls] for cls in type(optimizer).__mro__ if cls in classes), None)


def build_optimizer(spec: OptimizerSpec, model: "torch.nn.Module", *, analytic: bool = False) -> "torch.optim.Optimizer":
    """Attach the optimizer a spec names to ``model``. Bad values, and any failure of the class
    (an exception, ``sys.exit``), raise ``UsageError``.

    ``analytic``: build the entry's analytic layout instead (an estimate of a CUDA-only optimizer).
    """
    if analytic:
        module, _, attr = spec.entry.analytic.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        return factory([p for p in model.parameters() if p.requires_grad], **spec.kwargs)
    factory = spec.entry.load()
    kwargs = {**spec.entry.defaults, **spec.kwargs}
    first: Any = {
        "parameters": lambda: [p for p in model.parameters() if p.requires_grad],
        "named_parameters": lambda: [(n, p) for n, p in model.named_parameters() if p.requires_grad],
        "model": lambda: model,
    }[spec.entry.params]()
    with user_code(f"optimizer {spec.name}"):  # a dotted path's class is the user's code
        try:
            return factory(first, **kwargs)
        except (ValueError, TypeError) as exc:  # a hyperparameter the class refuses
            raise UsageError(f"optimizer {spec.name}: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from exc
