"""Attribution: where a byte gets its category, in one file.

The runner tells a ``Capture`` which tensors are what (weights, buffers, inputs, gradients,
optimizer state by role, tensors saved for backward) and marks the phases. ``assign`` gives every
allocation one category: its identity tag by the taxonomy's precedence, else the phase that
made it. ``attribute`` replays the stream and turns it into the record's rows, peaks and
per-parameter table. The categories, their precedence and the roles are declared in
``memprof.taxonomy``.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import statistics
from collections import defaultdict
from typing import Iterator

import torch
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    is_traceable_wrapper_subclass_type,
)
from torch.utils._pytree import tree_flatten

from memprof.measure.events import Allocation, PhaseMark, Replay, Tag, replay
from memprof.measure.state import (
    StateTensor,
    local,
    storage_key,
    storage_tensors,
    unique_bytes,
)
from memprof.measure.trackers import CpuTracker, CudaTracker
from memprof.record import ParameterState, Peaks, PhasePeak, Row, RunRecord, Timeline
from memprof.taxonomy import (
    FRAGMENTATION,
    IDENTITY_PRECEDENCE,
    PHASES,
    RECOMPUTE_SCRATCH,
    RECOMPUTED,
    WEIGHT_COMPONENTS,
    category_of_recomputed,
    category_of_untagged,
    weight_component,
)

TIMELINE_POINTS = 4000


class Capture:
    """The tags and phase marks of one run, on the tracker's clock."""

    def __init__(self, tracker: CpuTracker | CudaTracker) -> None:
        self.tracker = tracker
        self.tags: list[Tag] = []
        self.marks: list[PhaseMark] = []
        self.allocated_at_marks: list[int] = []
        self.phase_ms: dict[str, list[float]] = defaultdict(list)
        self.collective_components: set[tuple[str, str]] = set()
        self.block_marks: list[tuple[float, int]] = []  # (time, block index): a block starts or ends
        self.depth = 0  # blocks watched (a depth probe's), 0 when none
        self.recompute_windows: list[tuple[float, float]] = []  # (start, end): activation checkpointing recomputes
        self.weight_components: dict[torch.Tensor, str] = {}  # each weight tensor's component (``weights``)

    def mark(self, phase: str, step: int, micro: int = 0) -> None:
        self.tracker.sync()
        self.marks.append(PhaseMark(self.tracker.now(), phase, step, micro))
        self.allocated_at_marks.append(self.tracker.memory_allocated())

    # -- identities: the only places a tensor is given a category ------------------------------
    def weights(self, components: dict[torch.Tensor, str]) -> None:
        """Tag each weight tensor with its component (``weight_components``)."""
        self.weight_components = components
        for tensor, component in components.items():
            self._tag([tensor], "weights", component)

    def buffers(self, buffers) -> None:
        self._tag(buffers, "buffers", "buffer")

    def inputs(self, tensors) -> None:
        self._tag(tensors, "inputs", "batch")

    def gradients(self, grads, component: str) -> None:
        self._tag(grads, "gradients", component)

    def _tag(self, tensors, category: str, component: str) -> None:
        now = self.tracker.now()
        for tensor in (t for outer in tensors if outer is not None for t in storage_tensors(outer)):
            if tensor.layout != torch.strided:
                continue
            storage = tensor.untyped_storage()
            self.tags.append(Tag(now, self.tracker.key(storage), category, component, storage.nbytes()))

    def optimizer_state(self, state: list[StateTensor]) -> None:
        for item in state:
            self._tag([item.tensor], "optimizer_state", item.role)

    def watch_blocks(self, model: torch.nn.Module, depth: int) -> None:
        """Mark when each of the model's ``depth`` repeated blocks starts and ends, in forward and in backward
        (a depth probe's: ``memprof.measure.depth`` reads each phase's peak before, in the first and the last
        block, and after them). The backward marks are gradient hooks on the blocks' inputs and outputs,
        which add nothing to the graph; nothing is marked where no one module list holds the blocks. A block
        whose input needs no gradient (the first block over a frozen embedding, --lora) marks the end of its
        backward by hooks on its trained parameters' gradients instead."""
        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == depth
                 and len({type(child) for child in m}) == 1]
        if len(lists) != 1:
            return
        self.depth = depth

        def mark(index: int) -> None:
            self.block_marks.append((self.tracker.now(), index))

        def on_grad(index: int, tensor) -> None:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(lambda grad: mark(index))

        hooked: set[int] = set()  # blocks whose parameters' gradients mark them

        def before(index: int, args: tuple, kwargs: dict) -> None:
            mark(index)
            tensor = args[0] if args else kwargs.get("hidden_states")
            on_grad(index, tensor)
            if isinstance(tensor, torch.Tensor) and not tensor.requires_grad and index not in hooked:
                hooked.add(index)
                for param in (p for p in lists[0][index].parameters() if p.requires_grad):
                    param.register_hook(lambda grad, i=index: mark(i))

        def after(index: int, output) -> None:
            mark(index)
            on_grad(index, next(iter(t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)), None))

        for index, block in enumerate(lists[0]):
            block.register_forward_pre_hook(lambda m, args, kwargs, i=index: before(i, args, kwargs), with_kwargs=True)
            block.register_forward_hook(lambda m, args, output, i=index: after(i, output))

    def saved_outputs(self, outputs) -> None:
        """Tag outputs kept for backward outside autograd's saved-tensor hooks (selective checkpointing's)."""
        self._tag([t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor)], "activations", "saved")

    @contextlib.contextmanager
    def recomputing(self) -> Iterator[None]:
        """Around one recomputation of a checkpointed block in backward: what it allocates is told apart
        (``assign``)."""
        self.tracker.sync()
        start = self.tracker.now()
        try:
            yield
        finally:
            self.tracker.sync()
            self.recompute_windows.append((start, self.tracker.now()))

    def saved_tensor_hooks(self):
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            self._tag([tensor], "activations", "saved")
            return tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)

    def collectives(self) -> "CollectiveBuffers":
        """A dispatch mode that tags the buffers of torch.distributed's collectives, for a distributed run
        (where a storage the tracker first meets through a view was made by the backend: new then)."""
        if isinstance(self.tracker, CpuTracker):
            self.tracker.unseen_are_new = True
        return CollectiveBuffers(self)

    def collective_buffer(self, tensors, category: str, component: str) -> None:
        self.collective_components.add((category, component))
        self._tag(tensors, category, component)


