"""memprof as a Hugging Face ``Trainer`` callback: a few lines measure a window of the Trainer's own steps.

    from memprof.integrations.huggingface import MemprofCallback

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[MemprofCallback(steps=3, skip=1, output="memprof.json")])
    trainer.train()   # memprof.json: the record of steps 2-4, as `memprof compare --json` writes one

``memprof report memprof.json`` shows it; a ``.csv`` output is what ``memprof check`` gates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from memprof.integrations import TrackedWindow


class MemprofCallback(TrainerCallback):
    """Measure ``steps`` training steps after ``skip`` and write their record to ``output`` (``.json`` or
    ``.csv``); ``record`` holds it afterwards. The Trainer's model is the one measured; its optimizer is found
    by torch's global step hooks (accelerate's wrapper steps the torch optimizer inside)."""

    def __init__(self, steps: int = 3, skip: int = 0, output: str | Path = "memprof.json") -> None:
        self.window = TrackedWindow(steps, skip, output)

    @property
    def record(self):
        return self.window.record

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.window.start(model, writes=state.is_world_process_zero)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.window.finish()
