"""Measure the user's own training loop (``memprof.track``, ``memprof run``): the runner's capture, driven by hooks.

Phases come from hooks, not from a loop memprof writes: torch's global module forward hooks (the outermost
module called is a model; its arguments are the step's inputs), ``torch.autograd.backward`` (wrapped while
tracking: a backward pass begins) and torch's global optimizer step hooks (an optimizer's update, and which
optimizer it is). A training step is the forward and backward passes up to the optimizer steps after them; it
ends where the next forward (or backward) begins, so two optimizers stepped one after the other (Muon for the
matrices, AdamW for the rest) are one step, and a GAN's discriminator and generator updates are a step each.
Between an optimizer step and the next forward (data loading, logging, the scheduler) is a phase of its own
(``memprof.taxonomy.BETWEEN_STEPS``).

The first ``skip`` steps are not measured; the window of ``steps`` steps opens where step ``skip + 1`` begins
and closes where the step after its last begins (or when the block ends). Inside it, the capture is the
runner's (``memprof.measure.runner``): the CPU dispatch-mode tracker or the CUDA allocator history, identities
told to a ``Capture`` (inputs after each outermost forward, gradients before each optimizer step, optimizer
state by role after it, tensors saved for backward, weights and buffers at the end) and one replay
(``memprof.measure.tracked_record``). What existed before the window (the model, the batch, state of skipped
steps) is live from its start: on CUDA every block the allocator held then; on CPU the storages of the
models and optimizers, the models' inputs and the tensors saved for backward (nothing else can see them).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten

from memprof.errors import UsageError, describe
from memprof.measure.attribution import Capture
from memprof.measure.state import storage_key, storage_tensors, walk_state
from memprof.measure.trackers import CpuTracker, CudaTracker, replaced
from memprof.record import RunRecord
from memprof.taxonomy import BETWEEN_STEPS, PHASES

NEW_STEP = ("step", BETWEEN_STEPS)
"""Phases after which a forward or backward begins the next training step."""


class Track:
    """``with memprof.track(model, optimizer, steps=3, skip=1) as run: …``; ``run.record`` afterwards.

    ``model``/``optimizer``: what the loop trains; either may be left out (the outermost modules called and
    the optimizers that step are found by the hooks). ``steps``: how many training steps to measure (None:
    every step in the block); ``skip``: warm-up steps left out before them. ``on_close(record)`` is called
    where the window closes (``memprof run`` stops the script there)."""

    active: "Track | None" = None

    def __init__(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None, *,
                 steps: int | None = None, skip: int = 0, on_close: Callable[[RunRecord], None] | None = None) -> None:
        _check(model, optimizer, steps, skip)
        self.model, self.steps, self.skip, self.on_close = model, steps, skip, on_close
        self.optimizers: list[torch.optim.Optimizer] = [optimizer] if optimizer is not None else []
        self.record: RunRecord | None = None
        self.completed = 0  # training steps completed since the block began, skipped ones included
        self.optimizer_steps = 0
        self.forwards = 0
        self._phase: str | None = None  # the current step's phase (None: no step begun)
        self._depth = 0  # module calls in progress
        self._busy = 0  # inside autograd.backward or an optimizer step: module calls there are no forward
        self._stepping = 0  # optimizer steps in progress (one optimizer may step others)
        self._updating = False  # the outermost optimizer step's update has begun
        self._window: Window | None = None
        self._closed = False
        self._undo: list[Callable[[], None]] = []
        self._role_cache: dict[type, dict[str, str]] = {}

    # -- the block ---------------------------------------------------------------------------------------
    def __enter__(self) -> "Track":
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        if Track.active is not None:
            raise UsageError("memprof.track is already tracking a loop in this process; track one at a time")
        Track.active = self
        handles = [register_module_forward_pre_hook(self._module_pre),
                   register_module_forward_hook(self._module_post, with_kwargs=True, always_call=True),
                   register_optimizer_step_pre_hook(self._step_pre),
                   register_optimizer_step_post_hook(self._step_post)]
        self._undo = [handle.remove for handle in handles]
        patch = replaced(torch.autograd, "backward", self._backward(torch.autograd.backward))
        patch.__enter__()
        self._undo.append(lambda: patch.__exit__(None, None, None))
        return self

    def __exit__(self, kind, exc: BaseException | None, tb) -> None:
        try:
            if self._window is not None and not self._closed:
                if exc is None or isinstance(exc, StopTracking):
                    self._complete_step(notify=False)
                    if not self._closed and self.completed > self.skip:
                        self._close(None, notify=False)
                    elif not self._closed:  # no step completed in the window: no record
                        self._closed = True
                        self._window.stop()
                else:
                    self._close(f"{describe(exc, exit_as_call=False)} in {self._window.where()}")
        finally:
            for undo in reversed(self._undo):
                undo()
            Track.active = None
        if exc is None and self.record is None:
            raise UsageError(self.shortfall())
        if exc is None and self.steps is not None and self.record.settings.steps < self.steps:
            self.record = None
            raise UsageError(self.shortfall())

    def shortfall(self) -> str:
        """What the block did, where it measured nothing or fewer steps than asked: one line."""
        asked = f"steps={self.steps}" if self.steps is not None else "a step"
        asked += f" after skip={self.skip}" if self.skip else ""
        seen = (f"{self.optimizer_steps} optimizer step(s) in {self.completed} training step(s)" if self.optimizer_steps
                else "no optimizer step")
        return f"memprof measured {asked} but saw {seen} and {self.forwards} forward pass(es) of a module"

    # -- hooks -------------------------------------------------------------------------------------------
    def _module_pre(self, module: torch.nn.Module, args: tuple) -> None:
        outermost = self._depth == 0 and not self._busy
        self._depth += 1
        if outermost and not self._closed:
            self.forwards += 1
            self._begin("forward", module)
            if self._window is not None and not self._closed:
                self._window.saw_model(module)

    def _module_post(self, module: torch.nn.Module, args: tuple, kwargs: dict, result: Any) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0 and not self._busy and self._window is not None and not self._closed:
            self._window.saw_inputs(module, args, kwargs)

    def _backward(self, original: Callable) -> Callable:
        def backward(tensors, *args: Any, **kwargs: Any) -> Any:
            if not self._busy and not self._closed:
                self._begin("backward", tensors)
            self._busy += 1
            try:
                return original(tensors, *args, **kwargs)
            finally:
                self._busy -= 1

        return backward

    def _step_pre(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._stepping += 1
        self._busy += 1
        if self._stepping != 1 or self._closed:
            return None
        if all(o is not optimizer for o in self.optimizers):
            self.optimizers.append(optimizer)
        self._updating = False
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._update_begins(optimizer)
            return None
        # The forward and backward run inside the step (Lightning's automatic optimization, LBFGS): the closure's
        # first call is measured as they are; the update begins when it returns.
        called = False

        def measured_closure() -> Any:
            nonlocal called
            if called:
                return closure()
            called = True
            self._busy -= 1
            try:
                return closure()
            finally:
                self._busy += 1
                self._update_begins(optimizer)

        if len(args) > 1:
            return (args[0], measured_closure, *args[2:]), kwargs
        return args, {**kwargs, "closure": measured_closure}

    def _update_begins(self, optimizer: torch.optim.Optimizer) -> None:
        if self._updating or self._closed:
            return
        self._updating = True
        self._begin("step", optimizer)
        if self._window is not None and not self._closed:
            self._window.before_update(optimizer)

    def _step_post(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._stepping -= 1
        self._busy -= 1
        if self._stepping or self._closed:
            return
        self._update_begins(optimizer)  # a closure the optimizer never called
        self.optimizer_steps += 1
        self._phase = BETWEEN_STEPS
        if self._window is not None:
            self._window.after_update(optimizer, self._roles(optimizer))
            self._window.mark(BETWEEN_STEPS)

    # -- steps and the window ------------------------------------------------------------------------------
    def _begin(self, phase: str, hint: Any) -> None:
        """A forward, backward or optimizer step begins: close the step before it, open the window, mark."""
        if phase != "step" and self._phase in NEW_STEP:
            self._complete_step()
            if self._closed:
                return
        window = self._window
        if self._phase is None:
            if window is None and self.completed == self.skip:
                window = self._window = Window(self, _device_of(hint, self.model, self.optimizers))
            if window is not None:
                window.step += 1
                window.micro = 0
        previous, self._phase = self._phase, phase
        if window is None or previous == phase:
            return
        if phase == "forward" and previous == "backward":
            window.micro += 1
        if phase == "step" and previous == BETWEEN_STEPS:
            window.unmark(BETWEEN_STEPS)  # a second optimizer in the same step: one step phase
        else:
            window.mark(phase)

    def _complete_step(self, notify: bool = True) -> None:
        if self._phase not in NEW_STEP:
            return
        self._phase = None
        self.completed += 1
        if self._window is not None and self._window.step == self.steps:
            self._close(None, notify=notify)

    def _close(self, failure: str | None, notify: bool = True) -> None:
        """Stop capturing and build the record; ``on_close`` is told unless the block is ending anyway."""
        from memprof.measure.tracked_record import build

        self._closed = True
        measured = max(self.completed - self.skip, 0)
        self.record = build(self._window, self.model, self.optimizers, self._roles, failure=failure,
                            skipped=self.skip, steps=measured)
        if self.on_close is not None and notify and failure is None:
            self.on_close(self.record)

    def _roles(self, optimizer: torch.optim.Optimizer) -> dict[str, str]:
        """The registry's state roles for the optimizer's class (or its ``state_roles``); {} where unknown."""
        from memprof.optim.registry import entry_of

        kind = type(optimizer)
        if kind not in self._role_cache:
            entry = entry_of(optimizer)
            self._role_cache[kind] = dict(entry.state_roles()) if entry is not None else dict(
                getattr(kind, "state_roles", {}))
        return self._role_cache[kind]


class StopTracking(BaseException):
    """Raised by an ``on_close`` that stops the tracked code after the window (``memprof run``): a
    ``BaseException``, so that the script's own ``except Exception`` does not catch it."""


