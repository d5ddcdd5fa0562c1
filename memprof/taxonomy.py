"""The byte taxonomy, declared once: categories, their precedence, state roles and role inference.

Every measured byte lands in exactly one category. Where a byte gets its category is decided in
``memprof.measure.attribution`` from the declarations here; views import the orders from here.
Kept free of heavy imports (torch only for type checking).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Mapping

if TYPE_CHECKING:
    import torch

CATEGORIES: tuple[str, ...] = (
    "weights",
    "buffers",
    "gradients",
    "optimizer_state",
    "inputs",
    "activations",
    "temporaries",
    "step_transient",
    "allocator",
    "context",
    "unattributed",
)
"""Every measured byte lands in exactly one of these (DESIGN.md's taxonomy), in display order."""

IDENTITY_PRECEDENCE: tuple[str, ...] = (
    "weights", "buffers", "gradients", "optimizer_state", "inputs", "temporaries", "activations",
)
"""Categories known by identity (a tensor the run can name), in precedence order: an allocation
tagged twice (a parameter saved for backward) takes the first. ``temporaries`` known by identity
are the buffers of collectives (``COLLECTIVE_COMPONENTS``): FSDP's unsharded parameters are saved
for backward, yet freed after the forward and gathered again, so they are no activation."""

COLLECTIVE_COMPONENTS: dict[tuple[str, str], str] = {
    ("temporaries", "all-gather"): "FSDP's flat all-gather output: every rank's shards of a block, before copy-out",
    ("temporaries", "unsharded params"): "the full parameters FSDP gathers a block's shards into, live until the "
                                         "block is resharded (after its forward; again in backward)",
    ("temporaries", "reduce-scatter"): "FSDP's flat reduce-scatter input: the block's unsharded gradients, padded",
    ("gradients", "all-reduce bucket"): "what an all-reduce sums: DDP's flat gradient buckets, kept from step to "
                                        "step beside p.grad; DeepSpeed's contiguous reduce buckets",
}
"""Components that only distributed runs have (``memprof.measure.attribution.CollectiveBuffers`` tags
them); their rows give the most bytes live at once during the last step."""

OUTSIDE_COMPONENTS: dict[tuple[str, str], str] = {
    ("context", "nccl ring buffers"): "NCCL's connection buffers of the run's communicators (ring; tree across nodes): "
                                      "device memory outside the caching allocator, assumed from NCCL's defaults "
                                      "(memprof.nccl)",
    ("context", "nccl nvls buffers"): "NCCL's NVLink SHARP buffers of the run's communicators (Hopper NVSwitch nodes): "
                                      "device memory outside the caching allocator, assumed from NCCL's defaults",
}
"""Components of ``context`` that a distributed CUDA run holds outside the caching allocator (rows of basis
"assumed": ``memprof.gpus.need`` counts them unless NVML measured the process, NCCL's buffers included)."""

WEIGHT_COMPONENTS: dict[str, str] = {
    "param": "parameters the optimizer trains",
    "adapter": "LoRA adapters (PEFT's lora_A/lora_B, --lora): the only parameters trained on a frozen base",
    "frozen": "parameters without gradient or optimizer state (requires_grad False): LoRA's frozen base",
    "quant codes": "a quantized frozen base's codes (QLoRA, --lora …,quant=: 4-bit NF4 packed two per byte, or int8)",
    "quant scales": "a quantized frozen base's scales: NF4's 8-bit block absmax with their fp32 second-level scales "
                    "and offset (double quantization), int8's fp32 scale per row",
}
"""Components of ``weights``, in display order: a run that trains every parameter has ``param`` alone."""

ADAPTER_PREFIX = "lora_"
"""PEFT names a LoRA layer's adapter modules ``lora_A``, ``lora_B``, ``lora_embedding_A``… (its tuner prefix)."""
QUANT_PREFIX = "quant_"
"""``memprof.models.quant`` names a quantized layer's storage ``quant_codes``, ``quant_absmax``…"""


def weight_component(name: str, trainable: bool) -> str:
    """The component of ``weights`` a parameter belongs to, from its name and whether it is trained."""
    leaf = name.rpartition(".")[2]
    if leaf.startswith(QUANT_PREFIX):
        return "quant codes" if leaf == f"{QUANT_PREFIX}codes" else "quant scales"
    if not trainable:
        return "frozen"
    return "adapter" if any(part.startswith(ADAPTER_PREFIX) for part in name.split(".")) else "param"


PERSISTENT: tuple[str, ...] = ("weights", "buffers", "gradients", "optimizer_state", "inputs")
"""Counted exactly from tensors (unique storage bytes): identical on every device, gated at 0 %."""

PHASES: tuple[str, ...] = ("forward", "backward", "step")
"""The phases of one training step."""
BETWEEN_STEPS = "between steps"
"""A tracked loop's phase from an optimizer step's end to the next forward: its data loading, logging, scheduler
(``memprof.measure.tracked``); what it allocates and nothing claims is a temporary of its own."""


def category_of_untagged(phase: str) -> tuple[str, str]:
    """(category, component) of an allocation no identity claims, from the phase that made it."""
    if phase in ("forward", "backward"):
        return "temporaries", phase
    if phase == "step":
        return "step_transient", "step"
    if phase == BETWEEN_STEPS:
        return "temporaries", BETWEEN_STEPS
    if phase == "warmup":
        # What the library warm-up leaves allocated is cuBLAS/cuDNN workspace: context that
        # happens to live inside the caching allocator.
        return "context", "library workspace"
    # Made while the model was built and owned by no tensor of the run.
    return "unattributed", phase


FRAGMENTATION: tuple[str, str] = ("allocator", "reserved-allocated")
"""The caching allocator's own bytes: what it reserved beyond what it handed out, at the peaks (max reserved −
max allocated): free parts of its segments, whole blocks handed out for smaller requests, cached segments."""

RECOMPUTED: tuple[str, str] = ("activations", "recomputed")
"""What a recomputation in backward (activation checkpointing) allocates and still holds when it ends: the
tensors saved for the backward of the block just recomputed, freed as that backward consumes them."""
RECOMPUTE_SCRATCH: tuple[str, str] = ("temporaries", "recompute")
"""What a recomputation in backward allocates and frees before it ends (its intermediates)."""


def category_of_recomputed(freed_within: bool) -> tuple[str, str]:
    """(category, component) of an allocation a recomputation made and no identity claims."""
    return RECOMPUTE_SCRATCH if freed_within else RECOMPUTED


Role = Literal["master", "moment", "factor", "preconditioner", "sign", "projection", "quant", "other"]
ROLES: tuple[str, ...] = ("master", "moment", "factor", "preconditioner", "sign", "projection", "quant", "other")
"""Components of ``optimizer_state``: the fp32 master copy of the weights that an engine steps in
place of the parameters (DeepSpeed ZeRO's partition; counted as optimizer state, as the ZeRO paper
does); full-size moments; row/column factors, per-axis accumulators,
low-rank bases and per-block statistics; per-axis preconditioner matrices (Shampoo's and SOAP's
Gram statistics, their inverse roots and eigenbases, Kron's Q); sign bitmaps; GaLore/AdaMeM
projection matrices; quantized codes, scales and code books; step counters, scalars and update
masks. Display order."""

STRATEGY_STATE_ROLES: dict[str, Role] = {"master": "master"}
"""State keys that a distributed strategy adds beside the optimizer's own (``memprof.strategies.deepspeed.
FlatPartitions``), with their roles."""

ROLE_ABBREVIATIONS: dict[str, str] = {
    "master": "mst", "moment": "mom", "factor": "fac", "preconditioner": "pre", "sign": "sign", "projection": "proj",
    "quant": "q", "other": "oth",
}


def infer_role(state_tensor: "torch.Tensor", param: "torch.Tensor | None") -> Role:
    """Heuristic role for state of an optimizer that declares none (marked as inferred)."""
    import torch

    n = state_tensor.numel()
    if n <= 1:
        return "other"
    if param is not None:
        if state_tensor.dtype in (torch.bool, torch.uint8) and abs(n - (param.numel() + 7) // 8) <= state_tensor.shape[0]:
            return "sign"
        if state_tensor.dtype in (torch.uint8, torch.int8):
            return "quant"
        if n == param.numel():
            return "moment"
    return "factor"


def role_of(roles: Mapping[str, Role], key: str, state_tensor: "torch.Tensor",
            param: "torch.Tensor | None") -> tuple[Role, bool]:
    """The declared role of a state key (the optimizer's, else a strategy's), or an inferred one (second item
    True when inferred)."""
    if key in roles:
        return roles[key], False
    if key in STRATEGY_STATE_ROLES:
        return STRATEGY_STATE_ROLES[key], False
    return infer_role(state_tensor, param), True


def order_roles(names) -> list[str]:
    """Distinct optimizer-state components in role order (unknown ones last, sorted)."""
    present = set(names)
    return [c for c in ROLES if c in present] + sorted(present - set(ROLES))
