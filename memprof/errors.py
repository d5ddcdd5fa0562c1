"""memprof's exceptions. The CLI maps them to exit codes in one place (``memprof.cli.EXIT_CODES``)."""

from __future__ import annotations


class MemprofError(Exception):
    """Base class for every error memprof raises on purpose."""


class UsageError(MemprofError):
    """Bad input from the user: unknown model or optimizer, bad hyperparameter, missing device."""


class GateRegression(MemprofError):
    """``memprof check`` found memory that grew past its tolerance."""


class MeasurementFailed(MemprofError):
    """At least one optimizer crashed or ran out of memory; its row says so, the others were written."""


def closest(word: str, choices: list[str] | tuple[str, ...], n: int = 3) -> str:
    """A short 'did you mean' phrase naming the closest valid choices."""
    import difflib

    near = difflib.get_close_matches(word, choices, n=n, cutoff=0.4)
    picks = near or list(choices)[:n + 3]
    more = "" if near or len(choices) <= len(picks) else ", …"
    return ", ".join(picks) + more
