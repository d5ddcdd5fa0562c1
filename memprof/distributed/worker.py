"""One rank: initialise the process group from torchrun's environment, measure, write the record.

``python -m memprof.distributed.worker SETTINGS.json OUT_DIR`` is what ``memprof.distributed.launch``
runs under ``torch.distributed.run``: it writes ``OUT_DIR/rank<R>.json`` (a run file with this rank's
record) and ``OUT_DIR/rank<R>.pid``. ``measure_rank`` is the same measurement for a process that is
already one rank of a user's ``torchrun`` launch.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

from memprof.errors import UsageError
from memprof.record import RunRecord
from memprof.settings import Settings

TIMEOUT = timedelta(minutes=10)
"""How long a collective waits for a rank that does not come (then it fails, and so does the row)."""


LAUNCH_FIX = ("for one process, unset RANK and WORLD_SIZE (memprof compare --nproc N starts ranks itself); "
              "for a rank of your own job, start memprof with torchrun")
"""How to mend an environment that describes no whole launch: the end of every message about one."""


def environment_rank() -> tuple[int, int] | None:
    """(rank, world size) when this process was started by torchrun (or another launcher that sets
    RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT), else None (neither RANK nor WORLD_SIZE is set).

    An environment that is not a whole launch's is a ``UsageError`` naming the variable: a value that
    is not a whole number, one of RANK and WORLD_SIZE without the other, WORLD_SIZE below 1, RANK or
    LOCAL_RANK outside it, or no MASTER_ADDR/MASTER_PORT to meet the other ranks at (unless this
    process initialised its process group itself). Other variables are read only inside a launch.
    """
    rank, world = _whole_number("RANK"), _whole_number("WORLD_SIZE")
    if rank is None and world is None:
        return None
    if rank is None or world is None:
        given, missing = ("RANK", "WORLD_SIZE") if world is None else ("WORLD_SIZE", "RANK")
        raise UsageError(f"{given}={os.environ[given]} is set but {missing} is not: a launch sets both; {LAUNCH_FIX}")
    if world < 1:
        raise UsageError(f"WORLD_SIZE={world} is not a number of ranks (1 or more); {LAUNCH_FIX}")
    for name, value in (("RANK", rank), ("LOCAL_RANK", _whole_number("LOCAL_RANK"))):
        if value is not None and not 0 <= value < world:
            raise UsageError(f"{name}={value} is outside WORLD_SIZE={world} (ranks 0 to {world - 1}); {LAUNCH_FIX}")
    if not _initialised():
        _rendezvous(rank, world)
    return rank, world


def local_rank() -> int:
    """This rank's GPU on its machine: LOCAL_RANK, else RANK (``environment_rank`` checked both)."""
    rank, _ = environment_rank() or (0, 1)
    local = _whole_number("LOCAL_RANK")
    return rank if local is None else local


def _whole_number(name: str) -> int | None:
    """The environment variable ``name`` as an integer (None when unset); any other text is a usage error."""
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        raise UsageError(f"{name}={text!r} is not a whole number; {LAUNCH_FIX}") from None


def _rendezvous(rank: int, world: int) -> None:
    """Where the ranks meet (torch's ``env://``): MASTER_ADDR, and MASTER_PORT a TCP port."""
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name, "").strip():
            raise UsageError(f"RANK={rank} and WORLD_SIZE={world} are set, as in a launch, but {name} is not "
                             f"(torchrun sets all four); {LAUNCH_FIX}")
    port = _whole_number("MASTER_PORT")
    if not 0 < port < 65536:
        raise UsageError(f"MASTER_PORT={port} is not a TCP port (1 to 65535); {LAUNCH_FIX}")
    unknown = _unresolved(os.environ["MASTER_ADDR"].strip())
    if unknown:
        raise UsageError(f"MASTER_ADDR={os.environ['MASTER_ADDR']!r} names no host here ({unknown}); {LAUNCH_FIX}")


@functools.lru_cache(maxsize=None)
def _unresolved(host: str) -> str | None:
    """Why ``host`` does not resolve to an address (None when it does): the ranks would wait there in vain."""
    try:
        socket.getaddrinfo(host, None)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _join(backend: str) -> None:
    """Join the process group the environment describes; not meeting the other ranks within ``TIMEOUT``
    is a usage error naming where they were awaited."""
    import torch.distributed as dist

    try:
        dist.init_process_group(backend, timeout=TIMEOUT)
    except dist.DistError as exc:  # the store's timeout (DistStoreError), a refused connection (DistNetworkError)
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"this rank could not meet the other ranks at {where} (MASTER_ADDR:MASTER_PORT): {said}; "
                         "start every rank (torchrun does) with an address they all reach") from None


def _initialised() -> bool:
    """Whether this process already joined a process group (its own way: no MASTER_ADDR needed)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


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
        torch.cuda.set_device(local_rank())
    if not dist.is_initialized():
        _join("nccl" if cuda else "gloo")
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
