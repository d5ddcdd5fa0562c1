"""memprof's exceptions. The CLI maps them to exit codes in one place (``memprof.cli.main``)."""

from __future__ import annotations


class MemprofError(Exception):
    """Base class for every error memprof raises on purpose."""

    exit_code = 1


class UsageError(MemprofError):
    """Bad input from the user: unknown model or optimizer, bad hyperparameter, missing device."""

    exit_code = 2


class CaptureFailedError(MemprofError):
    """A measurement child crashed without producing a run record."""

    exit_code = 3


def closest(word: str, choices: list[str] | tuple[str, ...], n: int = 3) -> str:
    """A short 'did you mean' phrase naming the closest valid choices."""
    import difflib

    near = difflib.get_close_matches(word, choices, n=n, cutoff=0.4)
    picks = near or list(choices)[:n + 3]
    more = "" if near or len(choices) <= len(picks) else ", …"
    return ", ".join(picks) + more
