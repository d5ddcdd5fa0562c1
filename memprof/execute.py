"""Where each run executes: the one place that plans a request and chooses how each optimizer is measured.

``plan`` checks a request once (settings, model name, every optimizer spec built on a tiny layer, the device)
and says what to measure; ``run`` measures a plan. Each optimizer runs here, in a child process
(``memprof.measure.isolation``, the CUDA default), on real ranks (``memprof.distributed.launch``), on ranks
simulated here (an estimate with ``--parallel``), through shallow probes of a deep model
(``memprof.measure.depth``), or, for several estimates, in forked workers. A crash outside the training steps
becomes a failed record here, never an exception.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from memprof.errors import MemprofError, UsageError, closest, describe, out_of_memory
from memprof.record import RunRecord
from memprof.settings import Settings, declared_fields

ESTIMATE_DEFAULTS = {"device": "cuda", "steps": 2}
"""An estimate's settings where the caller gives none: a GPU run's, on the two steps that put its state live."""


# -- checking a request ------------------------------------------------------------------------------------
def expect(name: str, value: Any, kinds: type | tuple[type, ...], what: str) -> None:
    """A wrong argument type from a Python caller is a usage error, like a bad option."""
    if not isinstance(value, kinds):
        raise UsageError(f"{name} must be {what}, got {type(value).__name__} {value!r}")


def text_list(name: str, value: Any, what: str = "a list of strings") -> list[str]:
    """A sequence of strings (not one string, which would be read letter by letter)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    return list(value)


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when a GPU is present, else 'cpu'; 'cuda' without one is a usage error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return device


def command_line() -> str:
    """The command this process was started with, as the user typed it (``memprof …`` for the CLI)."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return " ".join([program if program != "__main__.py" else "python -m memprof", *map(shlex.quote, sys.argv[1:])])


def spec_texts(specs: Any) -> list[str]:
    """The spec texts of ``"adam,sgd"`` or ``["adam", "sgd"]``."""
    from memprof.optim.registry import split_specs

    return split_specs(specs) if isinstance(specs, str) else text_list(
        "optimizers", specs, "comma-separated specs or a list of them")


def validate_optimizers(specs: str | Sequence[str], *, built: Sequence[str] = ()) -> list[str]:
    """Parse every spec and build each once on a tiny layer (except those in ``built``, built before), so bad
    input fails before measuring."""
    import torch

    from memprof.optim.registry import build_optimizer, parse_specs

    texts = spec_texts(specs)
    for spec in parse_specs(",".join(texts)):
        if spec.entry.requires is None and spec.text not in built:
            build_optimizer(spec, torch.nn.Sequential(torch.nn.Linear(4, 4)))
    return texts


def checked_settings(model: str, values: dict[str, Any]) -> Settings:
    """The run's settings (optimizer fields left empty), validated; unknown names are usage errors."""
    valid = [f.name for f in declared_fields() if f.name not in ("model", "optimizer", "spec")]
    for name in values:
        if name not in valid:
            raise UsageError(f"unknown setting {name!r}; closest: {closest(name, valid)}")
    settings = Settings(model=model, spec="", **values)
    from memprof.models import check_model_name

    check_model_name(model)
    return settings


def data_ranges(texts: list[str]) -> list[tuple[str, str | None]]:
    """Each spec with the note its record gets: an optimizer whose state depends on the data (its entry's
    ``upper_bound``) is two, the lower and the upper end of its range."""
    from memprof.optim.registry import parse_spec

    expanded: list[tuple[str, str | None]] = []
    for text in texts:
        upper = parse_spec(text).entry.upper_bound
        if not upper:
            expanded.append((text, None))
            continue
        extra = ":".join(f"{k}={v}" for k, v in upper.items())
        name, *pairs = text.split(":")  # the upper end's values replace the user's (a key is given once)
        upper_text = ":".join([name, *(p for p in pairs if p.partition("=")[0].strip() not in upper), extra])
        expanded += [(text, f"lower end of a data-dependent range: {text} at its initial state sizes"),
                     (upper_text, f"upper end of a data-dependent range: {text} with {extra}")]
    return expanded


@dataclass(frozen=True)
class Plan:
    """A checked request: the settings of each run (one per spec, and per rank of an estimate with
    ``--all-ranks``; device resolved), whether each runs in a child process, whether they are distributed, and
    the note each run's record gets (or None)."""

    runs: list[Settings]
    isolate: bool
    distributed: bool
    notes: list[str | None] = field(default_factory=list)


