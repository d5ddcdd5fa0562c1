"""The run record of a tracked loop (``memprof.measure.tracked``): the runner's attribution and replay, with the
settings read from what the loop trained.

The rows are ``memprof.measure.attribution.attribute``'s. Two of them are counted while the window is open,
because the loop frees them before it closes: the inputs (the last step's model arguments) and the gradients
(each optimizer's, before its last update; ``zero_grad`` sets them to None before the next forward).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import torch

from memprof.measure import environment
from memprof.measure.attribution import attribute, weight_components
from memprof.measure.checkpointing import clean_names
from memprof.measure.state import StateTensor, walk_state
from memprof.record import Row, RunRecord
from memprof.settings import Settings

if TYPE_CHECKING:
    from memprof.measure.tracked import Window

DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
AMP = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def build(window: "Window", model: torch.nn.Module | None, optimizers: list[torch.optim.Optimizer],
          roles_of: Callable[[torch.optim.Optimizer], dict[str, str]], *, failure: str | None, skipped: int,
          steps: int) -> RunRecord:
    """Stop the window's capture and attribute what it saw."""
    from memprof.measure.runner import read_device_peaks
    from memprof.optim import protocol

    window.stop()
    capture, tracker = window.capture, window.tracker
    models = _outermost(window.models)
    names = _names(models)
    for optimizer in optimizers:  # parameters of no model called (trained by a function, not a module)
        for p in (p for group in optimizer.param_groups for p in group["params"]):
            names.setdefault(p, f"<unnamed {tuple(p.shape)}>")
    buffers = list({id(b): b for m in models for b in m.buffers()}.values())
    capture.weights({t: c for m in models for t, c in weight_components(m, names).items() if t in names})
    capture.buffers(buffers)
    labels = _labels(optimizers)
    per_optimizer = {o: _state(o, names, roles_of(o), labels) for o in optimizers}
    state = [item for items in per_optimizer.values() for item in items]
    if len(optimizers) > 1:  # each optimizer's state its own components, in the peak's composition too
        capture.tags = [dataclasses.replace(tag, component=f"{tag.component} ({labels[window.state_owner[i]]})")
                        if i in window.state_owner else tag for i, tag in enumerate(capture.tags)]
    cuda = window.device.type == "cuda"
    device_peaks = read_device_peaks(window.device, window.nvml_before) if cuda else None
    if device_peaks is not None:
        device_peaks.exact_blocks = tracker.exact_blocks
    record = RunRecord(settings=_settings(window, models, optimizers, labels, steps),
                       environment=environment.collect(window.device))
    record.gradient_component = protocol.gradient_component(optimizers[0]) if optimizers else "grad"
    attribute(record, capture, tracker.allocations, names, buffers, [], [], state, device_peaks)
    record.breakdown = _counted(record, sum(window.inputs.values()), sum(window.gradients.values()))
    if failure is not None:
        record.status, record.failure = "failed", failure
    elif getattr(tracker, "dropped", False):
        record.status = "failed"
        record.failure = f"allocator history overflowed ({tracker.max_entries} entries); measure fewer steps"
    _describe(record, window, models, optimizers, labels, skipped)
    inferred = [labels[o] for o, items in per_optimizer.items() if any(item.inferred for item in items)]
    record.inferred_roles = bool(inferred)
    if inferred:
        record.notes.append(f"state roles inferred for {', '.join(inferred)}: not a registered optimizer")
    return record


def _state(optimizer: torch.optim.Optimizer, names: dict[torch.Tensor, str], roles: dict[str, str],
           labels: dict[torch.optim.Optimizer, str]) -> list[StateTensor]:
    """The optimizer's state by role; with several optimizers each role says whose it is ("moment (adamw)")."""
    items = walk_state(optimizer, names, roles)
    if len(labels) == 1:
        return items
    return [dataclasses.replace(item, role=f"{item.role} ({labels[optimizer]})") for item in items]


