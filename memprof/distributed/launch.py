"""The parent of a distributed run: start the ranks, merge their records, leave no rank running.

``measure`` is what ``memprof.execute`` calls for one optimizer when ``--parallel`` is set. Inside a
user's ``torchrun`` launch (RANK and WORLD_SIZE in the environment) it measures this process's rank and
gathers every rank's record; otherwise it runs ``python -m torch.distributed.run --standalone`` with
``--nproc`` ranks of ``memprof.distributed.worker`` (gloo on CPU, NCCL on CUDA, one GPU per rank), one
launch per optimizer, as CUDA measurements each get their own process. An estimate simulates the one
rank it asks for in this process instead (``memprof.distributed.simulate``).

Nothing outlives this process: the launcher is started through this module's ``__main__``, which has the
kernel kill it when this process dies (``PR_SET_PDEATHSIG``, even at SIGKILL), and each rank has the same
done for the launcher's death (``memprof.distributed.worker``). The ranks' folder is ``memprof-ranks-<pid>-…``;
one a killed run left is removed by the next run (``memprof.measure.isolation.owned_folder``).
"""

from __future__ import annotations

import json
import os
import re
import runpy
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from memprof import runfile, strategies
from memprof.distributed.worker import environment_rank, local_rank, measure_rank
from memprof.errors import UsageError
from memprof.files import write_atomic
from memprof.record import RunRecord
from memprof.settings import Settings

STOP_GRACE_S = 5.0
"""How long the launcher gets to stop its ranks itself before they are killed."""


def requested(settings: Settings) -> bool:
    """Whether ``settings`` ask for a distributed run (``--parallel``), or this process is one rank of one."""
    return settings.parallel != "none" or (environment_rank() or (0, 1))[1] > 1


def check(settings: Settings) -> Settings:
    """The settings of the run, with ``nproc`` from a user's launch; bad input is one usage error."""
    problem = strategies.problem(settings)
    if problem:
        raise UsageError(problem)
    launched = environment_rank()
    if settings.estimate:  # simulated in this process (memprof.distributed.simulate)
        return settings
    if launched is not None:
        world = launched[1]
        if settings.nproc not in (1, world):
            raise UsageError(f"--nproc {settings.nproc} disagrees with this torchrun launch's WORLD_SIZE={world}; "
                             "leave --nproc out under torchrun")
        if world > 1 and settings.parallel == "none":
            raise UsageError(f"this process is one of {world} ranks (torchrun): choose --parallel ddp, fsdp2 or zero1")
        settings = settings.replace(nproc=world)
    if settings.device.startswith("cuda"):
        import torch

        gpus = torch.cuda.device_count()
        if launched is None and settings.nproc > gpus:
            raise UsageError(f"--nproc {settings.nproc} needs {settings.nproc} GPUs (one per rank); "
                             f"this machine has {gpus}; use --nproc {max(gpus, 1)} or --device cpu")
        if launched is not None and local_rank() >= gpus:
            raise UsageError(f"this rank's GPU is cuda:{local_rank()} (LOCAL_RANK, else RANK) and this machine has "
                             f"{gpus}; launch at most {gpus} ranks per machine, or use --device cpu")
    return settings


def measure(settings: Settings) -> list[RunRecord]:
    """One record per rank, in rank order (``settings`` as ``check`` returned them); for an estimate, the
    one rank it simulates."""
    if settings.estimate:
        from memprof.distributed import simulate
        from memprof.measure import depth

        return [depth.estimate(settings, simulate.measure)]
    if environment_rank() is not None:
        return _gather(measure_rank(settings))
    return launch(settings)


def reporting() -> bool:
    """Whether this process prints and writes results: always, except ranks other than 0 of a user's launch."""
    return (environment_rank() or (0, 1))[0] == 0