def plan(model: Any, optimizers: Any, settings: dict[str, Any], *, isolate: Any = None,
         ranges: bool = False) -> Plan:
    """Every check before measuring, once: ``UsageError`` on bad input. With ``ranges`` (an estimate), a
    data-dependent optimizer is planned as the two ends of its range (``data_ranges``)."""
    from memprof.distributed import launch
    from memprof.optim.registry import parse_spec

    given = validate_optimizers(optimizers) if ranges else []
    expect("model", model, str, "a model name or path (text)")
    expect("isolate", isolate, (bool, type(None)), "True, False or None")
    base = checked_settings(model, settings)
    expanded = data_ranges(given) if ranges else [(text, None) for text in validate_optimizers(optimizers)]
    texts = [text for text, _ in expanded]
    if ranges:  # the upper ends, and every spec told apart from the others
        validate_optimizers(texts, built=given)
    # An estimate needs no GPU: its target is CUDA unless it says cpu.
    device = ("cuda" if base.device == "auto" else base.device) if base.estimate else resolve_device(base.device)
    isolate = device.startswith("cuda") and not base.estimate if isolate is None else isolate
    distributed = launch.requested(base)
    if distributed:
        base = launch.check(base.replace(device=device))
    runs, notes = [], []
    for text, note in expanded:
        spec = parse_spec(text)
        if spec.entry.requires == "cuda" and not device.startswith("cuda"):
            raise UsageError(f"optimizer {spec.name} runs only on CUDA; use --device cuda")
        for rank in simulated_ranks(base):
            runs.append(base.replace(optimizer=spec.name, spec=text, device=device, rank=rank,
                                     snapshot=snapshot_path(base.snapshot, text, len(texts))))
            notes.append(note)
    return Plan(runs, isolate, distributed, notes)


def simulated_ranks(settings: Settings) -> range:
    """The ranks an estimate simulates: every rank of its world with ``--all-ranks``, else the one it names."""
    if not settings.all_ranks:
        return range(settings.rank, settings.rank + 1)
    if settings.rank != 0:
        raise UsageError(f"--all-ranks simulates every rank of --world-size {settings.nproc}: drop --rank "
                         f"{settings.rank} (or drop --all-ranks to simulate rank {settings.rank} alone)")
    return range(settings.nproc)


def snapshot_path(snapshot: str | None, spec: str, count: int) -> str | None:
    if snapshot is None or count == 1:
        return snapshot
    path = Path(snapshot)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in spec)
    return str(path.with_name(f"{path.stem}-{safe}{path.suffix or '.pickle'}"))


# -- measuring a plan --------------------------------------------------------------------------------------
def run(planned: Plan, *, on_start: Callable[[Settings], None] | None = None,
        on_result: Callable[[RunRecord], None] | None = None) -> list[RunRecord]:
    """Measure each run of ``planned``, in order: one record per optimizer (per rank), each stamped with the
    command that asked for it. Notes are added once every run is measured."""
    command = command_line()
    records = []
    with _estimating_in_parallel(planned.runs, planned.distributed) as forked:
        for settings in planned.runs:
            if on_start:
                on_start(settings)
            batch = forked.records(settings) if forked else _records_of(settings, planned.isolate, planned.distributed)
            for record in batch:
                record.environment["command"] = command
                records.append(record)
                if on_result:
                    on_result(record)
    for record, note in zip(records, planned.notes):
        if note:
            record.notes.append(note)
    return records


def estimate(model: Any, optimizers: Any, settings: dict[str, Any], *,
             on_start: Callable[[Settings], None] | None = None,
             on_result: Callable[[RunRecord], None] | None = None) -> list[RunRecord]:
    """Each optimizer estimated on fake tensors, a data-dependent one as the two ends of its range."""
    planned = plan(model, optimizers, {**ESTIMATE_DEFAULTS, **settings, "estimate": True}, isolate=False,
                   ranges=True)
    return run(planned, on_start=on_start, on_result=on_result)


def _records_of(settings: Settings, isolate: bool, distributed: bool,
                measure: Callable[[Settings], RunRecord] | None = None) -> list[RunRecord]:
    """One optimizer's records (one per rank for a distributed run); ``measure``: how a run (an estimate's
    probe) is measured (default: here, now)."""
    if distributed:
        from memprof.distributed import launch

        return launch.measure(settings)
    refused = _refused(settings)
    if refused is not None:
        return [refused]
    if isolate:
        from memprof.measure.isolation import measure_in_child

        return [measure_in_child(settings)]
    return [_measure_here(settings, measure or _run_here)]


def _refused(settings: Settings) -> RunRecord | None:
    """The failed row of an optimizer that cannot be estimated, else None."""
    from memprof.optim.registry import parse_spec

    spec = parse_spec(settings.spec)
    if settings.estimate and spec.entry.requires == "cuda" and spec.entry.analytic is None:
        return RunRecord.failed(settings, f"cannot estimate: {spec.name} runs only in {spec.entry.source}'s CUDA "
                                          "kernels, which have no fake-tensor implementation")
    return None


