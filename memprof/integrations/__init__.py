"""memprof inside other trainers' loops: a callback measures a window of training steps and writes the record.

``memprof.integrations.huggingface.MemprofCallback`` (a ``transformers.TrainerCallback``) and
``memprof.integrations.lightning.MemprofCallback`` (a Lightning ``Callback``) both hand the trainer's model to
``memprof.measure.tracked.Track`` when training starts; the optimizers are found by torch's global step hooks
(the trainer's wrappers, accelerate's and Lightning's, step the torch optimizer inside). The record is written
(JSON for a ``.json`` path, the tidy CSV otherwise; what ``memprof report`` and ``memprof check`` read) as soon
as the window closes, or when training ends. Only the first process of a distributed run writes.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memprof.errors import UsageError

if TYPE_CHECKING:
    from memprof.measure.tracked import Track
    from memprof.record import RunRecord


class TrackedWindow:
    """The window a callback measures: ``steps`` training steps after ``skip``, written to ``output``."""

    def __init__(self, steps: int, skip: int, output: str | Path) -> None:
        from memprof.files import check_writable
        from memprof.measure.tracked import _check

        _check(None, None, steps, skip)
        if not isinstance(output, (str, Path)):
            raise UsageError(f"MemprofCallback: output must be a file path, got {type(output).__name__}")
        check_writable([("output", Path(output))])
        self.steps, self.skip, self.output = steps, skip, Path(output)
        self.record: RunRecord | None = None
        self._track: Track | None = None

    def start(self, model: Any, *, writes: bool) -> None:
        """Begin tracking (training begins); ``writes``: this process writes the record."""
        from memprof.measure.tracked import Track

        self._writes = writes
        self._track = Track(model, steps=self.steps, skip=self.skip, on_close=self._write)
        self._track.__enter__()

    def finish(self, exc: BaseException | None = None) -> None:
        """Stop tracking (training ended, or raised ``exc``): write the record if it is not written yet. Fewer
        steps than the window asks for is a warning (one line), not a failure of the training."""
        track, self._track = self._track, None
        if track is None:
            return
        try:
            track.__exit__(type(exc) if exc else None, exc, None)
        except UsageError as error:
            warnings.warn(f"memprof: nothing written to {self.output}: {error}", stacklevel=2)
            return
        if track.record is not None and self.record is None:
            self._write(track.record)

    def _write(self, record: RunRecord) -> None:
        from memprof import runfile

        self.record = record
        if self._writes:
            runfile.write(self.output, [record])
