"""Run instrumented training steps for one (model, optimizer, settings) and build its run record.

The same code path serves CPU and CUDA; only the tracker differs. Phases are marked on the
tracker's clock after a device synchronize, identities (parameters, gradients, optimizer state,
saved activations, inputs) are told to the capture, and one replay attributes every byte
(``memprof.measure.attribution``).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from memprof.measure import environment
from memprof.measure.attribution import Capture, attribute
from memprof.measure.state import walk_state
from memprof.measure.trackers import CpuTracker, CudaTracker
from memprof.optim import protocol
from memprof.optim.registry import build_optimizer, parse_spec
from memprof.record import Peaks, RunRecord
from memprof.settings import Settings

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def measure(settings: Settings) -> RunRecord:
    """Measure one optimizer on one model in this process."""
    from memprof.models import build_model

    device = torch.device(settings.device)
    spec = parse_spec(settings.spec)
    nvml_before = environment.nvml_device_used() if device.type == "cuda" else {}
    tracker: CpuTracker | CudaTracker = (
        # With --snapshot every entry carries Python frames: keep the history short enough to load.
        CudaTracker(device, stacks=True, max_entries=200_000) if device.type == "cuda" and settings.snapshot
        else CudaTracker(device) if device.type == "cuda" else CpuTracker()
    )
    capture = Capture(tracker)
    record = RunRecord(settings=settings, environment={})
    torch.manual_seed(settings.seed)
    with tracker:
        capture.mark("warmup", 0)
        _warm_up_libraries(device)
        capture.mark("setup", 0)
        built = build_model(
            settings.model,
            settings.model_options(),
            device=device,
        )
        model, batch = built.model, built.batch
        optimizer = build_optimizer(spec, model)
        names = {p: n for n, p in model.named_parameters()}
        params = list(names)
        buffers = list(model.buffers())
        inputs = [t for t in batch.values() if isinstance(t, torch.Tensor)]
        tracker.adopt([*params, *buffers, *inputs])
        record.model_config = built.config
        record.n_params = sum(p.numel() for p in params)
        record.gradient_component = protocol.gradient_component(optimizer)
        capture.weights(params)
        capture.buffers(buffers)
        capture.inputs(inputs)
        roles = spec.entry.state_roles()
        autocast = (
            torch.autocast(device.type, dtype=AMP[settings.amp]) if settings.amp else contextlib.nullcontext()
        )
        # The loop keeps no references of its own to gradients or state between phases:
        # holding them would change what is live and when it is freed.
        phase, step = "forward", 0
        try:
            for step in range(1, settings.steps + 1):
                phase = "forward"
                capture.mark(phase, step)
                start = time.perf_counter()
                optimizer.zero_grad()
                with capture.saved_tensor_hooks(), autocast:
                    loss = protocol.scale_loss(optimizer, built.loss(model, batch))
                phase = "backward"
                capture.mark(phase, step)
                capture.phase_ms["forward"].append(_elapsed_ms(start, tracker))
                start = time.perf_counter()
                loss.backward()
                del loss
                capture.mark("step", step)
                capture.phase_ms["backward"].append(_elapsed_ms(start, tracker))
                capture.gradients((p.grad for p in params), record.gradient_component)
                phase = "step"
                start = time.perf_counter()
                optimizer.step()
                capture.phase_ms["step"].append(_elapsed_ms(start, tracker))
                capture.optimizer_state(walk_state(optimizer, names, roles))
                record.telemetry.append(protocol.telemetry(optimizer, names))
        except torch.OutOfMemoryError:
            record.status, record.failure = "oom", f"OOM in {phase} (step {step})"
        capture.mark("end", settings.steps)
        protocol.release(optimizer)
        state = walk_state(optimizer, names, roles)
        gradients = [p.grad for p in params if p.grad is not None]
        record.hyperparameters = {k: v for k, v in optimizer.defaults.items() if _plain(v)}
        record.inferred_roles = spec.inferred_roles or any(s.inferred for s in state)
        device_peaks = _device_peaks(device, nvml_before)
        if settings.snapshot and isinstance(tracker, CudaTracker):
            tracker.keep_snapshot(settings.snapshot)
    record.environment = environment.collect(device)
    if getattr(tracker, "dropped", False):
        record.status = "failed"
        record.failure = f"allocator history overflowed ({tracker.max_entries} entries); measure fewer --steps"
    if device_peaks is not None:
        device_peaks.exact_blocks = tracker.exact_blocks
    attribute(record, capture, tracker.allocations, names, buffers, inputs, gradients, state, device_peaks)
    return record


def _warm_up_libraries(device: torch.device) -> None:
    """Create cuBLAS/cuDNN handles and workspaces before anything is attributed."""
    if device.type != "cuda":
        return
    a = torch.randn(64, 64, device=device, requires_grad=True)
    (a @ a).sum().backward()
    x = torch.randn(1, 3, 8, 8, device=device)
    torch.nn.functional.conv2d(x, torch.randn(4, 3, 3, 3, device=device))
    torch.cuda.synchronize(device)


def _elapsed_ms(start: float, tracker: CpuTracker | CudaTracker) -> float:
    """Milliseconds since ``start`` (a ``perf_counter`` reading), after the device is idle."""
    tracker.sync()
    return (time.perf_counter() - start) * 1000.0


def _plain(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool, type(None), tuple, list))




def _device_peaks(device: torch.device, nvml_before: dict[str, int]) -> Peaks | None:
    """What the CUDA allocator and NVML report for the run (None on CPU)."""
    if device.type != "cuda":
        return None
    nvml, nvml_basis = environment.nvml_process_bytes(device, nvml_before)
    return Peaks(
        simulated=False,
        max_allocated=torch.cuda.max_memory_allocated(device),
        max_reserved=torch.cuda.max_memory_reserved(device),
        reserved_end=torch.cuda.memory_reserved(device),
        allocated_end=torch.cuda.memory_allocated(device),
        nvml=nvml,
        nvml_basis=nvml_basis,
    )
