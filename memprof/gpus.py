"""What a GPU adds that fake tensors cannot see, per GPU: capacity, library workspace, driver context.

Each figure says where it comes from. Only the H100 was measured (reports/gpu, torch 2.11,
CUDA 13.0, driver 580.159): on every other GPU the workspace and context are the H100's, marked
as assumed, until a real run on that GPU replaces them. Capacities not read from a device are the
vendor's nominal figures.
"""

from __future__ import annotations

from dataclasses import dataclass

from memprof.errors import UsageError, closest
from memprof.units import parse_size

GB = 10**9

H100_WORKSPACE = 67_108_864
"""cuBLAS/cuDNN workspace the warm-up leaves inside the caching allocator: the `context/library
workspace` row of every committed H100 run (reports/gpu/*.json)."""
H100_DRIVER = 786_432_000
"""NVML's process memory minus reserved (CUDA context and libraries outside the allocator): the
`context/driver (nvml-reserved)` row of the committed H100 runs without an SVD (cuSOLVER adds
102,760,448 B: 889,192,448 in the AdaMeM, Adapprox and GaLore runs)."""
MEASURED_H100 = "measured: reports/gpu/*.json (H100 80GB HBM3, torch 2.11.0+cu130, driver 580.159.04)"
ASSUMED_H100 = "assumed: the H100's measured figures (not measured on this GPU)"
MEASURED_SMS = ("measured: 132 SMs x 2,048 threads/SM, the one figure that fits the CUDA reduction kernel's staging "
                "buffers in the H200 histories (reports/gpu/traces-h200: 528 CTAs per output = 132 x 2,048 / 512)")
NOMINAL_SMS = "nominal: the vendor's SM count; threads per SM from CUDA's compute-capability table (8.0: 2,048; 8.9: 1,536)"


@dataclass(frozen=True)
class Gpu:
    """One GPU: its usable memory and what CUDA takes of it before the model's first byte."""

    name: str
    label: str
    capacity: int  # bytes torch reports as total_memory
    capacity_source: str
    workspace: int  # inside the caching allocator (counts toward max_memory_allocated)
    driver: int  # outside it (counts toward what nvidia-smi shows, not toward torch's peaks)
    source: str  # where workspace and driver come from
    sm_count: int  # streaming multiprocessors (cudaDeviceProp.multiProcessorCount)
    threads_per_sm: int  # cudaDeviceProp.maxThreadsPerMultiProcessor
    sm_source: str
    warp_size: int = 32


GPUS: dict[str, Gpu] = {g.name: g for g in (
    Gpu("h100", "NVIDIA H100 80GB HBM3", 85_017_493_504, "read: torch total_memory in reports/gpu/alada-table4.json",
        H100_WORKSPACE, H100_DRIVER, MEASURED_H100, 132, 2048, NOMINAL_SMS),
    Gpu("h200", "NVIDIA H200", 141 * GB, "nominal: 141 GB HBM3e (vendor, decimal GB)", H100_WORKSPACE, H100_DRIVER, ASSUMED_H100,
        132, 2048, MEASURED_SMS),
    Gpu("a100-80gb", "NVIDIA A100 80GB", 80 * GB, "nominal: 80 GB HBM2e (vendor, decimal GB)", H100_WORKSPACE, H100_DRIVER,
        ASSUMED_H100, 108, 2048, NOMINAL_SMS),
    Gpu("a100-40gb", "NVIDIA A100 40GB", 40 * GB, "nominal: 40 GB HBM2 (vendor, decimal GB)", H100_WORKSPACE, H100_DRIVER,
        ASSUMED_H100, 108, 2048, NOMINAL_SMS),
    Gpu("l40s", "NVIDIA L40S", 48 * GB, "nominal: 48 GB GDDR6 (vendor, decimal GB)", H100_WORKSPACE, H100_DRIVER, ASSUMED_H100,
        142, 1536, NOMINAL_SMS),
    Gpu("rtx4090", "NVIDIA GeForce RTX 4090", 24 * GB, "nominal: 24 GB GDDR6X (vendor, decimal GB)", H100_WORKSPACE, H100_DRIVER,
        ASSUMED_H100, 128, 1536, NOMINAL_SMS),
)}
DEFAULT_GPU = "h100"
"""The GPU an estimate is for when ``--gpu`` names none: the one measured."""


def gpu(name: str) -> Gpu:
    if name not in GPUS:
        raise UsageError(f"unknown --gpu {name!r}; closest: {closest(name, list(GPUS))} (choose from {', '.join(GPUS)})")
    return GPUS[name]


def budget(settings) -> int | None:
    """The memory an estimate must fit in: ``--memory``, else the ``--gpu``'s capacity (None: no budget)."""
    if settings.memory:
        return parse_size(settings.memory)
    return GPUS[settings.target_gpu].capacity if settings.target_gpu else None


OUTSIDE_BASES = ("gpu table", "nvml", "assumed")
"""Bases of the ``context`` rows that lie outside the caching allocator (the driver's, NCCL's)."""


def need(record) -> int | None:
    """What a run needs of the device: the most its caching allocator reserved (an estimate for CUDA: as
    simulated; a CPU run: its peak of live tensors) plus the context outside the allocator: the CUDA context and
    a distributed run's NCCL buffers (``memprof.nccl``), as NVML measured them where it did, else as assumed."""
    held = record.peaks.max_reserved if record.peaks.max_reserved is not None else record.peaks.allocated
    if held is None:
        return None
    outside = [r for r in record.breakdown if r.category == "context" and r.basis in OUTSIDE_BASES]
    if any(r.basis == "nvml" for r in outside):  # the driver's view holds NCCL's buffers: assumed rows would count twice
        outside = [r for r in outside if r.basis == "nvml"]
    return held + sum(r.bytes for r in outside)


def fits(record, limit: int) -> bool:
    """Whether a run fits ``limit`` bytes: what it needs does, or (an estimate) its simulated allocator met
    every allocation within the limit once it freed its cached segments (``Peaks.fails_at`` empty)."""
    needs = need(record)
    return needs is not None and (needs <= limit or record.peaks.fails_at == "")
