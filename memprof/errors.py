"""memprof's exceptions. The CLI maps them to exit codes in one place (``memprof.cli.EXIT_CODES``)."""

from __future__ import annotations

import contextlib
from typing import Iterator


class MemprofError(Exception):
    """Base class for every error memprof raises on purpose."""


class UsageError(MemprofError):
    """Bad input from the user: unknown model or optimizer, bad hyperparameter, missing device."""


class GateRegression(MemprofError):
    """``memprof check`` found memory that grew past its tolerance."""


class MeasurementFailed(MemprofError):
    """At least one optimizer crashed or ran out of memory; its row says so, the others were written."""


class OutputsNotWritten(MemprofError):
    """An output file could not be written (a full disk, a read-only file system, a file-size limit):
    none of the command's output files was changed."""


class ScriptFailed(MemprofError):
    """``memprof run``: the user's script raised (its traceback is shown); ``record`` holds the steps measured
    before it did (status failed), or None where none was."""

    def __init__(self, message: str, record: object = None) -> None:
        super().__init__(message)
        self.record = record


class Terminated(BaseException):
    """The command line was told to stop by a signal (SIGTERM): the whole run ends, not one optimizer's row.
    A ``BaseException`` beside ``KeyboardInterrupt`` (Ctrl-C), so that no handler that turns a crash into a
    row catches it; the command line exits with ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def closest(word: str, choices: list[str] | tuple[str, ...], n: int = 3) -> str:
    """A short 'did you mean' phrase naming the closest valid choices."""
    import difflib

    near = difflib.get_close_matches(word, choices, n=n, cutoff=0.4)
    picks = near or list(choices)[:n + 3]
    more = "" if near or len(choices) <= len(picks) else ", …"
    return ", ".join(picks) + more


def describe(exc: BaseException, *, exit_as_call: bool = True) -> str:
    """An exception in one line: its type and the first line of its message (``sys.exit(n)`` said so,
    unless not ``exit_as_call``: then it is ``SystemExit: n``, as any other exception)."""
    if isinstance(exc, SystemExit) and exit_as_call:
        return f"called sys.exit({exc.code!r})" if exc.code is not None else "called sys.exit()"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: torch's OutOfMemoryError, or the CPU allocator's."""
    return type(exc).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(exc)


@contextlib.contextmanager
def user_code(what: str) -> Iterator[None]:
    """Run code the user owns (a model file, a dotted-path optimizer): any failure in it, an exit
    included, becomes one ``UsageError`` line naming ``what`` and the error. Ctrl-C and running
    out of memory (a result, not bad input) pass through."""
    try:
        yield
    except MemprofError:
        raise
    except (Exception, SystemExit) as exc:
        if out_of_memory(exc):
            raise
        raise UsageError(f"{what} failed: {describe(exc)}") from exc
