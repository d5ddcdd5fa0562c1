"""One rank of a distributed run, simulated in this process: a fake process group and fake tensors.

``memprof estimate … --world-size N --parallel fsdp2 --rank R`` runs here: torch's fake process group
(``torch.testing._internal.distributed.fake_pg``: every collective returns at once, moving nothing)
stands for the other N−1 ranks, and the runner measures rank R on fake tensors with the same
``Strategy`` as a real run (``fully_shard``, DDP, ``ZeroRedundancyOptimizer``) and the same replay.
A rank's bytes depend on its rank and the world size, not on what its peers send, so the figures
are a real rank's.
"""

from __future__ import annotations

from memprof.errors import UsageError, describe
from memprof.record import RunRecord
from memprof.settings import Settings


def measure(settings: Settings) -> RunRecord:
    """Rank ``settings.rank`` of ``settings.nproc``, estimated; the process group lives for this call."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from memprof.measure import runner
    from memprof.strategies import NotSupported, for_settings

    if dist.is_initialized():
        raise UsageError("memprof estimate simulates its ranks in one process: run it outside torchrun")
    dist.init_process_group("fake", store=FakeStore(), rank=settings.rank, world_size=settings.nproc)
    try:
        # The strategy (FSDP2's device mesh) is built here, outside the runner's fake-tensor mode, on the
        # device the fake tensors live on (CPU where a CUDA estimate runs without a GPU).
        device = runner._build_device(settings, torch.device(settings.device))
        try:
            record = runner.measure(settings, for_settings(settings, device))
        except NotSupported as exc:
            record = RunRecord.failed(settings, f"cannot run: {exc}")
        except UsageError:  # bad input: one line and exit 2, as everywhere
            raise
        except Exception as exc:  # noqa: BLE001 - a simulated rank's crash is its row, as a real rank's is
            record = RunRecord.failed(settings, f"failed: {describe(exc, exit_as_call=False)}")
    finally:
        dist.destroy_process_group()
    how = (f"simulated rank {settings.rank} of {settings.nproc} ({settings.parallel}): one process, torch's fake "
           "process group (collectives move nothing) and fake tensors")
    record.environment["distributed"] = how
    record.notes.insert(0, how)
    return record