class Window:
    """The measured steps: the tracker, the capture and what the record is built from."""

    def __init__(self, track: Track, device: torch.device) -> None:
        from memprof.measure import environment

        self.device = device
        cuda = device.type == "cuda"
        self.tracker = CudaTracker(device, existing=True) if cuda else CpuTracker()
        self.capture = Capture(self.tracker)
        self.step = 0
        self.micro = 0
        self.micro_batches = 1  # forward passes of the last step (gradient accumulation)
        self.models: list[torch.nn.Module] = [track.model] if track.model is not None else []
        self.inputs: dict[tuple[str, int], int] = {}  # the last step's inputs: storage → bytes
        self.input_shape: tuple[int, ...] = ()
        self.input_is_tokens = False  # the first input holds integers (token ids): its second axis is a sequence
        self.gradients: dict[int, int] = {}  # bytes of each optimizer's gradients before its last update
        self.state_owner: dict[int, torch.optim.Optimizer] = {}  # index in capture.tags → whose state
        self.amp: torch.dtype | None = None
        self.nvml_before = environment.nvml_device_used() if cuda else {}
        self._started = time.perf_counter()
        self._phase = ""
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.tracker.__enter__()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        # Under torchrun, the buffers of collectives (DDP's gradient buckets, FSDP's all-gathers), as a rank's
        self._collectives = self.capture.collectives() if distributed and torch.distributed.get_world_size() > 1 \
            else contextlib.nullcontext()
        self._collectives.__enter__()
        self._saved = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._saved.__enter__()
        self._adopted: set[int] = set()  # the models and optimizers whose tensors are adopted
        for model in self.models:
            self._adopt(model)
        for optimizer in track.optimizers:
            self._adopt(optimizer)

    def _adopt(self, owner: torch.nn.Module | torch.optim.Optimizer) -> None:
        """Declare a model's or an optimizer's tensors live from the window's start (on CPU: made before it; the
        CUDA history holds them already). Once per owner: later ones are made in the window, and tracked."""
        if id(owner) in self._adopted:
            return
        self._adopted.add(id(owner))
        if isinstance(owner, torch.nn.Module):
            self.tracker.adopt([*owner.parameters(), *owner.buffers()])
            return
        self.tracker.adopt([*_parameters(owner), *(p.grad for p in _parameters(owner) if p.grad is not None),
                            *(s.tensor for s in walk_state(owner, {}, {}))])

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor saved for backward, made before the window where it is unknown (a loss's targets)."""
        self.tracker.adopt([tensor])
        self.capture.saved_outputs([tensor])
        return tensor

    def where(self) -> str:
        mark = self.capture.marks[-1] if self.capture.marks else None
        return f"{mark.phase} (step {mark.step})" if mark else "the first step"

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        if self._phase in PHASES:
            self.capture.phase_ms[self._phase].append((now - self._started) * 1000.0)
        self.capture.mark(phase, self.step, self.micro if phase in ("forward", "backward") else 0)
        self._started, self._phase = time.perf_counter(), phase
        if phase == "forward" and self.micro == 0:
            self.inputs = {}
        if phase == "forward":
            self.micro_batches = self.micro + 1
            self.amp = torch.get_autocast_dtype(self.device.type) if torch.is_autocast_enabled(self.device.type) else None

    def unmark(self, phase: str) -> None:
        """Take back the last mark (``phase``): the step phase goes on."""
        if self.capture.marks and self.capture.marks[-1].phase == phase:
            self.capture.marks.pop()
            self.capture.allocated_at_marks.pop()
            self._phase = "step"

    def saw_model(self, module: torch.nn.Module) -> None:
        """A module called outermost: a model, where it holds parameters (not a loss module)."""
        if all(module is not m for m in self.models) and next(module.parameters(), None) is not None:
            self.models.append(module)
            self._adopt(module)

    def saw_inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """A model's arguments that no autograd graph made (not another model's output: a GAN's) are inputs."""
        if next(module.parameters(), None) is None:
            return
        tensors = [t for t in tree_flatten((args, kwargs))[0]
                   if isinstance(t, torch.Tensor) and t.grad_fn is None and not t.requires_grad]
        self.tracker.adopt(tensors)
        self.capture.inputs(tensors)
        for tensor in (t for outer in tensors for t in storage_tensors(outer)):
            if tensor.layout == torch.strided:
                self.inputs[storage_key(tensor)] = tensor.untyped_storage().nbytes()
        if tensors and not self.input_shape:
            self.input_shape = tuple(tensors[0].shape)
            self.input_is_tokens = not tensors[0].is_floating_point() and not tensors[0].is_complex()

    def before_update(self, optimizer: torch.optim.Optimizer) -> None:
        from memprof.measure.state import unique_bytes
        from memprof.optim import protocol

        self._adopt(optimizer)
        grads = [p.grad for p in _parameters(optimizer) if p.grad is not None]
        self.capture.gradients(grads, protocol.gradient_component(optimizer))
        self.gradients[id(optimizer)] = unique_bytes(grads)

    def after_update(self, optimizer: torch.optim.Optimizer, roles: dict[str, str]) -> None:
        first = len(self.capture.tags)
        self.capture.optimizer_state(walk_state(optimizer, {}, roles))
        for index in range(first, len(self.capture.tags)):
            self.state_owner[index] = optimizer

    def stop(self) -> None:
        """Stop capturing (the window closes)."""
        self.mark("end")
        self._saved.__exit__(None, None, None)
        self._collectives.__exit__(None, None, None)
        self.tracker.__exit__(None, None, None)


def track(model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None, *,
          steps: int | None = None, skip: int = 0) -> Track:
    """Measure the training steps of the ``with`` block: ``with memprof.track(model, optimizer) as run: …``,
    then ``run.record`` is the ``RunRecord`` (the same categories, roles and per-parameter rows as
    ``memprof compare``). ``steps``: measure this many training steps (default: all of the block's), after
    ``skip`` warm-up steps. Model and optimizer may be left out: the outermost modules called and the
    optimizers that step are found by torch's global hooks. A block that runs no optimizer step, or fewer
    than ``skip + steps``, raises ``UsageError`` saying what it saw."""
    return Track(model, optimizer, steps=steps, skip=skip)


def _parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if isinstance(p, torch.Tensor)]


