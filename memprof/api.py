"""The Python API: measure optimizers on a model and get run records or a tidy DataFrame.

    >>> import memprof
    >>> df = memprof.compare("gpt2", "smmf,adam", device="cpu", steps=2)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from memprof.errors import UsageError
from memprof.record import RunRecord, Settings

if TYPE_CHECKING:
    import pandas as pd


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when a GPU is present, else 'cpu'; 'cuda' without one is a usage error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or auto")
        return device
    if device != "cpu":
        raise UsageError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device


def _check_settings(model: str, dtype: str, amp: str | None) -> None:
    from memprof.measure.runner import AMP
    from memprof.models import check_model_name
    from memprof.models.base import DTYPES

    check_model_name(model)
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose {', '.join(DTYPES)}")
    if amp is not None and amp not in AMP:
        raise UsageError(f"unknown --amp {amp!r}; choose {', '.join(AMP)}")


def _validate_optimizers(specs: str | Sequence[str]) -> list[str]:
    """Parse every spec and build each once on a tiny layer, so bad input fails before measuring."""
    import torch

    from memprof.optim.registry import build_optimizer, parse_specs, split_specs

    texts = split_specs(specs) if isinstance(specs, str) else list(specs)
    for spec in parse_specs(",".join(texts)):
        if spec.entry.requires is None:
            build_optimizer(spec, torch.nn.Sequential(torch.nn.Linear(4, 4)))
    return texts


def measure(
    model: str,
    optimizers: str | Sequence[str],
    *,
    device: str = "auto",
    dtype: str = "float32",
    amp: str | None = None,
    batch_size: int = 2,
    seq_len: int = 128,
    image_size: int = 224,
    num_classes: int | None = None,
    steps: int = 3,
    seed: int = 0,
    isolate: bool | None = None,
    timeline: bool = True,
    snapshot: str | None = None,
    on_start: Callable[[Settings], None] | None = None,
    on_result: Callable[[RunRecord], None] | None = None,
) -> list[RunRecord]:
    """Measure each optimizer on ``model``; one run record per optimizer, in order.

    On CUDA each optimizer runs in its own child process (``isolate`` defaults to True there).
    An optimizer that runs out of memory yields a record with ``status == "oom"``.
    """
    if steps < 1:
        raise UsageError("--steps must be at least 1")
    _check_settings(model, dtype, amp)
    texts = _validate_optimizers(optimizers)
    device = resolve_device(device)
    isolate = device.startswith("cuda") if isolate is None else isolate
    from memprof.optim.registry import parse_spec

    records = []
    for text in texts:
        spec = parse_spec(text)
        if spec.entry.requires == "cuda" and not device.startswith("cuda"):
            raise UsageError(f"optimizer {spec.name} runs only on CUDA; use --device cuda")
        settings = Settings(
            model=model,
            optimizer=spec.name,
            spec=text,
            device=device,
            dtype=dtype,
            amp=amp,
            batch_size=batch_size,
            seq_len=seq_len,
            image_size=image_size,
            num_classes=num_classes,
            steps=steps,
            seed=seed,
            timeline=timeline,
            snapshot=_snapshot_path(snapshot, text, len(texts)),
        )
        if on_start:
            on_start(settings)
        if isolate:
            from memprof.measure.isolation import measure_in_child

            record = measure_in_child(settings)
        else:
            from memprof.measure.runner import measure as measure_here

            record = measure_here(settings)
        records.append(record)
        if on_result:
            on_result(record)
    return records


def _snapshot_path(snapshot: str | None, spec: str, count: int) -> str | None:
    if snapshot is None or count == 1:
        return snapshot
    from pathlib import Path

    path = Path(snapshot)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in spec)
    return str(path.with_name(f"{path.stem}-{safe}{path.suffix or '.pickle'}"))


def compare(model: str, optimizers: str | Sequence[str], **kwargs) -> "pd.DataFrame":
    """Measure and return the tidy long table (one row per record, category, component)."""
    from memprof.report.export import records_to_frame

    return records_to_frame(measure(model, optimizers, **kwargs))


def profile(model: str, optimizer: str, **kwargs) -> RunRecord:
    """Measure one optimizer in depth; the record carries the per-parameter state table."""
    return measure(model, [optimizer], **kwargs)[0]