def _measure_here(settings: Settings, measure: Callable[[Settings], RunRecord]) -> RunRecord:
    """``measure(settings)``, for an estimate through shallow probes of a deep model (``memprof.measure.depth``)."""
    if settings.estimate:
        from memprof.measure import depth

        return depth.estimate(settings, measure)
    return measure(settings)


def _run_here(settings: Settings) -> RunRecord:
    """The runner in this process. A crash outside its training steps (the model or the optimizer failing
    to allocate, or failing to build) is a row too, as a crashed child's is."""
    from memprof.measure.runner import measure as measure_here

    try:
        return measure_here(settings)
    except MemprofError:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a crash is a result
        if out_of_memory(exc):
            return RunRecord.failed(settings, f"OOM outside the training steps: {describe(exc)}", status="oom")
        return _died(settings, describe(exc))


def _died(settings: Settings, why: str) -> RunRecord:
    return RunRecord.failed(settings, f"failed outside the training steps: {why}")


# -- estimates in forked workers ---------------------------------------------------------------------------
@contextlib.contextmanager
def _estimating_in_parallel(runs: list[Settings], distributed: bool) -> Iterator[_ForkedEstimates | None]:
    """The runs' estimates in forked processes (``forked_pool``); None where runs are measured in order
    here: a real measurement or a single run."""
    with forked_pool(len(runs) >= 2 and all(r.estimate for r in runs), len(runs)) as pool:
        if pool is None:
            yield None
            return
        forked = _ForkedEstimates(pool, distributed)
        for settings in runs:
            forked.start(settings)
        try:
            yield forked
        finally:
            forked.cancel()


@contextlib.contextmanager
def forked_pool(wanted: bool, jobs: int) -> Iterator[Any]:
    """Forked processes, as many at once as CPU cores, for independent estimates (an estimate allocates
    nothing and shares nothing with another; ``memprof.forked``); None where not ``wanted``, on one core, on
    a system without ``fork``, or where this process has trained. Leaving it (done, or stopped by a signal
    or an error) kills every process still running."""
    from memprof.measure import runner  # imported once here, inherited by every worker

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    # A process that ran a backward pass cannot fork one that runs another (torch's autograd threads).
    if not wanted or cores < 2 or sys.platform != "linux" or runner.trained_here:
        yield None
        return
    from memprof.forked import ForkedJobs

    pool = ForkedJobs(min(cores, jobs))
    try:
        yield pool
    finally:
        pool.close()


class _ForkedEstimates:
    """Estimates measured by a pool of forked workers: each of a deep model's probes is a job of its own
    (``depth.first_measurements``, all started ahead, so the workers stay evenly busy); a distributed run is
    one job. A job whose process died gives a failed row; the others are not touched."""

    def __init__(self, pool, distributed: bool) -> None:
        self.pool, self.distributed = pool, distributed
        self.futures: dict[Settings, Any] = {}

    def start(self, settings: Settings) -> None:
        from memprof.measure import depth

        if self.distributed:
            self.futures[settings] = self.pool.submit(_records_of, settings, False, True)
        elif _refused(settings) is None:
            for measured in depth.first_measurements(settings):
                if measured not in self.futures:
                    self.futures[measured] = self.pool.submit(_run_here, measured)

    def records(self, settings: Settings) -> list[RunRecord]:
        if self.distributed:
            return from_worker(self.futures.pop(settings), here=lambda: _records_of(settings, False, True),
                               died=lambda why: [_died(settings, why)])
        return _records_of(settings, False, False, measure=self._measure)

    def _measure(self, measured: Settings) -> RunRecord:
        if measured not in self.futures:  # a later set of probes (the first was not affine)
            self.futures[measured] = self.pool.submit(_run_here, measured)
        return from_worker(self.futures.pop(measured), here=lambda: _run_here(measured),
                           died=lambda why: _died(measured, why))

    def cancel(self) -> None:
        for future in self.futures.values():
            future.cancel()


def from_worker(future, *, here: Callable[[], Any], died: Callable[[str], Any],
                records: Callable[[Any], list[RunRecord]] | None = None) -> Any:
    """A forked job's result (a record, a list of them, or what ``records`` reads them from); ``died(why)``
    where its process died, ``here()`` where the job met this process's autograd threads (the user ran a
    backward pass here)."""
    from memprof.forked import WorkerDied

    try:
        result = future.result()
    except WorkerDied as exc:
        return died(str(exc))
    measured = records(result) if records else result if isinstance(result, list) else [result]
    if any("Autograd-and-Fork" in (r.failure or "") for r in measured):
        return here()  # the user's own: estimate it here
    return result