def _counted(record: RunRecord, inputs: int, gradients: int) -> list[Row]:
    """The breakdown with the rows counted while the window was open."""
    counted = {("inputs", "batch"): inputs, ("gradients", record.gradient_component): gradients}
    return [dataclasses.replace(row, bytes=counted[(row.category, row.component)])
            if (row.category, row.component) in counted else row for row in record.breakdown]


def _outermost(models: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The models, without any that is a submodule of another (a LightningModule and the network it calls)."""
    return [m for m in models if not any(other is not m and any(m is sub for sub in other.modules())
                                         for other in models)]


def _names(models: list[torch.nn.Module]) -> dict[torch.Tensor, str]:
    """Each parameter's qualified name; with several models, prefixed by the model's class."""
    names: dict[torch.Tensor, str] = {}
    for model in models:
        prefix = f"{type(model).__name__}." if len(models) > 1 else ""
        for tensor, name in clean_names({p: n for n, p in model.named_parameters()}).items():
            names.setdefault(tensor, prefix + name)
    return names


def _labels(optimizers: list[torch.optim.Optimizer]) -> dict[torch.optim.Optimizer, str]:
    """Each optimizer's registry name (its class's dotted path where unregistered); a repeated one gets #2…"""
    from memprof.optim.registry import entry_of

    labels: dict[torch.optim.Optimizer, str] = {}
    for optimizer in optimizers:
        entry = entry_of(optimizer)
        kind = type(optimizer)
        name = entry.name if entry is not None else f"{kind.__module__}.{kind.__qualname__}"
        count = sum(1 for label in labels.values() if label.split("#")[0] == name)
        labels[optimizer] = f"{name}#{count + 1}" if count else name
    return labels


def _settings(window: "Window", models: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer],
              labels: dict[torch.optim.Optimizer, str], steps: int) -> Settings:
    """What was measured, read from the loop: its models, optimizers, device, dtype, autocast, the first input's
    shape (batch; the sequence length of token ids, the side of an image) and the micro-batches of its last step."""
    spec = "+".join(labels.values()) or "none"
    shape = window.input_shape
    sizes = {"batch_size": shape[0]} if shape and shape[0] > 0 else {}
    if len(shape) == 2 and shape[1] > 0 and window.input_is_tokens:
        sizes["seq_len"] = shape[1]
    if len(shape) == 4 and shape[2] >= 8:
        sizes["image_size"] = shape[2]
    param = next((p for m in models for p in m.parameters() if p.is_floating_point()), None)
    device = window.device
    return Settings(model="+".join(type(m).__name__ for m in models) or "unknown", optimizer=spec, spec=spec,
                    device=device.type if not device.index else f"cuda:{device.index}",
                    dtype=DTYPES.get(param.dtype, "float32") if param is not None else "float32",
                    amp=AMP.get(window.amp), steps=max(steps, 1), grad_accum=window.micro_batches, **sizes)


def _describe(record: RunRecord, window: "Window", models: list[torch.nn.Module],
              optimizers: list[torch.optim.Optimizer], labels: dict[torch.optim.Optimizer, str],
              skipped: int) -> None:
    """The record's remaining fields and the notes that say how a tracked run's figures were obtained."""
    from memprof.models import parameter_count

    record.n_params = sum(parameter_count(m) for m in models)
    record.model_config = {"tracked": [f"{type(m).__module__}.{type(m).__qualname__}" for m in models]}
    several = len(optimizers) > 1
    record.hyperparameters = {(f"{labels[o]}.{k}" if several else k): v for o in optimizers
                              for k, v in o.defaults.items() if isinstance(v, (int, float, str, bool, type(None)))}
    shape = list(window.input_shape)
    record.notes.append(f"tracked: the user's own loop, {record.settings.steps} step(s)"
                        f"{f' after {skipped} skipped' if skipped else ''}; batch sizes read from the first input's "
                        f"shape {shape}; seed and other settings are memprof's defaults, not the loop's")
    if window.device.type == "cpu":
        record.notes.append("tracked on CPU: of what was made before the window, the models' and optimizers' "
                            "tensors, the inputs and the tensors saved for backward count from its start; the rest "
                            "(a dataset held in memory) is not seen")
