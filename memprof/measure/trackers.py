"""Two sources of allocation events on one clock.

* ``CpuTracker``: a TorchDispatchMode that sees every op output; a new storage is an
  allocation, and a weakref finalizer on the storage marks its free (as
  ``torch.distributed._tools.mem_tracker`` does). Storages the run did not create
  (parameters built before the capture) are declared with ``adopt``. A storage resized in place
  (``UntypedStorage.resize_``, which no dispatch mode sees: FSDP2 frees and re-allocates its
  unsharded parameters so) is freed and allocated anew. Ops on a tensor subclass (a DTensor) are
  left to the subclass, so the tracker sees the ops on its local tensors.
* ``CudaTracker``: the caching allocator's own history (``_record_memory_history`` with no
  stack capture): block address, block size and a host timestamp per alloc/free. The
  replayed total equals ``torch.cuda.memory_allocated`` at every instant.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import weakref
from typing import Iterable, Iterator

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    is_traceable_wrapper_subclass_type,
)
from torch.utils._pytree import tree_flatten

from memprof.allocator.config import AllocatorConfig
from memprof.allocator.simulator import block_for, round_size
from memprof.gpus import Gpu
from memprof.measure.cuda_reductions import REDUCTIONS, stage
from memprof.measure.events import Allocation
from memprof.measure.reserved import reserved_from_trace
from memprof.measure.state import storage_tensors

_NO_STORAGE_OUT = frozenset({torch.ops.prim.device.default, torch.ops.aten.sym_size.default,
                             torch.ops.aten.sym_stride.default, torch.ops.aten.sym_numel.default,
                             torch.ops.aten.sym_storage_offset.default, torch.ops.aten.is_contiguous.default})
"""Ops that answer a tensor's metadata (a fake tensor's ``.device`` dispatches one): nothing to track."""


class CpuTracker(TorchDispatchMode):
    """Sees every op output on CPU; the clock is a sequence number."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = itertools.count(1)
        self.allocations: list[Allocation] = []
        self._live: dict[int, Allocation] = {}
        # A storage first met through an in-place or view op existed before the capture (live all
        # along) unless this is set: in a distributed run gloo makes buffers in its own threads, where
        # no dispatch mode sees them, and they reach the run through views.
        self.unseen_are_new = False

    def now(self) -> float:
        return float(next(self._clock))

    def sync(self) -> None:
        """Nothing to wait for on CPU."""

    def key(self, storage: torch.UntypedStorage) -> int:
        """The identity of a storage in the event stream (its address)."""
        return storage.data_ptr()

    def block_bytes(self, nbytes: int) -> int:
        """Bytes an allocation of ``nbytes`` is charged (the storage's own size on CPU)."""
        return nbytes

    def adopt(self, tensors: Iterable[torch.Tensor]) -> None:
        """Declare storages that exist already (the model's, the batch's) as live from time 0."""
        for tensor in (t for outer in tensors for t in storage_tensors(outer)):
            self._track(tensor.untyped_storage(), start=0.0)

    def __enter__(self) -> "CpuTracker":
        original = torch.UntypedStorage.resize_

        def resize_(storage: torch.UntypedStorage, nbytes: int):
            old = self._live.get(self.key(storage)) if storage.nbytes() else None
            out = original(storage, nbytes)
            if old is not None:
                self._free(old.ptr, old)
            self._track(storage, self.now())
            return out

        self._patches = contextlib.ExitStack()
        self._patches.enter_context(replaced(torch.UntypedStorage, "resize_", resize_))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        self._patches.close()
        super().__exit__(*exc)

    def _track(self, storage: torch.UntypedStorage, start: float, origin: object = None) -> None:
        ptr, nbytes = self.key(storage), storage.nbytes()
        if nbytes == 0 or ptr in self._live:
            return
        alloc = Allocation(ptr=ptr, nbytes=self.block_bytes(nbytes), start=start, origin=origin)
        self._live[ptr] = alloc
        self.allocations.append(alloc)
        weakref.finalize(storage, self._free, ptr, alloc)

    def _free(self, ptr: int, alloc: Allocation) -> None:
        if alloc.end is not None:
            return  # freed already by a resize; this is the storage object's death
        alloc.end = self.now()
        if self._live.get(ptr) is alloc:
            del self._live[ptr]

    def _sees(self, tensor: torch.Tensor) -> bool:
        # Not the fake tensors of DTensor's sharding propagation: they allocate nothing.
        return tensor.device.type == "cpu" and not is_fake(tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _NO_STORAGE_OUT:
            return func(*args, **(kwargs or {}))
        if any(is_traceable_wrapper_subclass_type(t) for t in types):
            return NotImplemented  # the subclass runs and its ops on plain tensors come back here
        out = func(*args, **(kwargs or {}))
        for item in (out,) if isinstance(out, torch.Tensor) else tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor) and self._sees(item) and item.layout == torch.strided:
                try:
                    storage = item.untyped_storage()
                except (RuntimeError, NotImplementedError):
                    continue  # a wrapper subclass (torchao's quantized state): its inner tensors are tracked
                if self.key(storage) not in self._live:
                    # An output storage we have not seen: a new allocation, unless the op mutated
                    # or viewed a tensor that existed before the capture (then it was live all along).
                    existed = (func._schema.is_mutable or func.is_view) and not self.unseen_are_new
                    start = 0.0 if existed else self.now()
                    self._track(storage, start, origin=func)
        return out

    def memory_allocated(self) -> int:
        return sum(a.nbytes for a in self._live.values())


