"""How one rank shares the model with the others: the runner's only hook for distributed training.

The runner (``memprof.measure.runner.measure``) calls, in order: ``watch(capture)`` around the whole
capture, ``prepare(model)`` after the model is built (on the meta device where ``builds_on_meta`` says
so: ``prepare`` then materialises this rank's share), ``make_optimizer(spec, model)`` after that,
``held_parameters(model)`` for the tensors that are this rank's weights, ``local_optimizer(optimizer)``
for the optimizer whose state this rank holds; in each step ``optimizer.zero_grad()``, the forward,
``backward(loss)`` (``loss.backward()`` unless the strategy's engine runs it) and ``optimizer.step()``,
with ``gradients(params)`` after the backward and at the end; ``notes`` last. A strategy whose engine
owns the loop (DeepSpeed: ``engine.backward``, ``engine.step``) answers ``make_optimizer`` with an
object whose ``zero_grad``/``step`` drive the engine, so the runner has no branch for it.
``Strategy`` itself is a single process; ``for_settings`` picks the one ``--parallel`` names.
Kept free of torch.distributed imports until a distributed strategy is built.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import TYPE_CHECKING, ContextManager

from memprof.errors import UsageError

if TYPE_CHECKING:
    import torch

    from memprof.measure.attribution import Capture
    from memprof.optim.registry import OptimizerSpec
    from memprof.settings import Settings


class Strategy:
    """A single process: the model as built, the registry's optimizer, no collectives."""

    name = "none"
    builds_on_meta = False
    """Whether the runner builds the model's parameters and buffers on the meta device (no memory) and
    ``prepare`` materialises what this rank holds; else the model is built whole on the device."""
    whole_model_rule: str | None = None
    """What a rule over all the parameters decides of this rank's share, where one does: its figures then change
    with the depth other than block by block, and a deep model's estimate is made op by op, not extrapolated
    from shallow probes (``memprof.measure.depth``)."""

    def watch(self, capture: "Capture") -> ContextManager:
        """Entered around the capture (the model is built inside it)."""
        return contextlib.nullcontext()

    def prepare(self, model: "torch.nn.Module") -> "torch.nn.Module":
        """The model this rank trains (wrapped or sharded), built before the optimizer."""
        return model

    def make_optimizer(self, spec: "OptimizerSpec", model: "torch.nn.Module") -> "torch.optim.Optimizer":
        from memprof.optim.registry import build_optimizer

        return build_optimizer(spec, model)

    def held_parameters(self, model: "torch.nn.Module") -> dict["torch.Tensor", str]:
        """This rank's weights, by parameter name: the parameters themselves (DeepSpeed ZeRO-3: its partitions)."""
        return {p: n for n, p in model.named_parameters()}

    def local_optimizer(self, optimizer: "torch.optim.Optimizer") -> "torch.optim.Optimizer":
        """The optimizer whose ``state`` this rank holds (ZeRO wraps one)."""
        return optimizer

    def backward(self, loss: "torch.Tensor") -> None:
        """Back-propagate one step's loss."""
        loss.backward()

    def gradients(self, params: list["torch.Tensor"]) -> list["torch.Tensor"]:
        """The gradient tensors this rank holds now: each parameter's ``grad`` (DeepSpeed: its flat buffers)."""
        return [p.grad for p in params if p.grad is not None]

    def notes(self, model: "torch.nn.Module", optimizer: "torch.optim.Optimizer") -> list[str]:
        """What the record should say about how the optimizer saw the parameters."""
        return []


class _Distributed(Strategy):
    """A rank of an initialised default process group; collectives' buffers are tagged."""

    def __init__(self, device: "torch.device") -> None:
        import torch.distributed as dist

        self.device = device
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.simulated = dist.get_backend() == "fake"  # memprof.distributed.simulate: one rank, no peers

    def watch(self, capture: "Capture") -> ContextManager:
        return capture.collectives()

    def notes(self, model: "torch.nn.Module", optimizer: "torch.optim.Optimizer") -> list[str]:
        return [structure(model, optimizer)]


