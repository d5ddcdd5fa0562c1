"""Files memprof writes: checked before any measuring, then written atomically.

A regular file is written to a temporary file in the same folder and renamed over the old one,
with the old file's mode (a new file gets the mode the umask allows, as ``open`` would give it).
A symlink is written through (its target is replaced, the link kept). What is not a regular file
(``/dev/stdout``, a FIFO, a device node) is written to directly: ``--csv /dev/stdout`` streams.
A temporary file names the process that made it; one left by a process that no longer runs
(killed inside the write window) is removed by the next write to the same file.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import tempfile
from pathlib import Path
from typing import IO, Iterable

from memprof.errors import UsageError


def write_atomic(path: str | Path, content: str | bytes) -> None:
    """Write ``content`` (text or bytes) to ``path`` (see the module docstring)."""
    path = Path(path)
    info = _stat(path)
    if info is not None and (_standard_stream(info) is not None or not stat.S_ISREG(info.st_mode)):
        _write_through(path, info, content)
        return
    target = Path(os.path.realpath(path))  # a symlink: replace its target, keep the link
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, _mode(target))
        handle = os.fdopen(fd, "wb") if isinstance(content, bytes) else os.fdopen(fd, "w", newline="")
        with handle:
            handle.write(content)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def check_writable(outputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """Raise ``UsageError`` unless every ``(option, path)`` can be written: not a folder, in a
    folder that exists (or can be made) and is writable, and no path named twice."""
    seen: dict[str, str] = {}
    for option, path in outputs:
        if path is None:
            continue
        path = Path(path)
        problem = _write_problem(path)
        if problem:
            raise UsageError(f"{option} {path}: {problem}")
        key, info = os.path.realpath(path), _stat(path)
        if key in seen and (info is None or stat.S_ISREG(info.st_mode)):
            raise UsageError(f"{seen[key]} and {option} both write {path}; give each its own file")
        seen[key] = option


def _write_problem(path: Path) -> str | None:
    try:
        info = _stat(path)
    except OSError as exc:
        return f"cannot be written ({exc.strerror})"
    if info is not None and stat.S_ISDIR(info.st_mode):
        return "is a folder; give a file path"
    if info is not None and not stat.S_ISREG(info.st_mode):
        return None if os.access(path, os.W_OK) else "cannot be written (permission denied)"
    folder = Path(os.path.realpath(path)).parent
    while not folder.exists():  # write_atomic makes missing folders
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {folder} is not writable"
    return None


def _stat(path: Path) -> os.stat_result | None:
    """``os.stat`` through links; None when nothing is there."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _standard_stream(info: os.stat_result) -> IO[str] | None:
    """This process's stdout or stderr when ``info`` is the file it writes to (``/dev/stdout``)."""
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        try:
            if os.path.samestat(info, os.fstat(fd)):
                return stream
        except OSError:
            continue
    return None


def _write_through(path: Path, info: os.stat_result, content: str | bytes) -> None:
    """Write to what is not a regular file: stdout or stderr through the open stream (nothing
    printed before is lost or overwritten), a FIFO or a device node by opening it."""
    stream = _standard_stream(info)
    if stream is None:
        with open(path, "wb" if isinstance(content, bytes) else "w", newline="") as handle:
            handle.write(content)
        return
    stream.flush()
    if isinstance(content, bytes) and hasattr(stream, "buffer"):
        stream.buffer.write(content)
    else:
        stream.write(content.decode("utf-8", "replace") if isinstance(content, bytes) else content)
    stream.flush()


def _mode(target: Path) -> int:
    """The old file's permission bits, or what the umask leaves of 0o666 for a new file."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _remove_stale_temporaries(target: Path) -> None:
    """Remove ``.<name>.<pid>.*.tmp`` beside ``target`` whose process no longer runs."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[^.]+\.tmp")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match and not pid_alive(int(match.group(1))):
            try:
                os.unlink(target.parent / name)
            except OSError:
                pass


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
