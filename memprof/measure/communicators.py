"""The context rows of a distributed CUDA run's NCCL communicators: device memory outside the caching allocator,
assumed from NCCL's defaults (``memprof.nccl``) and marked so (basis "assumed")."""

from __future__ import annotations

import os

from memprof.gpus import DEFAULT_GPU, GPUS
from memprof.nccl import communicator, nccl_env
from memprof.record import Row, RunRecord
from memprof.taxonomy import OUTSIDE_COMPONENTS

RING, NVLS = OUTSIDE_COMPONENTS


def add_communicator_rows(record: RunRecord, communicators: int) -> None:
    """Add the NCCL rows of a CUDA run whose strategy holds ``communicators`` communicators per rank (none:
    nothing added), before the breakdown's last row, and a note saying how they were reckoned.

    The GPU is the estimate's ``--gpu`` (the H100 by default), or a real run's by its name; NCCL's variables
    are read from this process's environment (an estimate: the one it is made in stands for the target's)."""
    settings = record.settings
    if communicators == 0 or settings.nproc < 2 or not settings.device.startswith("cuda"):
        return
    if settings.estimate:
        gpu = settings.target_gpu or DEFAULT_GPU
    else:
        gpu = next((name for name, g in GPUS.items() if g.label == record.environment.get("gpu")), "unknown")
    each = communicator(gpu, settings.nproc, nccl_env(os.environ))
    rows = [Row(*RING, each.ring * communicators, "assumed")]
    if each.nvls:
        rows.append(Row(*NVLS, each.nvls * communicators, "assumed"))
    record.breakdown[-1:-1] = rows
    measured = "" if settings.estimate else "; NVML's figure holds the real buffers, and needs counts it instead"
    record.notes.append(f"NCCL (assumed): {communicators} communicator(s) per rank, each "
                        f"{(each.ring + each.nvls) / 2**20:,.0f} MiB: {each.how}{measured}")
