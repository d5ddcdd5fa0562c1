"""DeepSpeed's own engine (``deepspeed.initialize``) at ZeRO stage 1, 2 or 3, around the registry's optimizer.

Imports of ``deepspeed`` stay inside the methods: this module is read to check a request
(``DeepSpeedZero.problem``) without DeepSpeed's seconds of import.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from typing import TYPE_CHECKING, ContextManager

from memprof.strategies.base import Capture, Distributed, NotSupported, refuse_loop_taking, structure

if TYPE_CHECKING:
    import torch

    from memprof.optim.registry import OptimizerSpec
    from memprof.settings import Settings

DEEPSPEED_BUCKET = 500_000_000
"""DeepSpeed's default reduce/all-gather bucket, in elements; memprof caps it at the model's size."""


class DeepSpeedZero(Distributed):
    """DeepSpeed's own engine (``deepspeed.initialize``) at one ZeRO stage, around the registry's optimizer.

    The engine flattens the parameters into one buffer per group, keeps an fp32 master copy of this
    rank's partition and hands the optimizer that flat 1-D partition to step; stage 2 partitions the
    gradients too, stage 3 the parameters as well. The config comes from memprof's settings
    (``ds_config``); DeepSpeed's timers and memory reports (process RSS on CPU) are not used: the
    runner's tracker measures, as for every strategy.
    """

    stage = 0
    communicators = 2
    """The default group's (deepspeed.init_distributed's barrier) and DeepSpeed's clone of the world group that
    its data-parallel collectives run on (deepspeed.utils.groups._clone_world_group: ``dist.new_group``)."""
    nearest = ""
    """The simulated strategy nearest this stage, for ``memprof estimate`` (which cannot run DeepSpeed)."""

    @classmethod
    def problem(cls, settings: "Settings") -> str | None:
        """Why ``--parallel deepspeed-zero*`` cannot run with these settings (None when it can)."""
        parallel = settings.parallel
        if settings.estimate:  # whether DeepSpeed is installed or not
            return (f"memprof estimate does not simulate --parallel {parallel}: DeepSpeed's engine needs real tensors "
                    f"and real ranks; measure them with memprof compare --nproc N --parallel {parallel} (on CPU too), "
                    f"or estimate {cls.nearest}")
        if importlib.util.find_spec("deepspeed") is None:  # found, not imported: importing it takes seconds
            return (f"--parallel {parallel} needs DeepSpeed, which this Python ({sys.executable}) cannot import: "
                    "pip install deepspeed")
        if settings.dtype not in ("float32", "bfloat16"):
            return f"--parallel {parallel} runs --dtype float32 or bfloat16 (float16 needs DeepSpeed's loss scaler)"
        return None

    def __init__(self, device: "torch.device", settings: "Settings") -> None:
        import deepspeed.ops

        super().__init__(device, settings)
        # DeepSpeed's shared-memory kernel serves only its inference all-reduce, and would be compiled (minutes,
        # with a C++ compiler) on first use: off, so every collective is torch.distributed's (gloo on CPU).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.engine = None
        self.config: dict = {}
        self.capture: Capture | None = None

    def watch(self, capture: Capture) -> ContextManager:
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
        refuse_loop_taking(optimizer, f"{self.settings.parallel}: {spec.name}", "DeepSpeed's engine")
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

    def micro_batch(self, last: bool) -> ContextManager:
        """DeepSpeed's documented way to step once after accumulating: the boundary set before each backward."""
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: "torch.Tensor") -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the runner divides each micro-batch's loss already
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
    nearest = "--parallel zero1 (torch's ZeRO-1: optimizer state sharded, by whole parameters)"


class DeepSpeedZero2(DeepSpeedZero):
    name, stage = "deepspeed-zero2", 2
    nearest = ("--parallel zero1 (optimizer state sharded; gradients whole) or fsdp2 (parameters, gradients and "
               "state sharded)")


class DeepSpeedZero3(DeepSpeedZero):
    name, stage = "deepspeed-zero3", 3
    nearest = "--parallel fsdp2 (torch's ZeRO-3: parameters, gradients and optimizer state sharded)"


def ds_config(settings: "Settings", stage: int, n_params: int) -> dict:
    """DeepSpeed's config for memprof's settings: ``--grad-accum`` micro-batches of ``--batch-size`` per rank, no
    clipping, bf16 when ``--dtype bfloat16`` (else fp32), and DeepSpeed's buckets no larger
    than the model (its 5e8-element default would otherwise dwarf a small model: ZeRO-3 allocates one up front)."""
    bucket = min(DEEPSPEED_BUCKET, n_params)
    zero: dict = {"stage": stage, "reduce_bucket_size": bucket}
    if stage < 3:
        zero["allgather_bucket_size"] = bucket
    else:
        zero["stage3_prefetch_bucket_size"] = bucket
    return {"train_micro_batch_size_per_gpu": settings.batch_size, "gradient_accumulation_steps": settings.grad_accum,
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
