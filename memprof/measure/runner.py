"""Run instrumented training steps for one (model, optimizer, settings) and build its run record.

The same code path serves CPU and CUDA; only the tracker differs. Phases are marked on the
tracker's clock after a device synchronize, identities (parameters, gradients, optimizer state,
saved activations, inputs) are tagged by storage pointer, and one replay attributes every byte.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from typing import Any

import torch

from memprof.measure import environment
from memprof.measure.events import Allocation, PhaseMark, Replay, Tag, assign, replay
from memprof.measure.state import StateTensor, unique_bytes, walk_state
from memprof.measure.trackers import CpuTracker, CudaTracker
from memprof.optim import protocol
from memprof.optim.registry import build_optimizer, parse_spec
from memprof.record import ParameterState, Row, RunRecord, Settings

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}
TIMELINE_POINTS = 4000


class _Capture:
    """The tags and phase marks of one run, on the tracker's clock."""

    def __init__(self, tracker: CpuTracker | CudaTracker) -> None:
        self.tracker = tracker
        self.tags: list[Tag] = []
        self.marks: list[PhaseMark] = []
        self.allocated_at_marks: list[int] = []
        self.phase_ms: dict[str, list[float]] = defaultdict(list)

    def mark(self, phase: str, step: int) -> None:
        self.tracker.sync()
        self.marks.append(PhaseMark(self.tracker.now(), phase, step))
        self.allocated_at_marks.append(self.tracker.memory_allocated())

    def tag(self, tensors, category: str, component: str) -> None:
        now = self.tracker.now()
        for tensor in tensors:
            if tensor is None or tensor.layout != torch.strided:
                continue
            storage = tensor.untyped_storage()
            self.tags.append(Tag(now, storage.data_ptr(), category, component, storage.nbytes()))

    def tag_state(self, state: list[StateTensor]) -> None:
        for item in state:
            self.tag([item.tensor], "optimizer_state", item.role)

    def saved_tensor_hooks(self):
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            self.tag([tensor], "activations", "saved")
            return tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


