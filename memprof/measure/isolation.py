"""One child process per CUDA measurement, so no optimizer's cached blocks, peak counters,
cuBLAS workspace or OOM touch another's. A crashed child becomes a failed record.

A child never outlives its parent: on Linux its first act is ``PR_SET_PDEATHSIG`` (the kernel
kills it when the parent dies, even by SIGKILL), and a parent that stops waiting for any other
reason (Ctrl-C, SIGTERM through the command line's handler, an exception) kills it first. Each
child's temporary folder is ``memprof-child-<parent pid>-*`` in the system temporary folder (a
distributed run's, ``memprof-ranks-<pid>-*``: ``owned_folder``); one whose process no longer runs
(it was killed before it could clean up) is removed by the next run.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from memprof import runfile
from memprof.files import pid_alive
from memprof.record import RunRecord
from memprof.settings import Settings

TEMP_PREFIX = "memprof-child-"
FOLDER_PREFIXES = (TEMP_PREFIX, "memprof-ranks-")
"""The temporary folders memprof makes, each named ``<prefix><pid of the process that made it>-…``."""
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
"""Looked up on import, in the parent: a child forked without ``exec`` then only calls it (no loader lock)."""


def measure_in_child(settings: Settings) -> RunRecord:
    """Run ``memprof.measure.runner.measure`` in a fresh interpreter and read its record back."""
    with owned_folder(TEMP_PREFIX) as tmp:
        settings_path, record_path = Path(tmp, "settings.json"), Path(tmp, "record.json")
        settings_path.write_text(json.dumps(asdict(settings)))
        proc = subprocess.Popen(
            [sys.executable, "-m", "memprof.measure.isolation", str(settings_path), str(record_path), str(os.getpid())],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # The child imports what the parent can (a user's optimizer class by dotted path).
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        try:
            _, stderr = proc.communicate()
        finally:
            if proc.poll() is None:  # the parent stopped waiting: the child goes too
                proc.kill()
                proc.wait()
        if proc.returncode == 0 and record_path.exists():
            return runfile.read(record_path, "child record")[0]
        if proc.returncode == 2 and stderr.strip():
            from memprof.errors import UsageError

            raise UsageError(stderr.strip().splitlines()[-1])
        tail = "\n".join(stderr.strip().splitlines()[-3:]) or f"exit code {proc.returncode}"
        return RunRecord.failed(settings, f"child crashed: {tail}")


def die_with_parent(parent: int) -> None:
    """In the child: have the kernel send SIGKILL when ``parent`` dies (Linux; strictly, when the thread
    of ``parent`` that started this child ends), and exit at once if it already has."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def owned_folder(prefix: str) -> tempfile.TemporaryDirectory:
    """A new temporary folder ``<prefix><this pid>-…`` (a ``FOLDER_PREFIXES`` one), once every folder a
    killed run left is removed."""
    remove_orphaned_folders()
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-")


def remove_orphaned_folders() -> None:
    """Remove this user's ``FOLDER_PREFIXES`` temporary folders whose process no longer runs."""
    pattern = re.compile(rf"(?:{'|'.join(map(re.escape, FOLDER_PREFIXES))})(\d+)-.+")
    root = Path(tempfile.gettempdir())
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        try:
            mine = entry.is_dir() and not entry.is_symlink() and entry.stat().st_uid == os.getuid()
        except OSError:
            continue
        if match and mine and not pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _main(settings_path: str, record_path: str, parent: str) -> int:
    die_with_parent(int(parent))
    from memprof.errors import UsageError
    from memprof.measure.runner import measure

    settings = Settings(**json.loads(Path(settings_path).read_text()))
    try:
        record = measure(settings)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    runfile.write(record_path, [record])
    return 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:4]))
