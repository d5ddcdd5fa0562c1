"""Files memprof writes: checked before any measuring, then written all or none.

``write_all`` stages every regular file in a temporary file beside it (written and fsynced), and
only when all are staged renames them into place; a failure anywhere removes every temporary and
leaves the files that were there untouched (a rename that fails after others succeeded puts those
back). A replaced file keeps its mode (a new file gets the mode the umask allows, as ``open`` would
give it); a symlink is written through (its target is replaced, the link kept). What is not a regular
file (``/dev/stdout``, a FIFO, a device node) is written to directly, after the others are staged:
``--csv /dev/stdout`` streams. A temporary file is named ``.<name>.<pid>.<random>.tmp``, the name
shortened to keep it within the file system's limit; one left by a process that no longer runs
(killed inside the write window) is removed by the next write to the same file.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Sequence

from memprof.errors import OutputsNotWritten, UsageError

RANDOM_CHARS = 8
"""Length of the random part of a temporary file's name."""
PID_CHARS = 10
"""Room kept for the process id in a temporary file's name (a 32-bit pid), so that every process
shortens a long name alike and finds the temporaries a dead one left."""


@dataclass
class _Staged:
    """A regular file's new content, written to ``temporary`` beside ``target``."""

    shown: Path  # the path as the user gave it
    target: Path  # where the content goes: the path with its symlinks resolved
    temporary: Path | None = None
    backup: Path | None = None  # a hard link to the old file while the renames run
    placed: bool = False
    made: list[Path] | None = None  # the folders made for it, deepest first


def write_atomic(path: str | Path, content: str | bytes) -> None:
    """Write ``content`` (text, as UTF-8, or bytes) to ``path`` (see the module docstring)."""
    write_all([(path, content)])


def write_all(outputs: Sequence[tuple[str | Path, str | bytes]]) -> None:
    """Write every ``(path, content)``, or change none of the files: see the module docstring.
    Raises ``OutputsNotWritten`` naming the file and the reason when one cannot be written."""
    staged: list[tuple[_Staged, str | bytes]] = []
    streams: list[tuple[Path, os.stat_result, str | bytes]] = []
    current: Path | None = None
    try:
        for current, content in ((Path(p), c) for p, c in outputs):
            info = _stat_or_none(current)
            if info is not None and (_standard_stream(info) is not None or not stat.S_ISREG(info.st_mode)):
                streams.append((current, info, content))
            else:
                staged.append((_Staged(current, Path(os.path.realpath(current))), content))
        for entry, content in staged:
            current = entry.shown
            _stage(entry, _bytes(content))
        for current, info, content in streams:
            _write_through(current, info, content)
        current = None
        _commit([entry for entry, _ in staged])
    except BaseException as exc:
        _discard([entry for entry, _ in staged])
        if not isinstance(exc, OSError):
            raise
        where = current if current is not None else exc.filename
        raise OutputsNotWritten(f"cannot write {where}: {exc.strerror or exc}; no output file was changed") from exc
    finally:
        for entry, _ in staged:
            _remove(entry.backup)


def _discard(entries: list[_Staged]) -> None:
    """Remove what staging left: the temporaries, then the folders made for them that stayed empty."""
    for entry in entries:
        _remove(entry.temporary)
    for entry in entries:
        for folder in entry.made or ():
            try:
                os.rmdir(folder)
            except OSError:
                pass


def _bytes(content: str | bytes) -> bytes:
    return content if isinstance(content, bytes) else content.encode("utf-8", "surrogateescape")


def _stage(entry: _Staged, data: bytes) -> None:
    """Write ``data`` to a new temporary file beside the target, with the target's mode, and fsync it."""
    entry.made = [folder for folder in (entry.target.parent, *entry.target.parent.parents) if not folder.exists()]
    entry.target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(entry.target)
    fd, entry.temporary = _create_temporary(entry.target)
    try:
        os.fchmod(fd, _mode(entry.target))
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(entries: list[_Staged]) -> None:
    """Rename every temporary over its target; if one rename fails, put back what the others replaced.
    Each old file is kept as a hard link while the renames run; a file that cannot be linked (a file
    system without hard links, an immutable file) is renamed last, so that its failure undoes the rest."""
    for entry in entries:
        if os.path.lexists(entry.target):
            try:
                entry.backup = _link_beside(entry.target)
            except OSError:
                entry.backup = None
    order = sorted(entries, key=lambda e: e.backup is None and os.path.lexists(e.target))
    try:
        for entry in order:
            os.replace(entry.temporary, entry.target)
            entry.temporary, entry.placed = None, True
    except BaseException as exc:  # Ctrl-C or SIGTERM between two renames undoes them too
        failed = next(e for e in order if not e.placed)
        for entry in reversed([e for e in order if e.placed]):
            _put_back(entry)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror, str(failed.shown)) from exc
        raise