def _gather(record: RunRecord) -> list[RunRecord]:
    """Every rank's record, on every rank. A rank whose measurement failed keeps to its own record (the
    others may wait in a collective it left; they fail once it exits, as torchrun stops the job)."""
    import torch.distributed as dist

    if record.status != "ok":
        return [record]
    gathered: list = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(gathered, record.to_dict())
    except RuntimeError as exc:  # a rank left: this rank's own record is what it can report
        record.notes.append(f"records of the other ranks not gathered: {str(exc).splitlines()[0]}")
        return [record]
    return [RunRecord.from_dict(item) for item in gathered]


def launch(settings: Settings) -> list[RunRecord]:
    """Run ``settings.nproc`` ranks under ``torch.distributed.run`` on this machine and merge their records."""
    from memprof.measure.isolation import owned_folder

    with owned_folder("memprof-ranks-") as tmp:
        out = Path(tmp)
        write_atomic(out / "settings.json", json.dumps(asdict(settings)))
        command = [sys.executable, "-m", "memprof.distributed.launch", str(os.getpid()), "--standalone",
                   f"--nproc-per-node={settings.nproc}", "--max-restarts=0", f"--log-dir={out / 'logs'}",
                   "--redirects=3", "-m", "memprof.distributed.worker", str(out / "settings.json"), str(out)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               # The ranks import what this process can (a user's optimizer class by dotted path).
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                    start_new_session=True)
        try:
            _, stderr = launcher.communicate()
        finally:
            _stop(launcher, out, settings.nproc)
        return [_rank_record(settings, rank, out, stderr) for rank in range(settings.nproc)]


def _rank_record(settings: Settings, rank: int, out: Path, launcher_stderr: str) -> RunRecord:
    """The record a rank wrote, or a failed one saying why it wrote none."""
    path = out / f"rank{rank}.json"
    if path.exists():
        return runfile.read(path, f"rank {rank}'s record")[0]
    return RunRecord.failed(settings.replace(rank=rank), _why_no_record(rank, out, launcher_stderr))


def _why_no_record(rank: int, out: Path, launcher_stderr: str) -> str:
    """From torch.distributed.run's failure report: this rank crashed first, or was stopped after one did."""
    first = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", launcher_stderr, re.S)
    if first is None:
        tail = [line for line in launcher_stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return f"rank {rank} left no record; the launcher said: {tail[0].strip()}"
    crashed, code = int(first.group(1)), int(first.group(2))
    if crashed != rank:
        return f"stopped by the launcher after rank {crashed} crashed"
    how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"exit code {code}"
    said = _last_line(next(iter(sorted(out.glob(f"logs/**/{rank}/stderr.log"))), None))
    return f"rank {rank} crashed ({how})" + (f": {said}" if said else "")


def _last_line(path: Path | None) -> str:
    if path is None or not path.exists():
        return ""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _stop(launcher: subprocess.Popen, out: Path, nproc: int) -> None:
    """Leave nothing running: the launcher gets ``STOP_GRACE_S`` to stop its ranks; then every rank still
    alive (each leads its own process group) is killed with its group."""
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGTERM)
        try:
            launcher.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    for rank in range(nproc):
        pid_file = out / f"rank{rank}.pid"
        if pid_file.exists() and _is_our_worker(int(pid_file.read_text()), out):
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _run_launcher(parent: str, *arguments: str) -> None:
    """``torch.distributed.run`` with ``arguments``, in a process that dies with ``parent`` (this module's
    ``__main__``: ``launch`` starts it so)."""
    from memprof.measure.isolation import die_with_parent

    die_with_parent(int(parent))
    sys.argv = [sys.argv[0], *arguments]
    runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)


def _is_our_worker(pid: int, out: Path) -> bool:
    """Whether ``pid`` is still a rank of this run (its command line names this run's folder)."""
    try:
        return str(out) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return not Path("/proc").exists()  # no /proc (macOS): alive is all we can tell


if __name__ == "__main__":
    _run_launcher(*sys.argv[1:])