class DDP(_Distributed):
    """``DistributedDataParallel``: every rank holds everything; gradients are all-reduced in buckets."""

    name = "ddp"

    def prepare(self, model: "torch.nn.Module") -> "torch.nn.Module":
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # A simulation skips the initial check and broadcast of the parameters: C++ code that reads
        # values, which fake tensors do not have (setup only: its buffers are freed before step 1).
        wrapped = DistributedDataParallel(model, device_ids=ids, init_sync=not self.simulated)
        if self.simulated:
            wrapped.register_comm_hook(None, _simulated_allreduce)
            wrapped.reducer = _SimulatedReducer(wrapped.reducer)
        return wrapped


class FSDP2(_Distributed):
    """``fully_shard`` on each transformer block (a Hugging Face model's ``_no_split_modules``), else on
    each leaf module with parameters, then on the root; a 1-D device mesh over all ranks. Parameters and
    gradients become DTensors sharded on dim 0 (``torch.chunk``: uneven, padded).

    As at scale (torchtitan), the model is built on the meta device, sharded there, and only this rank's
    shards are materialised (``to_empty``) and initialised (``initialise_materialised``): no rank ever
    holds the whole model.

    The optimizer steps each parameter's local shard (``LocalShards``), so every optimizer runs, as it
    would on plain tensors: on this rank's rows. Element-wise ones (Adam, Lion…) compute exactly what
    they would on the whole parameter; a factored or matrix optimizer factors the shard, not the matrix
    (docs/optimizers.md, "Under FSDP2")."""

    name = "fsdp2"
    builds_on_meta = True

    def __init__(self, device: "torch.device") -> None:
        import torch.distributed.fsdp  # noqa: F401 - defines torch.ops.fsdp, whose copy-out the capture tags
        from torch.distributed.device_mesh import init_device_mesh

        super().__init__(device)
        # Built here, before the capture: a simulation's capture runs on fake tensors, where the mesh's
        # rank lookup (``nonzero`` on the rank tensor) has no answer.
        self.mesh = init_device_mesh(device.type, (self.world_size,))

    def prepare(self, model: "torch.nn.Module") -> "torch.nn.Module":
        from torch.distributed.fsdp import fully_shard

        from memprof.models.base import outside_dispatch_modes

        with outside_dispatch_modes():  # sharding a meta model: nothing allocated, nothing for a tracker
            for module in shard_units(model):
                fully_shard(module, mesh=self.mesh)
            fully_shard(model, mesh=self.mesh)
        model.to_empty(device=self.device)  # FSDP2 re-pads each local shard into its own storage
        initialise_materialised(model, seed=self.rank)
        return model

    def make_optimizer(self, spec: "OptimizerSpec", model: "torch.nn.Module") -> "torch.optim.Optimizer":
        import torch

        from memprof.optim import protocol
        from memprof.optim.registry import build_optimizer

        with torch.no_grad():  # views of FSDP's sharded storage: the optimizer's updates are the parameters'
            shards = {p: torch.nn.Parameter(p.to_local().detach()) for p in model.parameters() if p.requires_grad}
        # Built on the model with its parameters swapped for their shards, so that an optimizer that
        # groups parameters by module or name (GaLore, Muon's split, Adam-mini) groups the shards.
        swapped = [(m, n, p) for m in model.modules() for n, p in m._parameters.items() if p in shards]
        try:
            for module, name, param in swapped:
                module._parameters[name] = shards[param]
            inner = build_optimizer(spec, model)
        finally:
            for module, name, param in swapped:
                module._parameters[name] = param
        if isinstance(inner, protocol.HoldsHooks):
            inner.remove_hooks()
            raise NotSupported(f"fsdp2: {spec.name} hooks the model's layers, which compute with the gathered "
                               "parameters, while the optimizer steps this rank's shards")
        return LocalShards(inner, list(shards.items()))

    def notes(self, model: "torch.nn.Module", optimizer: "torch.optim.Optimizer") -> list[str]:
        built = ("built on the meta device, sharded, then only this rank's shards materialised and initialised "
                 "(matrices N(0, 0.02), biases 0, other vectors 1; buffers by the model's own initialisers)")
        split = sum(1 for p in model.parameters() if tuple(p.to_local().shape) != tuple(p.shape))
        return [built, f"the optimizer steps this rank's shard of each parameter (Shard(0) rows; {split} of "
                       f"{sum(1 for _ in model.parameters())} parameters split): a factored optimizer factors the shard"]


