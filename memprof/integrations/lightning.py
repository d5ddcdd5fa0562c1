"""memprof as a Lightning callback: a few lines measure a window of the Trainer's own steps.

    from memprof.integrations.lightning import MemprofCallback

    trainer = lightning.Trainer(max_steps=10, callbacks=[MemprofCallback(steps=3, skip=1, output="memprof.csv")])
    trainer.fit(module, loader)   # memprof.csv: the record of steps 2-4, which `memprof check` gates

Needs the ``lightning`` package (``pip install memprof-optim[lightning]``); ``pytorch_lightning`` works too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback

from memprof.integrations import TrackedWindow


class MemprofCallback(Callback):
    """Measure ``steps`` training steps after ``skip`` and write their record to ``output`` (``.json`` or
    ``.csv``); ``record`` holds it afterwards. The LightningModule is the model measured; its optimizers are
    found by torch's global step hooks (Lightning's wrapper steps the torch optimizer inside). A training that
    raises writes the steps measured before, with status failed."""

    def __init__(self, steps: int = 3, skip: int = 0, output: str | Path = "memprof.json") -> None:
        self.window = TrackedWindow(steps, skip, output)

    @property
    def record(self):
        return self.window.record

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.window.start(pl_module, writes=trainer.is_global_zero)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.window.finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.window.finish(exception)