def _collective_buffers() -> dict:
    """op → (argument index or name, category, component): the buffers a collective's caller made for it
    (the components are described in ``memprof.taxonomy.COLLECTIVE_COMPONENTS``). A reduce-scatter's
    output is the gradient shard, tagged as gradients."""
    c10d, fsdp = torch.ops.c10d, torch.ops.fsdp
    table = {
        c10d._allgather_base_.default: (0, "temporaries", "all-gather"),
        c10d.allgather_into_tensor_coalesced_.default: (0, "temporaries", "all-gather"),
        c10d._reduce_scatter_base_.default: (1, "temporaries", "reduce-scatter"),
        c10d.reduce_scatter_tensor_coalesced_.default: (1, "temporaries", "reduce-scatter"),
        c10d.allreduce_.default: (0, "gradients", "all-reduce bucket"),
    }
    if hasattr(fsdp, "split_with_sizes_copy"):
        table[fsdp.split_with_sizes_copy.default] = ("out", "temporaries", "unsharded params")
    return table


class CollectiveBuffers(TorchDispatchMode):
    """Tags the buffers of collectives as they run; ops on tensor subclasses (DTensor) are left to the
    subclass, whose collectives on plain tensors come back here."""

    def __init__(self, capture: Capture) -> None:
        super().__init__()
        self.capture = capture
        self.table = _collective_buffers()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(is_traceable_wrapper_subclass_type(t) for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in self.table:
            where, category, component = self.table[func]
            buffers = kwargs.get(where) if isinstance(where, str) else args[where]
            self.capture.collective_buffer(tree_flatten(buffers)[0], category, component)
        return out


def weight_components(model: torch.nn.Module, names: dict[torch.Tensor, str]) -> dict[torch.Tensor, str]:
    """The ``weights`` component of each tensor this rank holds (``names``: tensor → parameter name), by the
    name and whether the model trains that parameter (``memprof.taxonomy.weight_component``)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {tensor: weight_component(name, name in trained) for tensor, name in names.items()}


def assign(allocations: list[Allocation], tags: list[Tag], marks: list[PhaseMark],
           recompute_windows: list[tuple[float, float]] = ()) -> None:
    """Give every allocation one category: its best identity tag, else what made it: a recomputation in
    backward (``recompute_windows``, activation checkpointing), else the phase."""
    by_ptr: dict[int, list[Allocation]] = defaultdict(list)
    for alloc in allocations:
        by_ptr[alloc.ptr].append(alloc)
    starts = {ptr: [a.start for a in allocs] for ptr, allocs in by_ptr.items()}
    rank = {name: i for i, name in enumerate(IDENTITY_PRECEDENCE)}
    for tag in tags:
        allocs = by_ptr.get(tag.ptr)
        if not allocs:
            continue
        i = bisect.bisect_right(starts[tag.ptr], tag.time) - 1
        if i < 0:
            continue
        alloc = allocs[i]
        if alloc.end is not None and alloc.end < tag.time:
            continue  # that block was already freed: the tag belongs to nothing tracked
        if alloc.category is None or rank[tag.category] < rank[alloc.category]:
            alloc.category, alloc.component, alloc.tensor_bytes = tag.category, tag.component, tag.tensor_bytes
    mark_times = [m.time for m in marks]
    windows = sorted(recompute_windows)
    window_starts = [start for start, _ in windows]
    for alloc in allocations:
        if alloc.category is not None:
            continue
        w = bisect.bisect_right(window_starts, alloc.start) - 1
        if w >= 0 and alloc.start <= windows[w][1]:
            freed_within = alloc.end is not None and alloc.end <= windows[w][1]
            alloc.category, alloc.component = category_of_recomputed(freed_within)
            continue
        i = bisect.bisect_right(mark_times, alloc.start) - 1
        phase = marks[i].phase if i >= 0 else "setup"
        alloc.category, alloc.component = category_of_untagged(phase)


def attribute(
    record: RunRecord,
    capture: Capture,
    allocations: list[Allocation],
    names: dict[torch.Tensor, str],
    buffers: list[torch.Tensor],
    inputs: list[torch.Tensor],
    gradients: list[torch.Tensor],
    state: list[StateTensor],
    device_peaks: Peaks | None,
    estimated_driver: int | None = None,
) -> None:
    """Fill the record's rows, peaks and per-parameter table from the capture.

    ``device_peaks`` is what the CUDA allocator and NVML reported (None on CPU and in estimates,
    where the peak is simulated from live tensors); ``estimated_driver`` is an estimate's CUDA
    context from the GPU table (``memprof.gpus``).
    """
    assign(allocations, capture.tags, capture.marks, capture.recompute_windows)
    result = replay(allocations, capture.marks, timeline_points=TIMELINE_POINTS if record.settings.timeline else 0,
                    keep_totals=bool(capture.block_marks))
    params = list(names)
    rows: list[Row] = []
    param_storages = {storage_key(t) for p in params for t in storage_tensors(p)}
    rows += _weight_rows(capture.weight_components)
    rows.append(Row("buffers", "buffer", unique_bytes([b for b in buffers if storage_key(b) not in param_storages])))
    rows.append(Row("gradients", record.gradient_component, unique_bytes(gradients)))
    by_role: dict[str, list[torch.Tensor]] = defaultdict(list)
    for item in state:
        by_role[item.role].append(item.tensor)
    for role, tensors in sorted(by_role.items()):
        rows.append(Row("optimizer_state", role, unique_bytes(tensors)))
    rows.append(Row("inputs", "batch", unique_bytes(inputs)))
    last = _last_phases(result)
    rows.append(Row("activations", "saved", _activation_bytes(allocations, last.get("backward")), "tensor"))
    for phase in ("forward", "backward"):
        info = last.get(phase)
        peak_temp = max((v for (c, comp), v in info["peak_by_component"].items() if c == "temporaries" and comp == phase), default=0) if info else 0
        rows.append(Row("temporaries", phase, peak_temp, "allocator"))
    if capture.recompute_windows:  # activation checkpointing: the most its recomputations held at once
        backward = last.get("backward")
        for key in (RECOMPUTED, RECOMPUTE_SCRATCH):
            rows.append(Row(*key, backward["peak_by_component"].get(key, 0) if backward else 0, "allocator"))
    for category, component in sorted(capture.collective_components):
        most = max((info["peak_by_component"].get((category, component), 0) for info in last.values()), default=0)
        rows.append(Row(category, component, most, "allocator"))
    step_info = last.get("step")
    rows.append(Row("step_transient", "step", (step_info["peak"] - step_info["start_bytes"]) if step_info else 0, "allocator"))
    if device_peaks is not None:
        rows.append(Row(*FRAGMENTATION, device_peaks.max_reserved - device_peaks.max_allocated, "allocator"))
    peak_rows = _rows(result.peak_composition)
    workspace = _at_peak(peak_rows, ("context", "library workspace"))
    if device_peaks is not None or workspace:
        rows.append(Row("context", "library workspace", workspace, "allocator"))
    if device_peaks is not None and device_peaks.nvml is not None:
        # NVML below reserved (a device-wide delta that missed memory) says nothing of the driver: 0, not negative.
        rows.append(Row("context", "driver (nvml-reserved)", max(0, device_peaks.nvml - device_peaks.reserved_end), "nvml"))
    if estimated_driver is not None:
        rows.append(Row("context", "driver (gpu table)", estimated_driver, "gpu table"))
    rows.append(Row("unattributed", "at peak", _at_peak(peak_rows, ("unattributed", "at peak")), "allocator"))
    record.breakdown = rows
    record.peak = peak_rows
    peaks = device_peaks or Peaks()
    peaks.allocated, (peaks.phase, peaks.step), peaks.micro = result.peak_bytes, result.peak_phase, result.peak_micro
    record.peaks = peaks
    cuda = device_peaks is not None
    next_times = [p["time"] for p in result.phase_peaks[1:]] + [float("inf")]
    record.phase_peaks = [
        PhasePeak(
            step=p["step"], phase=p["phase"], micro=p["micro"], start=p["start_bytes"], peak=p["peak"],
            end=p["end_bytes"],
            allocator_at_start=capture.allocated_at_marks[i] if cuda and i < len(capture.allocated_at_marks) else None,
            composition=_rows(p["composition"]),
            blocks=_block_peaks(result, capture, p["time"], next_times[i]),
        )
        for i, p in enumerate(result.phase_peaks)
    ]
    record.timings_ms = _medians(capture.phase_ms)
    record.timeline = Timeline(**result.timeline) if result.timeline else Timeline()
    record.parameters = _parameter_table(names, state, capture.weight_components)


def move_global_peak(record: RunRecord, top: PhasePeak) -> None:
    """Make the phase peak ``top`` the record's global peak, with the rows read at it (a record
    extrapolated in depth whose global peak changes phase, ``memprof.measure.depth``)."""
    record.peaks.allocated, record.peaks.phase, record.peaks.step = top.peak, top.phase, top.step
    record.peaks.micro = top.micro
    record.peak = list(top.composition)
    record.breakdown = [
        dataclasses.replace(row, bytes=_at_peak(record.peak, key))
        if (key := (row.category, row.component)) in _AT_PEAK else row
        for row in record.breakdown
    ]


_AT_PEAK = {("context", "library workspace"): "context", ("unattributed", "at peak"): "unattributed"}
"""Breakdown rows read at the global peak → the category whose bytes they sum there."""


def _at_peak(peak: list[Row], row: tuple[str, str]) -> int:
    return sum(r.bytes for r in peak if r.category == _AT_PEAK[row])


def _block_peaks(result: Replay, capture: Capture, start: float, end: float) -> dict[str, int]:
    """A phase's peak before the watched blocks, in the first and in the last block, and after them
    (from ``start`` to ``end``); empty where no block ran in the phase."""
    marks = [(t, i) for t, i in capture.block_marks if start <= t < end]
    if not marks:
        return {}
    first = [t for t, i in marks if i == 0]
    last = [t for t, i in marks if i == capture.depth - 1]
    if not first or not last:
        return {}
    return {"before": result.peak_between(start, marks[0][0]),
            "first block": result.peak_between(min(first), max(first)),
            "last block": result.peak_between(min(last), max(last)),
            "after": result.peak_between(marks[-1][0], end)}


def _rows(composition: dict[tuple[str, str], int]) -> list[Row]:
    return [Row(c, comp, v, "allocator") for (c, comp), v in sorted(composition.items())]


def _weight_rows(components: dict[torch.Tensor, str]) -> list[Row]:
    """Bytes of ``weights`` by component (``param`` alone, 0 bytes, where nothing was told)."""
    by_component: dict[str, list[torch.Tensor]] = defaultdict(list)
    for tensor, component in components.items():
        by_component[component].append(tensor)
    order = [c for c in WEIGHT_COMPONENTS if c in by_component] + sorted(set(by_component) - set(WEIGHT_COMPONENTS))
    return [Row("weights", c, unique_bytes(by_component[c])) for c in order] or [Row("weights", "param", 0)]


def _parameter_table(names: dict[torch.Tensor, str], state: list[StateTensor],
                     components: dict[torch.Tensor, str]) -> list[ParameterState]:
    """Optimizer state per parameter, largest first, with each parameter's ``weights`` component."""
    component_of = {name: components.get(p, "param") for p, name in names.items()}
    per_param: dict[str, list[StateTensor]] = defaultdict(list)
    for item in state:
        per_param[item.param_name].append(item)
    factored = any(item.role == "factor" for item in state)
    shapes = {name: local(p) for p, name in names.items()}  # a sharded parameter: this rank's shard
    table = []
    for name, items in per_param.items():
        param = shapes.get(name)
        by_role: dict[str, int] = defaultdict(int)
        by_key: dict[str, int] = defaultdict(int)
        for item in items:
            by_role[item.role] += item.storage_bytes
            by_key[item.path] += item.storage_bytes
        roles = {item.path: item.role for item in items}
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
                roles=roles,
                component=component_of.get(name, "param"),
            )
        )
    return sorted(table, key=lambda row: -row.state_bytes)


def _last_phases(result: Replay) -> dict[str, dict]:
    last_step = max((p["step"] for p in result.phase_peaks if p["phase"] in PHASES), default=0)
    return {p["phase"]: p for p in result.phase_peaks if p["step"] == last_step and p["phase"] in PHASES}


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