def _put_back(entry: _Staged) -> None:
    """Undo one rename: the old file back in place (or the new one removed where none was)."""
    try:
        if entry.backup is not None:
            os.replace(entry.backup, entry.target)
            entry.backup = None
        else:
            os.unlink(entry.target)
    except OSError:
        pass


def _short_name(target: Path) -> str:
    """The target's name as its temporaries carry it: shortened so that ``.<name>.<pid>.<random>.tmp``
    fits the folder's limit on a name's length."""
    room = _name_max(target.parent) - len("...tmp") - PID_CHARS - RANDOM_CHARS
    name = target.name
    while len(os.fsencode(name)) > max(room, 1):
        name = name[:-1]
    return name


def _temporary_name(target: Path) -> Path:
    """A fresh temporary file's path beside ``target``."""
    random = secrets.token_hex(RANDOM_CHARS // 2)
    return target.parent / f".{_short_name(target)}.{os.getpid()}.{random}.tmp"


def _create_temporary(target: Path) -> tuple[int, Path]:
    """A new, empty temporary file beside ``target``, opened for writing."""
    while True:
        path = _temporary_name(target)
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600), path
        except FileExistsError:
            continue


def _link_beside(target: Path) -> Path:
    """A new hard link to ``target``, named as a temporary file beside it."""
    while True:
        path = _temporary_name(target)
        try:
            os.link(target, path)
            return path
        except FileExistsError:
            continue


def _name_max(folder: Path) -> int:
    """The longest file name (in bytes) the file system of ``folder``, or its nearest existing parent, takes."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _remove(path: Path | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


def check_writable(outputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """Raise ``UsageError`` unless every ``(option, path)`` can be written: not a folder, in a
    folder that exists (or can be made) and takes a new file beside it (the temporary), a file
    name the file system takes, an existing file that can be replaced, and no path named twice."""
    seen: dict[str, str] = {}
    for option, path in outputs:
        if path is None:
            continue
        path = Path(path)
        problem = _write_problem(path)
        if problem:
            raise UsageError(f"{option} {path}: {problem}")
        key, info = os.path.realpath(path), _stat_or_none(path)
        if key in seen and (info is None or stat.S_ISREG(info.st_mode)):
            raise UsageError(f"{seen[key]} and {option} both write {path}; give each its own file")
        seen[key] = option


def _write_problem(path: Path) -> str | None:
    try:
        info = _stat_or_none(path)
    except OSError as exc:
        return f"cannot be written ({exc.strerror})"
    if info is not None and stat.S_ISDIR(info.st_mode):
        return "is a folder; give a file path"
    if info is not None and not stat.S_ISREG(info.st_mode):
        return None if os.access(path, os.W_OK) else "cannot be written (permission denied)"
    target = Path(os.path.realpath(path))
    folder = target.parent
    while not folder.exists():  # write_all makes missing folders
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"folder {folder} is not writable"
    if len(os.fsencode(target.name)) > _name_max(folder):
        return f"the file name is too long ({len(os.fsencode(target.name))} bytes; at most {_name_max(folder)})"
    if info is not None and _immutable(target):
        return "the file is immutable or append-only (chattr +i/+a); it cannot be replaced"
    if folder == target.parent:
        return _probe(target)
    return None


def _probe(target: Path) -> str | None:
    """Create and remove a temporary file beside ``target``: None, or why that fails."""
    try:
        fd, temporary = _create_temporary(target)
    except OSError as exc:
        return f"cannot create a file in {target.parent} ({exc.strerror or exc})"
    os.close(fd)
    _remove(temporary)
    return None


def _immutable(target: Path) -> bool:
    """Whether the file has Linux's immutable or append-only attribute (a rename over it fails)."""
    try:
        import fcntl
        import struct

        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (ImportError, OSError):
        return False
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, 0x80086601, struct.pack("i", 0)))[0]  # FS_IOC_GETFLAGS
    except OSError:  # a file system without attributes
        return False
    finally:
        os.close(fd)
    return bool(flags & (0x10 | 0x20))  # FS_IMMUTABLE_FL, FS_APPEND_FL


def _stat_or_none(path: Path) -> os.stat_result | None:
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
        with open(path, "wb") as handle:
            handle.write(_bytes(content))
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
    """Remove the temporaries beside ``target`` (``.<name>.<pid>.*.tmp``) whose process no longer runs."""
    pattern = re.compile(rf"\.{re.escape(_short_name(target))}\.(\d+)\.[^.]+\.tmp")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match and not pid_alive(int(match.group(1))):
            _remove(target.parent / name)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
