"""Run instrumented training steps for one (model, optimizer, settings) and build its run record.

The same code path serves CPU and CUDA; only the tracker differs. Phases are marked on the
tracker's clock after a device synchronize, identities (parameters, gradients, optimizer state,
saved activations, inputs) are told to the capture, and one replay attributes every byte
(``memprof.measure.attribution``). One rank of a distributed run is the same path: a
``memprof.strategies.base.Strategy`` wraps the model and builds the optimizer.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Any, Callable

import torch

from memprof.errors import UsageError, describe
from memprof.measure import checkpointing, environment, reserved, snapshot
from memprof.measure.attribution import Capture, attribute, weight_components
from memprof.measure.communicators import add_communicator_rows
from memprof.measure.state import walk_state
from memprof.measure.trackers import CpuTracker, CudaTracker, FakeTracker
from memprof.models.base import ModelOptions
from memprof.optim import protocol
from memprof.optim.registry import build_optimizer, parse_spec
from memprof.record import Peaks, RunRecord
from memprof.settings import Settings
from memprof.strategies import Strategy

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}
trained_here = False
"""Whether this process has run a training step (autograd's threads started: it cannot fork another)."""


def measure(settings: Settings, strategy: Strategy | None = None) -> RunRecord:
    """Measure one optimizer on one model in this process (on fake tensors when ``settings.estimate``);
    ``strategy``: how this rank shares the model with the others (default: it does not)."""
    from memprof.models import build_model, parameter_count

    global trained_here
    trained_here = True
    strategy = strategy or Strategy()

    device = torch.device(settings.device)
    spec = parse_spec(settings.spec)
    real_cuda = device.type == "cuda" and not settings.estimate
    nvml_before = environment.nvml_device_used() if real_cuda else {}
    if real_cuda and settings.alloc_conf is not None:
        torch.cuda.memory._set_allocator_settings(settings.alloc_conf)
    tracker = _tracker(settings, device)
    autocast = _mixed_precision(settings, device)
    capture = Capture(tracker)
    record = RunRecord(settings=settings, environment={})
    torch.manual_seed(settings.seed)
    with _fake_mode(settings), tracker, strategy.watch(capture):
        capture.mark("warmup", 0)
        _warm_up_libraries(device, tracker, settings)
        capture.mark("setup", 0)
        options = ModelOptions.of(settings)
        built = build_model(settings.model, options, device=_build_device(settings, device),
                            fake=settings.estimate, weights_on_meta=strategy.builds_on_meta)
        record.n_params = parameter_count(built.model)  # before a strategy partitions them
        record.notes += built.notes
        applied = checkpointing.apply(built.model, settings.checkpointing, capture, settings.model)
        record.notes += [applied] if applied else []
        model, batch = strategy.prepare(built.model), built.batch
        if options.blocks is not None:  # a depth probe's (memprof.measure.depth)
            capture.watch_blocks(model, options.blocks)
        analytic = settings.estimate and spec.entry.requires == "cuda"
        optimizer = build_optimizer(spec, model, analytic=True) if analytic else strategy.make_optimizer(spec, model)
        local = strategy.local_optimizer(optimizer)
        names = checkpointing.clean_names(strategy.held_parameters(model))
        params = list(names)
        buffers = list(model.buffers())
        inputs = [t for t in batch.values() if isinstance(t, torch.Tensor)]
        tracker.adopt([*params, *buffers, *inputs])
        record.model_config = built.config
        record.gradient_component = protocol.gradient_component(optimizer)
        capture.weights(weight_components(model, names))
        capture.buffers(buffers)
        capture.inputs(inputs)
        roles = spec.entry.state_roles()
        try:
            for step in range(1, settings.steps + 1):
                _accumulate(settings, step, capture=capture, tracker=tracker, strategy=strategy, optimizer=optimizer,
                            loss_of=lambda: built.loss(model, batch), autocast=autocast, record=record)
                capture.mark("step", step)
                capture.gradients(strategy.gradients(params), record.gradient_component)
                start = time.perf_counter()
                optimizer.step()
                capture.phase_ms["step"].append(_elapsed_ms(start, tracker))
                capture.optimizer_state(walk_state(local, names, roles))
                record.telemetry.append(protocol.telemetry(local, names))
        except torch.OutOfMemoryError:
            record.status, record.failure = "oom", f"OOM in {_where(capture, settings)}"
        except UsageError:  # the settings cannot train this model (memprof.models' checks)
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a crash is a result: its row says where and why
            why = describe(exc, exit_as_call=False)
            record.status, record.failure = "failed", f"failed in {_where(capture, settings)}: {why}"
        capture.mark("end", settings.steps)
        protocol.release(optimizer)
        state = walk_state(local, names, roles)
        record.notes += strategy.notes(model, local)
        gradients = strategy.gradients(params)
        record.hyperparameters = {k: v for k, v in optimizer.defaults.items() if _plain(v)}
        record.inferred_roles = spec.inferred_roles or any(s.inferred for s in state)
        device_peaks = read_device_peaks(device, nvml_before) if real_cuda else None
        if settings.snapshot and isinstance(tracker, CudaTracker):
            tracker.keep_snapshot(snapshot.snapshot_file(settings))
    record.environment = environment.collect(device if real_cuda else torch.device("cpu"))
    if real_cuda:
        record.environment["allocator_config"] = reserved.allocator_settings(settings)
    if getattr(tracker, "dropped", False):
        record.status = "failed"
        record.failure = f"allocator history overflowed ({tracker.max_entries} entries); measure fewer --steps"
    if device_peaks is not None:
        device_peaks.exact_blocks = tracker.exact_blocks
    attribute(record, capture, tracker.allocations, names, buffers, inputs, gradients, state, device_peaks,
              estimated_driver=_gpu(settings).driver if settings.estimate and device.type == "cuda" else None)
    add_communicator_rows(record, strategy.communicators)
    if settings.snapshot and not isinstance(tracker, CudaTracker):  # allocations have their categories now
        snapshot.write(snapshot.snapshot_file(settings), tracker.allocations, capture.marks)
    if isinstance(tracker, CudaTracker):
        record.phase_peaks = reserved.phase_reserved(record.phase_peaks, capture.marks, tracker.reserved)
    if isinstance(tracker, FakeTracker) and device.type == "cuda":
        _simulate_allocator(record, tracker, capture, settings)
    if isinstance(tracker, FakeTracker):
        _describe_estimate(record, tracker, settings)
        if analytic:
            record.notes.append(f"analytic: state laid out as {spec.entry.source} documents it "
                                "(docs/baselines.md); the step transient is not the library's")
    return record


def _accumulate(settings: Settings, step: int, *, capture: Capture, tracker, strategy: Strategy, optimizer,
                loss_of: Callable[[], torch.Tensor], autocast: contextlib.AbstractContextManager,
                record: RunRecord) -> None:
    """The forward and backward passes of one optimizer step: ``settings.grad_accum`` micro-batches (the same
    batch each time: the same shapes), each loss divided by their number, the gradients accumulating. Keeps no
    references of its own to gradients or state between phases: holding them would change what is live and
    when it is freed."""
    count = settings.grad_accum
    for micro in range(count):
        capture.mark("forward", step, micro)
        start = time.perf_counter()
        if micro == 0:
            optimizer.zero_grad()
        with strategy.micro_batch(last=micro == count - 1):
            with capture.saved_tensor_hooks(), autocast:
                loss = protocol.scale_loss(optimizer, loss_of())
            capture.mark("backward", step, micro)
            capture.phase_ms["forward"].append(_elapsed_ms(start, tracker))
            start = time.perf_counter()
            strategy.backward(loss if count == 1 else loss / count)
        _note_non_finite(record, loss, step)
        del loss
        capture.phase_ms["backward"].append(_elapsed_ms(start, tracker))


def _where(capture: Capture, settings: Settings) -> str:
    """Where the steps stopped: "backward (step 2)", or with gradient accumulation "(step 2, micro-batch 1)"."""
    mark = capture.marks[-1]
    return f"{mark.phase} (step {mark.step}{f', micro-batch {mark.micro}' if settings.grad_accum > 1 else ''})"


def _tracker(settings: Settings, device: torch.device) -> CpuTracker | CudaTracker:
    if settings.estimate:
        return FakeTracker(device, config=reserved.config(settings), gpu=_gpu(settings) if device.type == "cuda" else None)
    if device.type == "cuda":
        # With --snapshot every entry carries Python frames: keep the history short enough to load.
        entries = {"stacks": True, "max_entries": 200_000} if settings.snapshot else {}
        return CudaTracker(device, config=reserved.config(settings), **entries)
    return CpuTracker()


def _simulate_allocator(record: RunRecord, tracker: FakeTracker, capture: Capture, settings: Settings) -> None:
    """An estimate's caching allocator, simulated on its stream, against its budget."""
    from memprof.gpus import budget

    gpu = _gpu(settings)
    reserved.simulate(record, tracker.allocations, capture.marks, settings, device_total=gpu.capacity,
                      outside=gpu.driver, budget=budget(settings))


def _mixed_precision(settings: Settings, device: torch.device) -> contextlib.AbstractContextManager:
    """``--amp``: the forward's autocast as the target device runs it, or a UsageError where it cannot take
    effect (torch disables autocast with only a warning). A CUDA estimate on fake CPU tensors runs CUDA's op
    lists and casts through the CPU key (``memprof.measure.cuda_autocast``)."""
    if not settings.amp:
        return contextlib.nullcontext()
    dtype, where = AMP[settings.amp], _build_device(settings, device).type
    if where != device.type:
        from memprof.measure.cuda_autocast import CudaAutocast

        return CudaAutocast(dtype)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            region = torch.autocast(where, dtype=dtype)
        why = None if region._enabled else str(caught[-1].message) if caught else "torch disabled autocast"
    except RuntimeError as exc:  # a GPU without bfloat16 (before sm80)
        why = str(exc)
    if why:
        other = "fp16" if settings.amp == "bf16" else "bf16"
        raise UsageError(f"--amp {settings.amp} cannot take effect on {where}: {why.strip().splitlines()[0]} "
                         f"(try --amp {other}, or no --amp)")
    return region


def _build_device(settings: Settings, device: torch.device) -> torch.device:
    """Where the model lives. An estimate for CUDA runs on fake CUDA tensors only where a GPU is
    present: without one, torch's autograd engine refuses a backward pass on them (it checks the
    device's primary context), so the fake tensors are CPU tensors and the CUDA target shows only
    in the allocator's rounding, workspace and context."""
    if settings.estimate and device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device


def _fake_mode(settings: Settings) -> contextlib.AbstractContextManager:
    """Fake tensors for an estimate: every op runs its shape function; nothing is allocated."""
    if not settings.estimate:
        return contextlib.nullcontext()
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memprof.measure.cuda_choices import masks_read_as_on_real_data
    from memprof.measure.fake_kernels import fake_kernels_as_real

    stack = contextlib.ExitStack()
    stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
    stack.enter_context(masks_read_as_on_real_data())
    stack.enter_context(fake_kernels_as_real())
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        from memprof.measure.cuda_choices import like_cuda
        from memprof.optim.adapters import resolving_for

        stack.enter_context(resolving_for("cuda"))
        stack.enter_context(like_cuda())
    return stack


def _describe_estimate(record: RunRecord, tracker: FakeTracker, settings: Settings) -> None:
    """Say how an estimate's figures were obtained; it has no timings."""
    record.timings_ms = {}
    target = tracker.target.type
    how = ["fake tensors (FakeTensorMode), nothing allocated"]
    if target == "cuda" and not torch.cuda.is_available():
        how.append("fake CPU tensors with a CUDA run's kernel choices (memory-efficient/flash attention, "
                   "fused dropout, torch.optim's foreach default): torch's autograd refuses backward on fake CUDA tensors "
                   "without a GPU")
        if settings.amp:
            how.append(f"--amp {settings.amp} cast as CUDA autocast casts (its op lists and policies, "
                       "ATen/autocast_mode.h), run through the CPU autocast key")
    if target == "cuda":
        gpu = _gpu(settings)
        how.append("each allocation rounded to the caching allocator's 512-B blocks; its reserved memory "
                   "simulated by its rules (memprof.allocator) with the settings "
                   f"{record.environment.get('allocator_config') or '(torch defaults)'!r}")
        how.append(f"library workspace {gpu.workspace} B and CUDA context {gpu.driver} B for {gpu.label}: "
                   f"{gpu.source}")
        how.append(f"the CUDA reduction kernel's global staging after each sum/mean/norm/var (ATen/native/cuda/"
                   f"Reduce.cuh) for {gpu.sm_count} SMs x {gpu.threads_per_sm} threads: {gpu.sm_source}")
        record.environment.update(gpu=gpu.label, device="cuda (estimated)")
    if tracker.host_reads:
        how.append(f"{tracker.host_reads} host read(s) of tensor values (.item()/.tolist()) answered with "
                   f"{tracker.placeholder}: choices that depend on data follow that value")
    record.environment["estimate"] = "; ".join(how)


def _gpu(settings: Settings):
    """The GPU an estimate is for (the H100, the one measured, when none is named)."""
    from memprof.gpus import DEFAULT_GPU, GPUS

    return GPUS[settings.target_gpu or DEFAULT_GPU]


def _note_non_finite(record: RunRecord, loss: torch.Tensor, step: int) -> None:
    """Note the first step whose loss is NaN or infinite (a fake tensor has no value to read)."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(loss) or any(note.startswith("loss became") for note in record.notes):
        return
    value = loss.item()  # a host copy: nothing allocated on the device
    if not math.isfinite(value):
        record.notes.append(f"loss became {value} at step {step}")


def _warm_up_libraries(device: torch.device, tracker: CpuTracker | CudaTracker, settings: Settings) -> None:
    """Create cuBLAS/cuDNN handles and workspaces before anything is attributed (an estimate takes
    the workspace from the GPU table instead)."""
    if device.type != "cuda":
        return
    if isinstance(tracker, FakeTracker):
        tracker.reserve(_gpu(settings).workspace, start=tracker.now())
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




def read_device_peaks(device: torch.device, nvml_before: dict[str, int]) -> Peaks | None:
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