def _simulated_allreduce(state, bucket):  # unannotated: DDP checks the annotations' objects, not strings
    """DDP's default comm hook (all-reduce the bucket in place, average), answering with the bucket as a
    real process group's future does: a fake process group's future holds None, which DDP rejects."""
    import torch
    import torch.distributed as dist

    buffer = bucket.buffer()
    dist.all_reduce(buffer)
    buffer.div_(dist.get_world_size())
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(buffer)
    return future


class _SimulatedReducer:
    """DDP's reducer without the rebuild of its buckets in step 2's forward: the rebuild broadcasts rank 0's
    bucket order in a tensor that C++ fills, which a fake tensor cannot hold. Rebuilt buckets hold the same
    gradients in another order (the same size caps), so the bytes are the same; the moment both sets are
    live during a real rebuild is not simulated."""

    def __init__(self, reducer) -> None:
        self._reducer = reducer

    def _rebuild_buckets(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self._reducer, name)


class Zero1(DDP):
    """DDP for the gradients, ``torch.distributed.optim.ZeroRedundancyOptimizer`` for the state: each rank
    steps the registry's optimizer on whole parameters assigned to it (greedily, by size) and
    broadcasts them."""

    name = "zero1"
    whole_model_rule = ("ZeroRedundancyOptimizer assigns whole parameters to ranks greedily by size, so which "
                        "blocks a rank holds state for changes with the depth")

    def make_optimizer(self, spec: "OptimizerSpec", model: "torch.nn.Module") -> "torch.optim.Optimizer":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        if spec.entry.params != "parameters":
            given = {"named_parameters": "named parameters", "model": "the model itself"}[spec.entry.params]
            raise NotSupported(f"zero1: {spec.name} is built from {given}; ZeroRedundancyOptimizer hands the "
                               "optimizer parameter groups only")
        optimizer = ZeroRedundancyOptimizer([p for p in model.parameters() if p.requires_grad],
                                            optimizer_class=spec.entry.load(), **{**spec.entry.defaults, **spec.kwargs})
        _refuse_loop_taking(optimizer.optim, f"zero1: {spec.name}", "ZeroRedundancyOptimizer")
        return optimizer

    def local_optimizer(self, optimizer: "torch.optim.Optimizer") -> "torch.optim.Optimizer":
        return optimizer.optim


class LocalShards:
    """An optimizer built on the local shards of DTensor parameters, stepping them.

    Before ``zero_grad`` and ``step`` each shard's ``grad`` is bound to its DTensor gradient's local
    tensor (a view: no copy), so an optimizer that keeps something in the gradient buffer (Alada) keeps
    it in FSDP's sharded gradient. ``state`` is keyed by the DTensor parameters, as the model names
    them; everything else (``param_groups``, ``defaults``, the loop protocol) is the inner optimizer's.
    """

    def __init__(self, inner: "torch.optim.Optimizer", pairs: list[tuple["torch.Tensor", "torch.Tensor"]]) -> None:
        self.inner = inner
        self.pairs = pairs

    def _bind(self) -> None:
        for param, shard in self.pairs:
            shard.grad = None if param.grad is None else param.grad.to_local()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._bind()
        self.inner.zero_grad(set_to_none)
        for param, shard in self.pairs:
            if shard.grad is None:
                param.grad = None

    def step(self, closure=None):
        self._bind()
        return self.inner.step(closure)

    @property
    def state(self) -> dict:
        return {param: self.inner.state[shard] for param, shard in self.pairs if shard in self.inner.state}

    def telemetry(self, names) -> dict[str, float]:
        from memprof.optim import protocol

        return protocol.telemetry(self.inner, {shard: names.get(param, "") for param, shard in self.pairs})

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _refuse_loop_taking(optimizer: "torch.optim.Optimizer", who: str, engine: str) -> None:
    """``NotSupported`` for an optimizer that takes part in the training loop, which ``engine`` never calls."""
    import torch

    from memprof.optim import protocol

    if (isinstance(optimizer, protocol.ScalesLoss) or protocol.gradient_component(optimizer) != "grad"
            or type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad):
        raise NotSupported(f"{who} takes part in the training loop (its own zero_grad/scale_loss, "
                           f"memprof/optim/protocol.py); {engine} calls neither")


