"""memprof: where every byte of a training step goes, optimizer state component by component.

The heavy machinery is imported on first use, so ``import memprof`` and ``memprof --help``
stay fast. ``memprof.api.measure`` returns the run records themselves. Bad input raises
``memprof.UsageError``; every error memprof raises on purpose is a ``memprof.MemprofError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memprof._version import __version__  # noqa: F401 - the package's version, read by users
from memprof.errors import GateRegression, MeasurementFailed, MemprofError, UsageError

__all__ = ["compare", "profile", "track", "RunRecord", "MemprofError", "UsageError", "MeasurementFailed", "GateRegression"]

if TYPE_CHECKING:
    from memprof.api import compare, profile
    from memprof.measure.tracked import track
    from memprof.record import RunRecord


def __getattr__(name: str) -> Any:
    if name in ("compare", "profile"):
        from memprof import api

        return getattr(api, name)
    if name == "track":
        from memprof.measure.tracked import track

        return track
    if name == "RunRecord":
        from memprof.record import RunRecord

        return RunRecord
    raise AttributeError(name)