class FakeTracker(CpuTracker):
    """Sees every op output on fake tensors (``FakeTensorMode``): nothing is allocated.

    Storages are told apart by identity (a fake storage has no address). For a CUDA target each
    allocation is charged the caching allocator's rounding of its request (``config``: 512 B, or a
    power-of-two division); which block it would get is the simulation's (``memprof.measure.reserved``). A read of a fake value on the
    host (``.item()``, ``.tolist()``) has no answer: it gets ``placeholder`` and is counted in
    ``host_reads``, so that data-dependent choices are reported as such.
    """

    def __init__(self, target: torch.device, placeholder: float = 1.0, config: AllocatorConfig | None = None,
                 gpu: Gpu | None = None) -> None:
        super().__init__()
        self.target = target
        self.gpu = gpu  # a CUDA target's: its reductions stage global memory (memprof.measure.cuda_reductions)
        self.config = config or AllocatorConfig()
        self.placeholder = placeholder
        self.host_reads = 0
        self._key_attribute = f"_memprof_key_{id(self)}"  # one tracker's numbering, not another's
        self._next_id = itertools.count(1)
        self.paused = False  # DTensor's sharding propagation is running: its tensors are not the run's

    def __enter__(self) -> "FakeTracker":
        super().__enter__()
        self._patches.enter_context(_outside_sharding_propagation(self))
        return self

    def key(self, storage: torch.UntypedStorage) -> int:
        # An attribute of the storage's Python object, which lives as long as the storage does (the
        # weakref finalizer that marks the free relies on the same).
        key = getattr(storage, self._key_attribute, None)
        if key is None:
            key = next(self._next_id)
            setattr(storage, self._key_attribute, key)
        return key

    def block_bytes(self, nbytes: int) -> int:
        return round_size(nbytes, self.config) if self.target.type == "cuda" else nbytes

    def reserve(self, nbytes: int, start: float = 0.0) -> None:
        """An allocation the model does not make (the GPU's library workspace), live from ``start``."""
        if nbytes:
            self.allocations.append(Allocation(ptr=-len(self.allocations) - 1, nbytes=nbytes, start=start))

    def _sees(self, tensor: torch.Tensor) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.paused:
            return func(*args, **(kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_reads += 1
            dtype = args[0].dtype
            return bool(self.placeholder) if dtype == torch.bool else (
                self.placeholder if dtype.is_floating_point else int(self.placeholder))
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.gpu is not None and func in REDUCTIONS:
            stage(self, func, args, kwargs or {}, out, self.gpu)
        return out


@contextlib.contextmanager
def replaced(owner: object, name: str, replacement: object) -> Iterator[None]:
    """``owner.name`` is ``replacement`` for the duration."""
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _outside_sharding_propagation(tracker: FakeTracker) -> contextlib.AbstractContextManager:
    """Pause ``tracker`` while DTensor derives an op's global output shape: it runs the op on fake tensors
    of the global shape under the active fake mode (ours), which a real run never allocates. Nothing to
    do where DTensor was never imported."""
    import sys

    module = sys.modules.get("torch.distributed.tensor._sharding_prop")
    propagator = getattr(module, "ShardingPropagator", None)
    original = getattr(propagator, "_propagate_tensor_meta_non_cached", None)
    if original is None:
        return contextlib.nullcontext()

    def propagate(self, *args, **kwargs):
        paused, tracker.paused = tracker.paused, True
        try:
            return original(self, *args, **kwargs)
        finally:
            tracker.paused = paused

    return replaced(propagator, "_propagate_tensor_meta_non_cached", propagate)


class CudaTracker:
    """Reads the CUDA caching allocator's history; the clock is host microseconds."""

    def __init__(self, device: torch.device, max_entries: int = 2_000_000, stacks: bool = False,
                 existing: bool = False, config: AllocatorConfig | None = None) -> None:
        self.device = device
        self.config = config or AllocatorConfig()
        self.max_entries = max_entries
        self.stacks = stacks
        # Blocks allocated before the history started count as live from time 0 (a tracked loop's model,
        # batch and state, made before ``memprof.track``); the runner's history starts before anything.
        self.existing = existing
        self._segments_before: list[dict] = []
        self.allocations: list[Allocation] = []
        self.dropped = False
        self.exact_blocks = True
        self.reserved_at_start = 0
        self.reserved: list[tuple[float, int]] = []  # (time, bytes reserved after each segment event)

    def now(self) -> float:
        return float(time.time_ns() // 1000)

    def key(self, storage: torch.UntypedStorage) -> int:
        """The identity of a storage in the event stream: its address, as the allocator records it."""
        return storage.data_ptr()

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def adopt(self, tensors: Iterable[torch.Tensor]) -> None:
        """Nothing to do: the history starts before the model is built."""

    def __enter__(self) -> "CudaTracker":
        self.reserved_at_start = torch.cuda.memory_reserved(self.device)
        torch.cuda.memory._record_memory_history(
            enabled="all",
            context="all" if self.stacks else None,
            stacks="python",
            max_entries=self.max_entries,
            device=self.device,
        )
        if self.existing:
            index = self._index()
            self._segments_before = [s for s in torch.cuda.memory._snapshot(self.device)["segments"]
                                     if s.get("device", index) == index]
        return self

    def __exit__(self, *exc) -> None:
        snapshot = torch.cuda.memory._snapshot(self.device)
        torch.cuda.memory._record_memory_history(enabled=None, device=self.device)
        self.allocations = self._allocations_from(snapshot)

    def keep_snapshot(self, path: str) -> None:
        torch.cuda.memory._dump_snapshot(path)

    def _index(self) -> int:
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _allocations_from(self, snapshot: dict) -> list[Allocation]:
        trace = snapshot["device_traces"][self._index()]
        self.dropped = len(trace) >= self.max_entries
        # Expandable segments map ranges instead of allocating segments: a free run's extent may reach into
        # the next mapped range, which the replay below does not follow, so it is then approximate.
        self.exact_blocks = not any(e["action"] in ("segment_map", "segment_unmap") for e in trace)
        self.reserved = [(t, self.reserved_at_start + r) for t, r in reserved_from_trace(trace)]
        return blocks_from_trace(trace, self.config, self._segments_before)

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)


def blocks_from_trace(trace: list[dict], config: AllocatorConfig | None = None,
                      segments_before: list[dict] = ()) -> list[Allocation]:
    """Allocations with their real block sizes, replaying segment and block events in order: the history
    records each *requested* size while ``allocated_bytes`` adds block sizes, which the allocator's rules
    (``memprof.allocator.simulator.block_for``, with the run's settings ``config``) give from the free run
    each block was carved from. The blocks of ``segments_before`` (a snapshot's segments, taken as the
    history started) are live from time 0.

    A block's free extent is the gap from its address to the next block in use (or the end of
    its segment); freed neighbours have coalesced. Blocks count as allocated from ``alloc`` to
    ``free_requested`` (when the counter drops) and occupy address space until ``free_completed``.
    """
    import bisect

    segments: dict[int, int] = {}  # start -> size
    segment_starts: list[int] = []
    occupied: list[int] = []  # sorted addresses of blocks not yet completely freed
    live: dict[int, Allocation] = {}
    out: list[Allocation] = []
    for segment in segments_before:
        segments[segment["address"]] = segment["total_size"]
        bisect.insort(segment_starts, segment["address"])
        addr = segment["address"]
        for block in segment["blocks"]:
            addr = block.get("address", addr)
            if block["state"] != "inactive":
                bisect.insort(occupied, addr)
            if block["state"] == "active_allocated":
                live[addr] = Allocation(ptr=addr, nbytes=block["size"], start=0.0)
                out.append(live[addr])
            addr += block["size"]
    for entry in trace:
        action, addr = entry["action"], entry["addr"]
        if action == "segment_alloc":
            segments[addr] = entry["size"]
            bisect.insort(segment_starts, addr)
        elif action == "segment_free":
            segments.pop(addr, None)
            i = bisect.bisect_left(segment_starts, addr)
            if i < len(segment_starts) and segment_starts[i] == addr:
                segment_starts.pop(i)
        elif action == "alloc":
            extent = None
            i = bisect.bisect_right(segment_starts, addr) - 1
            if i >= 0:
                seg_end = segment_starts[i] + segments[segment_starts[i]]
                j = bisect.bisect_right(occupied, addr)
                next_used = occupied[j] if j < len(occupied) else seg_end
                extent = min(next_used, seg_end) - addr
            nbytes = block_for(entry["size"], extent, config or AllocatorConfig())
            alloc = Allocation(ptr=addr, nbytes=nbytes, start=float(entry["time_us"]))
            live[addr] = alloc
            bisect.insort(occupied, addr)
            out.append(alloc)
        elif action == "free_requested":
            alloc = live.pop(addr, None)
            if alloc is not None:
                alloc.end = float(entry["time_us"])
        elif action == "free_completed":
            i = bisect.bisect_left(occupied, addr)
            if i < len(occupied) and occupied[i] == addr:
                occupied.pop(i)
    return out