class NotSupported(Exception):
    """This optimizer cannot run under this strategy; the message says why (the row's failure)."""


class DeepSpeedZero(_Distributed):
    """DeepSpeed's own engine (``deepspeed.initialize``) at one ZeRO stage, around the registry's optimizer.

    The engine flattens the parameters into one buffer per group, keeps an fp32 master copy of this
    rank's partition and hands the optimizer that flat 1-D partition to step; stage 2 partitions the
    gradients too, stage 3 the parameters as well. The config comes from memprof's settings
    (``ds_config``); DeepSpeed's timers and memory reports (process RSS on CPU) are not used: the
    runner's tracker measures, as for every strategy.
    """

    stage = 0

    def __init__(self, device: "torch.device", settings: "Settings") -> None:
        import deepspeed.ops

        super().__init__(device)
        # DeepSpeed's shared-memory kernel serves only its inference all-reduce, and would be compiled (minutes,
        # with a C++ compiler) on first use: off, so every collective is torch.distributed's (gloo on CPU).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.settings = settings
        self.engine = None
        self.config: dict = {}
        self.capture: "Capture | None" = None

    def watch(self, capture: "Capture") -> ContextManager:
        self.capture = capture
        return super().watch(capture)

    def make_optimizer(self, spec: "OptimizerSpec", model: "torch.nn.Module") -> "EngineSteps":
        import deepspeed

        from memprof.optim import protocol
        from memprof.optim.registry import build_optimizer

        optimizer = build_optimizer(spec, model)
        if isinstance(optimizer, protocol.HoldsHooks):
            optimizer.remove_hooks()
            raise NotSupported(f"{self.settings.parallel}: {spec.name} hooks the model's layers, while DeepSpeed "
                               "hands it flat partitions to step")
        _refuse_loop_taking(optimizer, f"{self.settings.parallel}: {spec.name}", "DeepSpeed's engine")
        self.config = ds_config(self.settings, self.stage, sum(p.numel() for p in model.parameters()))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        return EngineSteps(self.engine, optimizer)

    def held_parameters(self, model: "torch.nn.Module") -> dict["torch.Tensor", str]:
        if self.stage < 3:  # the parameters are views of DeepSpeed's flat buffer, whole on every rank
            return super().held_parameters(model)
        return {p.ds_tensor: n for n, p in model.named_parameters()}  # this rank's partition of each

    def local_optimizer(self, optimizer: "EngineSteps") -> "FlatPartitions":
        zero = self.engine.optimizer
        flat = zero.fp32_partitioned_groups_flat if self.stage == 3 else zero.single_partition_of_fp32_groups
        return FlatPartitions(optimizer.inner, flat)

    def backward(self, loss: "torch.Tensor") -> None:
        self.engine.backward(loss)
        # DeepSpeed's contiguous gradient buckets (ZeRO-3 allocates its bucket up front): what its reduce sums
        buckets = [bucket.buffer for bucket in self.engine.optimizer.ipg_buckets.values()]
        self.capture.collective_buffer([t for b in buckets for t in (b if isinstance(b, list) else [b])],
                                       "gradients", "all-reduce bucket")

    def gradients(self, params: list["torch.Tensor"]) -> list["torch.Tensor"]:
        zero = self.engine.optimizer
        held = [*super().gradients(params), getattr(zero, "grads_in_partition", None),
                getattr(zero, "grad_partitions_flat_buffer", None)]
        for group in (getattr(zero, "averaged_gradients", None) or {}).values():
            held.extend(group if isinstance(group, list) else [group])
        return [t for t in held if t is not None]

    def notes(self, model: "torch.nn.Module", optimizer: "torch.optim.Optimizer") -> list[str]:
        import deepspeed

        zero = self.config["zero_optimization"]
        precision = "bf16" if self.config["bf16"]["enabled"] else "fp32"
        engine = (f"DeepSpeed {deepspeed.__version__} ZeRO-{self.stage} engine ({precision}; buckets of "
                  f"{zero['reduce_bucket_size']:,} elements): an fp32 master copy of this rank's partition is "
                  "optimizer state (master)")
        return [structure(model, optimizer), engine]


