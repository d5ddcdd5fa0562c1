"""One rank: initialise the process group from torchrun's environment, measure, write the record.

``python -m memprof.distributed.worker SETTINGS.json OUT_DIR`` is what ``memprof.distributed.launch``
runs under ``torch.distributed.run``: it writes ``OUT_DIR/rank<R>.json`` (a run file with this rank's
record) and ``OUT_DIR/rank<R>.pid``. ``measure_rank`` is the same measurement for a process that is
already one rank of a user's ``torchrun`` launch.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

from memprof.record import RunRecord
from memprof.settings import Settings

TIMEOUT = timedelta(minutes=10)
"""How long a collective waits for a rank that does not come (then it fails, and so does the row)."""


def environment_rank() -> tuple[int, int] | None:
    """(rank, world size) when this process was started by torchrun (or another launcher that sets them)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def measure_rank(settings: Settings) -> RunRecord:
    """Measure this rank of the job the environment describes; a failure anywhere is the row's failure.

    The default process group is initialised here when it is not yet (gloo on CPU, NCCL on CUDA with
    ``LOCAL_RANK``'s GPU) and kept for the process's later measurements.
    """
    import torch
    import torch.distributed as dist

    from memprof.errors import describe
    from memprof.measure.runner import measure
    from memprof.strategies import NotSupported, for_settings

    rank, world = environment_rank() or (0, 1)
    settings = settings.replace(rank=rank, nproc=world)
    cuda = settings.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        return measure(settings, for_settings(settings))
    except NotSupported as exc:
        return RunRecord.failed(settings, f"cannot run: {exc}")
    except Exception as exc:  # noqa: BLE001 - a rank that cannot even start is a row saying why
        return RunRecord.failed(settings, f"failed in setup: {describe(exc)}")


def _main(settings_path: str, out_dir: str) -> int:
    """Measure this rank and write its record; 0 once the record is written (it may say failed)."""
    from memprof import runfile
    from memprof.files import write_atomic
    from memprof.measure.isolation import die_with_parent

    die_with_parent(os.getppid())  # the launcher: killed, it cannot stop this rank itself
    rank = int(os.environ["RANK"])
    out = Path(out_dir)
    write_atomic(out / f"rank{rank}.pid", str(os.getpid()))
    settings = Settings(**json.loads(Path(settings_path).read_text()))
    record = measure_rank(settings)
    runfile.write(out / f"rank{rank}.json", [record])
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if record.status != "ok" and settings.device.startswith("cuda"):
        # NCCL does not fail a collective when a peer leaves: end the job so the launcher stops the
        # ranks that wait for this one (gloo's peers fail on their own when this process exits).
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:3]))
