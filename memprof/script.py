"""``memprof run``: run the user's training script (or ``-m`` module) as Python would, and measure its steps.

The script runs in this process through ``runpy`` under ``__main__``, with ``sys.argv`` as ``python script.py
args…`` would set it and its folder first on ``sys.path``, inside ``memprof.measure.tracked.Track``: the
optimizers it steps and the modules it calls are found by torch's global hooks. Once ``steps`` steps after
``skip`` are measured the script is stopped (``StopTracking``, a ``BaseException`` that its ``except
Exception`` does not catch), unless ``finish``: then it runs to its end. Running the script is what the user
asks for; run files and baselines still never run code.

Under ``torchrun`` (RANK and WORLD_SIZE set) every rank measures its own steps; where the script has made the
default process group, the ranks' records are gathered where the window closes and rank 0 reports them all.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
import traceback
from pathlib import Path
from typing import Iterator

from memprof.errors import ScriptFailed, UsageError, describe
from memprof.record import RunRecord


def run(target: str, args: list[str], *, module: bool = False, steps: int = 3, skip: int = 0,
        finish: bool = False) -> list[RunRecord]:
    """Run the script (``module``: the module) with ``args``; the records of its measured steps (one per rank).

    The script raising: its traceback is printed as Python prints it, then ``ScriptFailed`` carries the record
    of the steps measured until then (status failed). No step measured, or fewer than ``skip + steps``:
    ``UsageError`` saying what the script did."""
    from memprof.execute import command_line
    from memprof.measure.tracked import StopTracking, Track

    command = command_line()
    name = _check(target, module)
    gathered: list[RunRecord] = []

    def stop(record: RunRecord) -> None:
        gathered.extend(_gather(record))
        raise StopTracking

    tracking = Track(steps=steps, skip=skip, on_close=None if finish else stop)
    try:
        with _as_main(target, args, module), tracking:
            try:
                if module:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(target, run_name="__main__")
            except SystemExit as exc:
                if exc.code not in (None, 0):
                    raise
    except StopTracking:
        pass
    except (KeyboardInterrupt, UsageError):
        raise
    except BaseException as exc:  # noqa: BLE001 - the script's own failure: shown as Python shows it
        _print_traceback(exc)
        record = tracking.record
        if record is not None:
            record.environment["command"] = command
        if record is None:
            measured = "no step was measured"
        elif record.status == "ok":  # --finish: it raised after the measured steps
            measured = f"the record of its {record.settings.steps} measured step(s) is written"
        else:
            measured = f"the record of the steps measured before it ({record.failure}) is written with status failed"
        raise ScriptFailed(f"{name} raised {describe(exc)}; {measured}", record) from None
    records = gathered or [tracking.record]
    for record in records:
        record.environment["command"] = command
    return records


def _check(target: str, module: bool) -> str:
    """The script's name as messages give it; a missing script or module is a usage error."""
    if module:
        import importlib.util

        try:
            found = importlib.util.find_spec(target)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise UsageError(f"memprof run -m {target}: no module named {target!r}")
        return f"module {target}"
    if not Path(target).is_file():
        raise UsageError(f"memprof run: no script {target!r} (give a Python file, or -m MODULE)")
    return target


@contextlib.contextmanager
def _as_main(target: str, args: list[str], module: bool) -> Iterator[None]:
    """``sys.argv`` and ``sys.path[0]`` as ``python script.py args…`` (or ``python -m module args…``) sets them."""
    argv, path = sys.argv, list(sys.path)
    sys.argv = [target, *args]
    sys.path.insert(0, os.getcwd() if module else str(Path(target).resolve().parent))
    try:
        yield
    finally:
        sys.argv, sys.path[:] = argv, path


def _print_traceback(exc: BaseException) -> None:
    """The exception's traceback from the script's first frame on, as ``python script.py`` prints it."""
    import memprof

    if isinstance(exc, SystemExit):  # Python prints no traceback for sys.exit: only a message it was given
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
        return
    ours = (str(Path(runpy.__file__).resolve()), str(Path(memprof.__file__).resolve().parent))
    tb = exc.__traceback__
    while tb is not None and (tb.tb_frame.f_code.co_filename.startswith("<frozen runpy>")
                              or str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(ours)):
        tb = tb.tb_next
    sys.stderr.flush()
    traceback.print_exception(type(exc), exc, tb, file=sys.stderr)
    sys.stderr.flush()


def _gather(record: RunRecord) -> list[RunRecord]:
    """Every rank's record on every rank, where the script runs under torchrun with a process group (as
    ``memprof.distributed.launch`` gathers its own ranks'); this record alone otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [record]
    rank, world = dist.get_rank(), dist.get_world_size()
    record.settings = record.settings.replace(rank=rank, nproc=world, parallel=_parallel(record))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, record.to_dict())
    return [RunRecord.from_dict(item) for item in gathered]


def _parallel(record: RunRecord) -> str:
    """The --parallel name of the wrapper the script trained through (ddp unless FSDP's was seen)."""
    classes = " ".join(record.model_config.get("tracked", []))
    return "fsdp2" if "FSDP" in classes else "ddp"