class DeepSpeedZero1(DeepSpeedZero):
    name, stage = "deepspeed-zero1", 1


class DeepSpeedZero2(DeepSpeedZero):
    name, stage = "deepspeed-zero2", 2


class DeepSpeedZero3(DeepSpeedZero):
    name, stage = "deepspeed-zero3", 3


DEEPSPEED_BUCKET = 500_000_000
"""DeepSpeed's default reduce/all-gather bucket, in elements; memprof caps it at the model's size."""


def ds_config(settings: "Settings", stage: int, n_params: int) -> dict:
    """DeepSpeed's config for memprof's settings: one micro-batch of ``--batch-size`` per rank, no gradient
    accumulation or clipping, bf16 when ``--dtype bfloat16`` (else fp32), and DeepSpeed's buckets no larger
    than the model (its 5e8-element default would otherwise dwarf a small model: ZeRO-3 allocates one up front)."""
    bucket = min(DEEPSPEED_BUCKET, n_params)
    zero: dict = {"stage": stage, "reduce_bucket_size": bucket}
    if stage < 3:
        zero["allgather_bucket_size"] = bucket
    else:
        zero["stage3_prefetch_bucket_size"] = bucket
    return {"train_micro_batch_size_per_gpu": settings.batch_size, "gradient_accumulation_steps": 1,
            "zero_optimization": zero, "bf16": {"enabled": settings.dtype == "bfloat16"},
            "zero_allow_untested_optimizer": True, "steps_per_print": 2 ** 31, "wall_clock_breakdown": False}


class EngineSteps:
    """The registry's optimizer as the runner sees it under DeepSpeed: ``zero_grad``/``step`` drive the engine
    (which steps the optimizer on its flat partitions); everything else is the optimizer's."""

    def __init__(self, engine, inner: "torch.optim.Optimizer") -> None:
        self.engine = engine
        self.inner = inner

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.zero_grad()

    def step(self, closure=None) -> None:
        self.engine.step()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class FlatPartitions:
    """The optimizer's state as DeepSpeed holds it: keyed by this rank's flat fp32 partitions, each with its
    master copy (the partition itself) under ``"master"`` (``memprof.taxonomy.STRATEGY_STATE_ROLES``)."""

    def __init__(self, inner: "torch.optim.Optimizer", partitions: list["torch.Tensor"]) -> None:
        self.inner = inner
        self.partitions = partitions

    @property
    def param_groups(self) -> list[dict]:
        """One group of the flat partitions (ZeRO-3 hands them to the optimizer only while it steps)."""
        return [{"params": list(self.partitions)}]

    @property
    def state(self) -> dict:
        return {flat: {"master": flat, **self.inner.state.get(flat, {})} for flat in self.partitions}

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


STRATEGIES: dict[str, type[_Distributed]] = {
    "ddp": DDP, "fsdp2": FSDP2, "zero1": Zero1,
    "deepspeed-zero1": DeepSpeedZero1, "deepspeed-zero2": DeepSpeedZero2, "deepspeed-zero3": DeepSpeedZero3,
}


