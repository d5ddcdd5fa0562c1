"""A model from the user's own file: ``path/to/file.py:function``.

The file is imported by path and ``function`` is called inside ``with torch.device(device)`` (with
``weights_on_meta``, a module's own code makes meta tensors: ``ModuleTensorsOnMeta``),
with the ``ModelOptions`` if it takes a positional parameter, else with no argument; a failure in
either (an exception, ``sys.exit``) is one usage-error line naming the file and the error. It returns:

* ``(module, batch, loss_fn)``: ``loss_fn(model, batch)`` gives the scalar training loss;
* ``(module, batch)``: the default loss below;
* ``module`` alone: only when its ``forward`` takes one required argument and its first layer (in
  registration order) is ``nn.Linear``, ``nn.Conv2d`` or ``nn.Embedding``; memprof then makes a
  random ``{"input": ...}`` batch of shape (batch_size, in_features), (batch_size, in_channels,
  image_size, image_size) or (batch_size, seq_len) token ids.

A batch is a dict of tensors, or one tensor (it becomes ``{"input": tensor}``). The model is moved
to the device and cast to ``options.dtype``; floating batch tensors likewise.

Default loss: if ``forward`` has a ``labels`` parameter (transformers style), ``model(**batch)``
and its ``loss``. Otherwise the batch without ``labels`` goes in (``{"input": x}`` positionally,
other keys by name), and the output (or its ``logits``, or its first element) is scored: cross-
entropy against integer ``labels``, mean squared error against floating ``labels``, and with no
labels the mean of its squares (a stand-in that gives every used weight a gradient).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from memprof.errors import UsageError, closest, user_code
from memprof.limits import shorten
from memprof.models.base import SEED, BuiltModel, ModelOptions, move_batch, outside_dispatch_modes, place

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def is_user_spec(name: str) -> bool:
    """Whether ``name`` reads as ``something.py:function``."""
    path, sep, function = name.rpartition(":")
    return bool(sep) and path.endswith(".py") and function.isidentifier()


def build(spec: str, options: ModelOptions, device: torch.device, weights_on_meta: bool = False) -> BuiltModel:
    """Import the file, call the function, and complete what it returned into a ``BuiltModel``;
    ``weights_on_meta`` as ``memprof.models.build_model``'s."""
    path_text, _, function_name = spec.rpartition(":")
    path = Path(path_text).expanduser()
    try:
        found = path.is_file()
    except OSError as exc:  # a name the file system cannot hold (too long)
        raise UsageError(f"model {shorten(spec)}: {exc.strerror}") from None
    if not found:
        raise UsageError(f"No such file: {path} (from model {spec!r})")
    with user_code(f"model file {path}"):
        module = _import_file(path)
        function = getattr(module, function_name, None)
    if not callable(function):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise UsageError(f"{path} has no function {function_name!r}; did you mean {closest(function_name, names)}?")
    on_meta = ModuleTensorsOnMeta() if weights_on_meta else contextlib.nullcontext()
    with user_code(f"model {spec}"), torch.device(device), on_meta:
        result = function(options) if _takes_positional(function) else function()
    model, batch, loss_fn = _unpack(result, spec)
    with outside_dispatch_modes(weights_on_meta):
        place(model, torch.device("meta") if weights_on_meta else device, options.torch_dtype).train()
    if batch is None:
        batch = {"input": _example_input(model, options, spec)}
    elif isinstance(batch, torch.Tensor):
        batch = {"input": batch}
    if not isinstance(batch, dict) or not all(isinstance(v, torch.Tensor) for v in batch.values()):
        raise UsageError(f"{spec} returned a batch of type {type(batch).__name__}; give a tensor or a dict of tensors")
    record = {"file": str(path.resolve()), "function": function_name,
              "loss": "user" if loss_fn is not None else "default"}
    return BuiltModel(name=spec, family="user", model=model, batch=move_batch(batch, device, options.torch_dtype),
                      loss=loss_fn or default_loss, config=record)


class ModuleTensorsOnMeta(TorchFunctionMode):
    """Torch calls made by a module's own code (its ``__init__``, ``reset_parameters``) make meta tensors
    (factories with no device named go to meta) and run outside the dispatch modes (``outside_dispatch_modes``);
    the rest of the user's function (the batch) is untouched. A module's code is a frame, between this
    mode's entry and the call, whose ``self`` is an ``nn.Module``."""

    FACTORIES = frozenset({torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.rand,
                           torch.randn, torch.randint, torch.randperm, torch.arange, torch.linspace, torch.eye,
                           torch.tensor, torch.as_tensor})

    def __enter__(self) -> "ModuleTensorsOnMeta":
        self._entered_from = sys._getframe(1)
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._in_module_code():
            return func(*args, **kwargs)
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        with outside_dispatch_modes():
            return func(*args, **kwargs)

    def _in_module_code(self) -> bool:
        frame = sys._getframe(2)
        while frame is not None and frame is not self._entered_from:
            if isinstance(frame.f_locals.get("self"), nn.Module):
                return True
            frame = frame.f_back
        return False


def default_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss used when the user's function gives none (rules in the module docstring)."""
    if "labels" in inspect.signature(model.forward).parameters:
        out = model(**batch)
        loss = getattr(out, "loss", out)
        return loss if isinstance(loss, torch.Tensor) else out[0]
    labels = batch.get("labels")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(inputs["input"]) if list(inputs) == ["input"] else model(**inputs)
    if not isinstance(out, torch.Tensor):
        out = out.logits if hasattr(out, "logits") else out[0]
    if labels is None:
        return out.float().square().mean()
    if labels.is_floating_point():
        return F.mse_loss(out.float(), labels.float())
    return F.cross_entropy(out.flatten(0, -2).float(), labels.flatten())


def _import_file(path: Path) -> Any:
    module_name = f"memprof_user_model_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"Cannot import {path} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up here
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _takes_positional(function: Callable[..., Any]) -> bool:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.VAR_POSITIONAL)
    return any(p.kind in kinds for p in inspect.signature(function).parameters.values())


def _unpack(result: Any, spec: str) -> tuple[nn.Module, Any, LossFn | None]:
    parts = result if isinstance(result, tuple) else (result,)
    if not 1 <= len(parts) <= 3 or not isinstance(parts[0], nn.Module):
        raise UsageError(f"{spec} must return an nn.Module, (module, batch) or (module, batch, loss_fn); "
                         f"got {type(result).__name__}")
    model, batch, loss_fn = (*parts, None, None)[:3]
    if loss_fn is not None and not callable(loss_fn):
        raise UsageError(f"{spec} returned a loss_fn that is not callable: {type(loss_fn).__name__}")
    return model, batch, loss_fn


def _example_input(model: nn.Module, options: ModelOptions, spec: str) -> torch.Tensor:
    required = [p for p in inspect.signature(model.forward).parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))), None)
    if len(required) != 1 or first is None:
        raise UsageError(f"{spec} returned only a module and memprof cannot make its input; "
                         "return (module, batch) or (module, batch, loss_fn)")
    gen = torch.Generator().manual_seed(SEED)
    if isinstance(first, nn.Linear):
        return torch.randn(options.batch_size, first.in_features, generator=gen)
    if isinstance(first, nn.Conv2d):
        return torch.randn(options.batch_size, first.in_channels, options.image_size, options.image_size,
                           generator=gen)
    return torch.randint(0, first.num_embeddings, (options.batch_size, options.seq_len), generator=gen)
