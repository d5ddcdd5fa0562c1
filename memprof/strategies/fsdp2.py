"""FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded on dim 0 across the ranks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from memprof.strategies.base import Distributed, NotSupported

if TYPE_CHECKING:
    import torch

    from torch.distributed.fsdp import MixedPrecisionPolicy

    from memprof.optim.registry import OptimizerSpec
    from memprof.settings import Settings

INIT_STD = 0.02
"""Standard deviation of the normal init of materialised matrices (GPT-2's and LLaMA's initializer_range)."""


class FSDP2(Distributed):
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

    @classmethod
    def problem(cls, settings: "Settings") -> str | None:
        from memprof.lora import sharding_problem

        return sharding_problem(settings.lora)

    def __init__(self, device: "torch.device", settings: "Settings") -> None:
        import torch.distributed.fsdp  # noqa: F401 - defines torch.ops.fsdp, whose copy-out the capture tags
        from torch.distributed.device_mesh import init_device_mesh

        super().__init__(device, settings)
        # Built here, before the capture: a simulation's capture runs on fake tensors, where the mesh's
        # rank lookup (``nonzero`` on the rank tensor) has no answer.
        self.mesh = init_device_mesh(device.type, (self.world_size,))

    def prepare(self, model: "torch.nn.Module") -> "torch.nn.Module":
        from torch.distributed.fsdp import fully_shard

        from memprof.models.base import outside_dispatch_modes

        policy = self._mixed_precision()
        with outside_dispatch_modes():  # sharding a meta model: nothing allocated, nothing for a tracker
            for module in shard_units(model):
                fully_shard(module, mesh=self.mesh, mp_policy=policy)
            fully_shard(model, mesh=self.mesh, mp_policy=policy)
        model.to_empty(device=self.device)  # FSDP2 re-pads each local shard into its own storage
        initialise_materialised(model, seed=self.rank)
        return model

    def _mixed_precision(self) -> "MixedPrecisionPolicy":
        """``--fsdp-mixed-precision``: parameters all-gathered and computed in bf16 or fp16 over the fp32
        shards, gradients reduce-scattered in fp32 into fp32 shards (torchtitan's policy); else FSDP2's
        default, which gathers and reduces in the parameters' own dtype."""
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if not self.settings.fsdp_mixed_precision:
            return MixedPrecisionPolicy()
        param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.settings.fsdp_mixed_precision]
        return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)

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
        from torch.distributed.tensor import DTensor

        built = ("built on the meta device, sharded, then only this rank's shards materialised and initialised "
                 "(matrices N(0, 0.02), biases 0, other vectors 1; buffers by the model's own initialisers)")
        named = dict(model.named_parameters())
        sharded = {n: p for n, p in named.items() if isinstance(p, DTensor)}  # a failed step leaves some gathered
        split = sum(1 for p in sharded.values() if tuple(p.to_local().shape) != tuple(p.shape))
        notes = [built, f"the optimizer steps this rank's shard of each parameter (Shard(0) rows; {split} of "
                        f"{len(named)} parameters split): a factored optimizer factors the shard"]
        precision = self.settings.fsdp_mixed_precision
        if precision:
            notes.append(f"mixed precision (MixedPrecisionPolicy): fp32 shards are the master copy; parameters "
                         f"are all-gathered and computed in {precision}, gradients reduce-scattered in fp32 into "
                         "fp32 shards")
        uneven = {n: p for n, p in sharded.items() if p.dim() and p.shape[0] % self.world_size}
        return notes + ([self._padding(uneven, len(named))] if uneven else [])

    def _padding(self, uneven: dict[str, "torch.Tensor"], total: int) -> str:
        """What FSDP2 pads where ``world_size`` does not divide a parameter's rows: every rank's shard holds
        ceil(rows / world_size) rows (``torch.chunk``), and the all-gathered buffer world_size times that."""
        gathered_size = 2 if self.settings.fsdp_mixed_precision else None  # bf16 and fp16: 2 bytes
        here = gathered = 0
        worst = (0, "", 0, 0)
        for name, p in uneven.items():
            rows, row_bytes = p.shape[0], p.numel() // p.shape[0] * p.element_size()
            per_rank = -(-rows // self.world_size)
            padding = (per_rank * self.world_size - rows) * row_bytes
            here += (per_rank - p.to_local().shape[0]) * row_bytes
            gathered += padding * (gathered_size or p.element_size()) // p.element_size()
            if padding > worst[0]:  # the first of equals (block 0's): the same name at any depth
                worst = (padding, name, rows, per_rank)
        _, name, rows, per_rank = worst
        return (f"fsdp2 pads each rank's shard to ceil(rows / {self.world_size}) rows: {len(uneven)} of {total} "
                f"parameters have a first dimension {self.world_size} ranks do not divide (most padding: {name}, "
                f"{rows} rows, {per_rank} per rank); {here} B of this rank's shards are padding (as much again in "
                f"their gradients), and their all-gathered buffers hold {gathered} B of padding")


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


def shard_units(model: "torch.nn.Module") -> list["torch.nn.Module"]:
    """The modules ``fully_shard`` wraps before the root: transformer blocks where the model names them
    (``_no_split_modules``), else every leaf module that holds parameters."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    if units:
        return units
    return [m for m in model.modules()
            if m is not model and not any(m.children()) and any(True for _ in m.parameters(recurse=False))]


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