def measure(settings: Settings) -> RunRecord:
    """Measure one optimizer on one model in this process."""
    from memprof.models import ModelOptions, build_model

    device = torch.device(settings.device)
    spec = parse_spec(settings.spec)
    nvml_before = environment.nvml_device_used() if device.type == "cuda" else {}
    tracker: CpuTracker | CudaTracker = (
        # With --snapshot every entry carries Python frames: keep the history short enough to load.
        CudaTracker(device, stacks=True, max_entries=200_000) if device.type == "cuda" and settings.snapshot
        else CudaTracker(device) if device.type == "cuda" else CpuTracker()
    )
    capture = _Capture(tracker)
    record = RunRecord(settings=settings, environment={})
    torch.manual_seed(settings.seed)
    with tracker:
        capture.mark("warmup", 0)
        _warm_up_libraries(device)
        capture.mark("setup", 0)
        built = build_model(
            settings.model,
            ModelOptions(
                batch_size=settings.batch_size,
                seq_len=settings.seq_len,
                image_size=settings.image_size,
                num_classes=settings.num_classes,
                dtype=settings.dtype,
            ),
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
        capture.tag(params, "weights", "param")
        capture.tag(buffers, "buffers", "buffer")
        capture.tag(inputs, "inputs", "batch")
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
                capture.tag((p.grad for p in params), "gradients", record.gradient_component)
                phase = "step"
                start = time.perf_counter()
                optimizer.step()
                capture.phase_ms["step"].append(_elapsed_ms(start, tracker))
                capture.tag_state(walk_state(optimizer, names, roles))
                record.telemetry.append(protocol.telemetry(optimizer, names))
        except torch.OutOfMemoryError:
            record.status, record.failure = "oom", f"OOM in {phase} (step {step})"
        capture.mark("end", settings.steps)
        protocol.release(optimizer)
        state = walk_state(optimizer, names, roles)
        gradients = [p.grad for p in params if p.grad is not None]
        record.hyperparameters = {k: v for k, v in optimizer.defaults.items() if _plain(v)}
        record.inferred_roles = spec.inferred_roles or any(s.inferred for s in state)
        peaks = _allocator_peaks(device, nvml_before)
        if settings.snapshot and isinstance(tracker, CudaTracker):
            tracker.keep_snapshot(settings.snapshot)
    record.environment = environment.collect(device)
    if getattr(tracker, "dropped", False):
        record.status = "failed"
        record.failure = f"allocator history overflowed ({tracker.max_entries} entries); measure fewer --steps"
    _attribute(record, capture, tracker.allocations, names, buffers, inputs, gradients, state, peaks)
    if not getattr(tracker, "exact_blocks", True):
        record.peaks["block_sizes"] = "approximate: expandable segments (replayed with the classic allocator's rules)"
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


def _allocator_peaks(device: torch.device, nvml_before: dict[str, int]) -> dict[str, Any]:
    if device.type != "cuda":
        return {}
    nvml, nvml_basis = environment.nvml_process_bytes(device, nvml_before)
    return {
        "max_allocated": torch.cuda.max_memory_allocated(device),
        "max_reserved": torch.cuda.max_memory_reserved(device),
        "reserved_end": torch.cuda.memory_reserved(device),
        "allocated_end": torch.cuda.memory_allocated(device),
        "nvml": nvml,
        "nvml_basis": nvml_basis,
    }


def _attribute(
    record: RunRecord,
    capture: _Capture,
    allocations: list[Allocation],
    names: dict[torch.Tensor, str],
    buffers: list[torch.Tensor],
    inputs: list[torch.Tensor],
    gradients: list[torch.Tensor],
    state: list[StateTensor],
    peaks: dict[str, Any],
) -> None:
    """Fill the record's rows, peaks and per-parameter table from the capture."""
    assign(allocations, capture.tags, capture.marks)
    result = replay(allocations, capture.marks, timeline_points=TIMELINE_POINTS if record.settings.timeline else 0)
    cuda = record.settings.device.startswith("cuda")
    params = list(names)
    rows: list[Row] = []
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    rows.append(Row("weights", "param", unique_bytes(params)))
    rows.append(Row("buffers", "buffer", unique_bytes([b for b in buffers if b.untyped_storage().data_ptr() not in param_ptrs])))
    rows.append(Row("gradients", record.gradient_component, unique_bytes(gradients)))
    by_role: dict[str, list[torch.Tensor]] = defaultdict(list)
    for item in state:
        by_role[item.role].append(item.tensor)
    for role, tensors in sorted(by_role.items()):
        rows.append(Row("optimizer_state", role, unique_bytes(tensors)))
    rows.append(Row("inputs", "batch", unique_bytes(inputs)))
    last = _last_phases(result, record)
    rows.append(Row("activations", "saved", _activation_bytes(allocations, last.get("backward")), "tensor"))
    for phase in ("forward", "backward"):
        info = last.get(phase)
        peak_temp = max((v for (c, comp), v in info["peak_by_component"].items() if c == "temporaries" and comp == phase), default=0) if info else 0
        rows.append(Row("temporaries", phase, peak_temp, "allocator"))
    step_info = last.get("step")
    rows.append(Row("step_transient", "step", (step_info["peak"] - step_info["start_bytes"]) if step_info else 0, "allocator"))
    if cuda:
        rows.append(Row("allocator", "reserved-allocated", peaks["max_reserved"] - peaks["max_allocated"], "allocator"))
        workspace = sum(v for (c, _), v in result.peak_composition.items() if c == "context")
        rows.append(Row("context", "library workspace", workspace, "allocator"))
        if peaks.get("nvml") is not None:
            rows.append(Row("context", "driver (nvml-reserved)", peaks["nvml"] - peaks["reserved_end"], "nvml"))
    unattributed = sum(v for (c, _), v in result.peak_composition.items() if c == "unattributed")
    rows.append(Row("unattributed", "at peak", unattributed, "allocator"))
    record.breakdown = rows
    record.peak = [Row(c, comp, v, "allocator") for (c, comp), v in sorted(result.peak_composition.items())]
    record.peaks = {
        "allocated": result.peak_bytes,
        "phase": result.peak_phase[0],
        "step": result.peak_phase[1],
        **({k: v for k, v in peaks.items()} if cuda else {"basis": "simulated from live tensors"}),
    }
    record.phase_peaks = [
        {
            "step": p["step"],
            "phase": p["phase"],
            "start": p["start_bytes"],
            "peak": p["peak"],
            "end": p["end_bytes"],
            "allocator_at_start": capture.allocated_at_marks[i] if cuda and i < len(capture.allocated_at_marks) else None,
        }
        for i, p in enumerate(result.phase_peaks)
    ]
    record.timings_ms = _medians(capture.phase_ms)
    record.timeline = result.timeline
    record.parameters = _parameter_table(names, state)


def _parameter_table(names: dict[torch.Tensor, str], state: list[StateTensor]) -> list[ParameterState]:
    """Optimizer state per parameter, largest first."""
    per_param: dict[str, list[StateTensor]] = defaultdict(list)
    for item in state:
        per_param[item.param_name].append(item)
    factored = any(item.role == "factor" for item in state)
    shapes = {name: p for p, name in names.items()}
    table = []
    for name, items in per_param.items():
        param = shapes.get(name)
        by_role: dict[str, int] = defaultdict(int)
        by_key: dict[str, int] = defaultdict(int)
        for item in items:
            by_role[item.role] += item.storage_bytes
            by_key[item.path] += item.storage_bytes
        numel = param.numel() if param is not None else -1
        table.append(
            ParameterState(
                name=name,
                shape=tuple(param.shape) if param is not None else (),
                dtype=str(param.dtype).removeprefix("torch.") if param is not None else "",
                param_bytes=param.numel() * param.element_size() if param is not None else 0,
                state_bytes=sum(by_role.values()),
                by_role=dict(by_role),
                by_key=dict(by_key),
                unfactored=factored and numel > 1 and any(i.role == "moment" and i.tensor.numel() == numel for i in items),
            )
        )
    return sorted(table, key=lambda row: -row.state_bytes)


def _last_phases(result: Replay, record: RunRecord) -> dict[str, dict]:
    last_step = max((p["step"] for p in result.phase_peaks if p["phase"] in ("forward", "backward", "step")), default=0)
    return {p["phase"]: p for p in result.phase_peaks if p["step"] == last_step and p["phase"] in ("forward", "backward", "step")}


def _activation_bytes(allocations: list[Allocation], backward: dict | None) -> int:
    """Storage bytes of the saved-for-backward tensors live when the last backward began."""
    if backward is None:
        return 0
    t = backward["time"]
    return sum(
        a.tensor_bytes or a.nbytes
        for a in allocations
        if a.category == "activations" and a.start <= t and (a.end is None or a.end > t)
    )


def _medians(phase_ms: dict[str, list[float]]) -> dict[str, float]:
    """Median per phase over the steps after the first (warm-up), or the only step."""
    out = {}
    for phase, values in phase_ms.items():
        timed = values[1:] or values
        if timed:
            out[phase] = statistics.median(timed)
    return out
