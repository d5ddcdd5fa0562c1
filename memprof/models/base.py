"""The two records every model builder deals in: what was asked for, and what was built.

Kept free of heavy imports (torch only for type checking) so that ``memprof models`` starts fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager

from memprof.errors import UsageError

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")
SEED = 0  # for the weights and for the example batches (drawn on the CPU: the same on every device)


@dataclass(frozen=True)
class ModelOptions:
    """Sizes of the example batch and the dtype the weights are cast to."""

    batch_size: int = 2
    seq_len: int = 128  # text models
    image_size: int = 224  # vision models
    num_classes: int | None = None  # vision models: None = the model's default (1000); text: ignored
    dtype: str = "float32"  # "float32" | "bfloat16" | "float16"; weights are cast to it
    blocks: int | None = None  # text models: only the first this many repeated blocks (a depth probe's; None: all)
    lora: str | None = None  # LoRA adapters (memprof.lora's text), injected after the build (memprof.models.lora)

    @classmethod
    def of(cls, settings: Any) -> "ModelOptions":
        """The options a run's settings give (``memprof.settings.Settings``, or a depth probe's, which adds
        ``blocks``), taken by field name."""
        given = {f.name for f in dataclasses.fields(settings)}
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls) if f.name in given})

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"Invalid {name}: {value} (must be a positive integer)")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise UsageError(f"Invalid num_classes: {self.num_classes} (must be a positive integer or None)")
        if self.dtype not in DTYPES:
            raise UsageError(f"Invalid dtype: {self.dtype!r} (choose one of {', '.join(DTYPES)})")

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)


@dataclass
class BuiltModel:
    """A model ready to train: ``loss(model, batch)`` returns the scalar training loss."""

    name: str
    family: str  # "gpt2", "llama", "bert", "roberta", "t5", "albert", "torchvision", "hf-config", "user"
    model: torch.nn.Module  # on the requested device, in the requested dtype, train() mode
    batch: dict[str, torch.Tensor]  # on the device; the inputs AND labels
    loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable record of what was built
    notes: list[str] = field(default_factory=list)  # what the run record should say about how it was built


def parameter_count(model: torch.nn.Module) -> int:
    """Elements in the model's parameters, each shared (tied) parameter counted once; a quantized layer
    (``memprof.models.quant``) counts the weights it stands for, not its codes and scales."""
    from memprof.taxonomy import QUANT_PREFIX

    stored = sum(p.numel() for n, p in model.named_parameters() if not n.rpartition(".")[2].startswith(QUANT_PREFIX))
    return stored + sum(getattr(m, "quantized_numel", 0) for m in model.modules())


def move_batch(batch: dict[str, torch.Tensor], device: torch.device,
               float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The batch on ``device`` (floating tensors cast to ``float_dtype`` if given).

    A tensor that appears under two keys (causal-LM ``labels`` is ``input_ids``) stays one tensor.
    """
    moved: dict[int, torch.Tensor] = {}
    for value in batch.values():
        if id(value) not in moved:
            dtype = float_dtype if float_dtype is not None and value.is_floating_point() else value.dtype
            moved[id(value)] = value.to(device=device, dtype=dtype)
    return {key: moved[id(value)] for key, value in batch.items()}


def outside_dispatch_modes(enabled: bool = True) -> ContextManager:
    """Set aside the dispatch modes (an estimate's ``FakeTensorMode``, the trackers) while a model is built
    on the meta device: its tensors stay plain meta tensors, which hold no memory and which no tracker counts
    (``memprof.models.build_model(weights_on_meta=True)``)."""
    import contextlib

    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes() if enabled else contextlib.nullcontext()


def place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` on ``device`` with floating tensors in ``dtype``, converted only where something
    changes: fake tensors (an estimate) cannot be converted in place, only swapped."""
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.device != device or (t.is_floating_point() and t.dtype != dtype) for t in tensors):
        model.to(device=device, dtype=dtype)
    return model