def for_settings(settings: "Settings", device: "torch.device | None" = None) -> Strategy:
    """The strategy ``settings.parallel`` names, for this rank (the default process group is initialised);
    ``device``: where the model lives, when not ``settings.device`` (a simulation's fake CPU tensors)."""
    import torch

    if settings.parallel == "none":
        return Strategy()
    problem = deepspeed_problem(settings)
    if problem:
        raise UsageError(problem)
    device = device or torch.device(settings.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if issubclass(STRATEGIES[settings.parallel], DeepSpeedZero):
        return STRATEGIES[settings.parallel](device, settings)
    return STRATEGIES[settings.parallel](device)


def deepspeed_problem(settings: "Settings") -> str | None:
    """Why ``--parallel deepspeed-zero*`` cannot run with these settings (None when it can, or for the other
    strategies)."""
    parallel = settings.parallel
    if not parallel.startswith("deepspeed"):
        return None
    if importlib.util.find_spec("deepspeed") is None:  # found, not imported: importing it takes seconds
        return f"--parallel {parallel} needs DeepSpeed, which is not installed: pip install deepspeed"
    if settings.estimate:
        return (f"memprof estimate cannot simulate --parallel {parallel}: DeepSpeed's engine needs real tensors "
                "and peers; measure real ranks with memprof compare --nproc N --device cpu")
    if settings.dtype not in ("float32", "bfloat16"):
        return f"--parallel {parallel} runs --dtype float32 or bfloat16 (float16 needs DeepSpeed's loss scaler)"
    return None


def shard_units(model: "torch.nn.Module") -> list["torch.nn.Module"]:
    """The modules ``fully_shard`` wraps before the root: transformer blocks where the model names them
    (``_no_split_modules``), else every leaf module that holds parameters."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    if units:
        return units
    return [m for m in model.modules()
            if m is not model and not any(m.children()) and any(True for _ in m.parameters(recurse=False))]


INIT_STD = 0.02
"""Standard deviation of the normal init of materialised matrices (GPT-2's and LLaMA's initializer_range)."""


def initialise_materialised(model: "torch.nn.Module", seed: int) -> None:
    """Values for a model just materialised with ``to_empty`` (uninitialised memory), finite as a fresh
    build's: each parameter's local shard gets N(0, ``INIT_STD``) if it is a matrix, 0 if it is a bias, 1
    otherwise (norm weights), written in place (no copy, no collective). Buffers are zeroed, then
    re-created by the model's own initialisers where it has them: ``reset_running_stats`` (BatchNorm) and a
    Hugging Face model's ``_init_weights`` on each module that holds buffers (rotary ``inv_freq``, BERT's
    ``position_ids``), run with that module's parameters swapped for their local shards."""
    import torch
    from torch.distributed.tensor import DTensor

    def local(tensor: "torch.Tensor") -> "torch.Tensor":
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    devices = [t.device.index for t in model.parameters() if t.device.type == "cuda"][:1]
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name, param in model.named_parameters():
            shard = local(param)
            if shard.ndim >= 2:
                shard.normal_(0.0, INIT_STD)
            else:
                shard.fill_(0.0 if name.rpartition(".")[2] == "bias" else 1.0)
        for buffer in model.buffers():
            buffer.zero_()
        init_weights = getattr(model, "_init_weights", None)
        for module in model.modules():
            if not any(True for _ in module.buffers(recurse=False)):
                continue
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
            elif init_weights is not None:
                own = dict(module._parameters)
                try:
                    for key, param in own.items():
                        if param is not None:
                            module._parameters[key] = torch.nn.Parameter(local(param), param.requires_grad)
                    init_weights(module)
                finally:
                    module._parameters.update(own)


def structure(model: "torch.nn.Module", optimizer: "torch.optim.Optimizer") -> str:
    """Whether the optimizer sees the parameters' shapes or flat partitions (ZeRO's 1-D buffers), which
    a factored or matrix optimizer needs."""
    seen = [p for group in optimizer.param_groups for p in group["params"]]
    matrices = sum(1 for p in model.parameters() if p.ndim >= 2)
    if not seen:
        return "this rank steps no parameter"
    if matrices and not any(p.ndim >= 2 for p in seen):
        return "structure lost: flat partition (the optimizer sees 1-D partitions, not the parameters' matrices)"
    return f"structure kept: the optimizer sees whole parameters ({len(seen)} of {sum(1 for _ in model.parameters())} on this rank)"