def _device_of(hint: Any, model: torch.nn.Module | None, optimizers: list[torch.optim.Optimizer]) -> torch.device:
    """The device the loop trains on: the model's, else what opened the window (the module called, the loss
    back-propagated, the optimizer stepped), else the CPU."""
    tensors = [*(model.parameters() if model is not None else ())]
    if isinstance(hint, torch.nn.Module):
        tensors += [*hint.parameters(), *hint.buffers()]
    elif isinstance(hint, torch.optim.Optimizer):
        tensors += _parameters(hint)
    else:
        tensors += [t for t in tree_flatten(hint)[0] if isinstance(t, torch.Tensor)]
    for optimizer in optimizers:
        tensors += _parameters(optimizer)
    device = next((t.device for t in tensors if t.device.type != "meta"), torch.device("cpu"))
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else device


def _check(model: Any, optimizer: Any, steps: Any, skip: Any) -> None:
    if model is not None and not isinstance(model, torch.nn.Module):
        raise UsageError(f"memprof.track: model must be a torch.nn.Module or None, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(f"memprof.track: optimizer must be a torch.optim.Optimizer or None, got "
                         f"{type(optimizer).__name__}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise UsageError(f"memprof.track: steps must be a positive integer or None, got {steps!r}")
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise UsageError(f"memprof.track: skip must be a non-negative integer, got {skip!r}")
