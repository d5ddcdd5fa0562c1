"""The Python API: measure optimizers on a model and get run records or a tidy DataFrame.

    >>> import memprof
    >>> df = memprof.compare("gpt2", "smmf,adam", device="cpu", steps=2)

Settings are the fields of ``memprof.settings.Settings``, passed as keyword arguments. The API
also owns what the command line only parses: merging a config file with command-line options
(``requests``) and checking a run against a baseline, measuring again where needed (``check``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from memprof.errors import MemprofError, UsageError, closest, describe, out_of_memory
from memprof.record import RunRecord
from memprof.settings import (
    Settings,
    config_keys,
    declared_fields,
    group_by_request,
    request_fields,
)

if TYPE_CHECKING:
    import pandas as pd

    from memprof.report.gate import GateResult


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when a GPU is present, else 'cpu'; 'cuda' without one is a usage error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return device


def _expect(name: str, value: Any, kinds: type | tuple[type, ...], what: str) -> None:
    """A wrong argument type from a Python caller is a usage error, like a bad option."""
    if not isinstance(value, kinds):
        raise UsageError(f"{name} must be {what}, got {type(value).__name__} {value!r}")


def _texts(name: str, value: Any, what: str = "a list of strings") -> list[str]:
    """A sequence of strings (not one string, which would be read letter by letter)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    return list(value)


def _spec_texts(specs: Any) -> list[str]:
    """The spec texts of ``"adam,sgd"`` or ``["adam", "sgd"]``."""
    from memprof.optim.registry import split_specs

    return split_specs(specs) if isinstance(specs, str) else _texts(
        "optimizers", specs, "comma-separated specs or a list of them")


def _validate_optimizers(specs: str | Sequence[str]) -> list[str]:
    """Parse every spec and build each once on a tiny layer, so bad input fails before measuring."""
    import torch

    from memprof.optim.registry import build_optimizer, parse_specs

    texts = _spec_texts(specs)
    for spec in parse_specs(",".join(texts)):
        if spec.entry.requires is None:
            build_optimizer(spec, torch.nn.Sequential(torch.nn.Linear(4, 4)))
    return texts


def _settings(model: str, values: dict[str, Any]) -> Settings:
    """The run's settings (optimizer fields left empty), validated; unknown names are usage errors."""
    valid = [f.name for f in declared_fields() if f.name not in ("model", "optimizer", "spec")]
    for name in values:
        if name not in valid:
            raise UsageError(f"unknown setting {name!r}; closest: {closest(name, valid)}")
    settings = Settings(model=model, spec="", **values)
    from memprof.models import check_model_name

    check_model_name(model)
    return settings


def command_line() -> str:
    """The command this process was started with, as the user typed it (``memprof …`` for the CLI)."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return " ".join([program if program != "__main__.py" else "python -m memprof", *map(shlex.quote, sys.argv[1:])])


def measure(
    model: str,
    optimizers: str | Sequence[str],
    *,
    isolate: bool | None = None,
    on_start: Callable[[Settings], None] | None = None,
    on_result: Callable[[RunRecord], None] | None = None,
    **settings: Any,
) -> list[RunRecord]:
    """Measure each optimizer on ``model``; one run record per optimizer (per rank), in order.

    ``settings`` are ``Settings`` fields (``device="cpu"``, ``batch_size=4``…). On CUDA each
    optimizer runs in its own child process (``isolate`` defaults to True there). An optimizer
    that runs out of memory or crashes yields a record with ``status`` "oom" or "failed".
    With ``parallel`` (and ``nproc``) each optimizer runs on that many ranks
    (``memprof.distributed.launch``), one record per rank. Bad input raises ``UsageError``
    before anything is measured (``validate``).
    """
    for name, callback in (("on_start", on_start), ("on_result", on_result)):
        if callback is not None and not callable(callback):
            raise UsageError(f"{name} must be callable, got {type(callback).__name__}")
    runs, isolate, distributed = _plan(model, optimizers, isolate, settings)
    command = command_line()
    records = []
    with _estimating_in_parallel(runs, distributed) as forked:
        for run in runs:
            if on_start:
                on_start(run)
            batch = forked.records(run) if forked else _records_of(run, isolate, distributed)
            for record in batch:
                record.environment["command"] = command
                records.append(record)
                if on_result:
                    on_result(record)
    return records


def _records_of(run: Settings, isolate: bool, distributed: bool,
                measure: Callable[[Settings], RunRecord] | None = None) -> list[RunRecord]:
    """One optimizer's records (one per rank for a distributed run); ``measure``: how a run (an estimate's
    probe) is measured (default: here, now)."""
    if distributed:
        from memprof.distributed import launch

        return launch.measure(run)
    refused = _refused(run)
    if refused is not None:
        return [refused]
    if isolate:
        from memprof.measure.isolation import measure_in_child

        return [measure_in_child(run)]
    return [_measure_here(run, measure or _run_here)]


def _refused(run: Settings) -> RunRecord | None:
    """The failed row of an optimizer that cannot be estimated, else None."""
    from memprof.optim.registry import parse_spec

    spec = parse_spec(run.spec)
    if run.estimate and spec.entry.requires == "cuda" and spec.entry.analytic is None:
        return RunRecord(settings=run, environment={}, status="failed",
                         failure=f"cannot estimate: {spec.name} runs only in {spec.entry.source}'s CUDA "
                                 "kernels, which have no fake-tensor implementation")
    return None


@contextlib.contextmanager
def _estimating_in_parallel(runs: list[Settings], distributed: bool) -> Iterator[_ForkedEstimates | None]:
    """The runs' estimates in forked processes (``_forked_pool``); None where runs are measured in order
    here: a real measurement or a single run."""
    with _forked_pool(len(runs) >= 2 and all(r.estimate for r in runs), len(runs)) as pool:
        if pool is None:
            yield None
            return
        forked = _ForkedEstimates(pool, distributed)
        for run in runs:
            forked.start(run)
        try:
            yield forked
        finally:
            forked.cancel()


@contextlib.contextmanager
def _forked_pool(wanted: bool, jobs: int) -> Iterator[Any]:
    """A pool of forked processes, one per CPU core, for independent estimates (an estimate allocates
    nothing and shares nothing with another); None where not ``wanted``, on one core, on a system
    without ``fork``, or where this process has trained."""
    from memprof.measure import runner  # imported once here, inherited by every worker

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    # A process that ran a backward pass cannot fork one that runs another (torch's autograd threads).
    if not wanted or cores < 2 or sys.platform != "linux" or runner.trained_here:
        yield None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(cores, jobs), mp_context=multiprocessing.get_context("fork")) as pool:
        yield pool


class _ForkedEstimates:
    """Estimates measured by a pool of forked workers: each of a deep model's probes is a job of its own
    (``depth.first_measurements``, all started ahead, so the workers stay evenly busy); a distributed run is
    one job. A worker that died gives a failed row."""

    def __init__(self, pool, distributed: bool) -> None:
        self.pool, self.distributed = pool, distributed
        self.futures: dict[Settings, Any] = {}

    def start(self, run: Settings) -> None:
        from memprof.measure import depth

        if self.distributed:
            self.futures[run] = self.pool.submit(_records_of, run, False, True)
        elif _refused(run) is None:
            for measured in depth.first_measurements(run):
                self.futures.setdefault(measured, self.pool.submit(_run_here, measured))

    def records(self, run: Settings) -> list[RunRecord]:
        if self.distributed:
            return _from_worker(self.futures.pop(run), here=lambda: _records_of(run, False, True),
                                died=lambda why: [_died(run, why)])
        return _records_of(run, False, False, measure=self._measure)

    def _measure(self, measured: Settings) -> RunRecord:
        if measured not in self.futures:  # a later set of probes (the first was not affine)
            self.futures[measured] = self.pool.submit(_run_here, measured)
        return _from_worker(self.futures.pop(measured), here=lambda: _run_here(measured),
                            died=lambda why: _died(measured, why))

    def cancel(self) -> None:
        for future in self.futures.values():
            future.cancel()


def _from_worker(future, *, here: Callable[[], Any], died: Callable[[str], Any]) -> Any:
    """A forked job's result (a record, a list of them or a ``Fit``); ``died(why)`` where its worker died,
    ``here()`` where the job met this process's autograd threads (the user ran a backward pass here)."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        result = future.result()
    except BrokenProcessPool as exc:
        return died(f"the estimating process died ({exc})")
    records = result.estimates if isinstance(result, Fit) else result if isinstance(result, list) else [result]
    if any("Autograd-and-Fork" in (r.failure or "") for r in records):
        return here()  # the user's own: estimate it here
    return result


def _died(run: Settings, why: str) -> RunRecord:
    return RunRecord(settings=run, environment={}, status="failed", failure=f"failed outside the training steps: {why}")


def _measure_here(run: Settings, measure: Callable[[Settings], RunRecord]) -> RunRecord:
    """``measure(run)``, for an estimate through shallow probes of a deep model (``memprof.measure.depth``)."""
    if run.estimate:
        from memprof.measure import depth

        return depth.estimate(run, measure)
    return measure(run)


def _run_here(run: Settings) -> RunRecord:
    """The runner in this process. A crash outside its training steps (the model or the optimizer failing
    to allocate, or failing to build) is a row too, as a crashed child's is."""
    from memprof.measure.runner import measure as measure_here

    try:
        return measure_here(run)
    except MemprofError:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a crash is a result
        oom = out_of_memory(exc)
        return RunRecord(settings=run, environment={}, status="oom" if oom else "failed",
                         failure=f"OOM outside the training steps: {describe(exc)}" if oom else
                         f"failed outside the training steps: {describe(exc)}")


def validate(model: str, optimizers: str | Sequence[str], **settings: Any) -> None:
    """Every check ``measure`` makes before measuring: ``UsageError`` on bad input, nothing measured."""
    _plan(model, optimizers, None, settings)


def _plan(model: Any, optimizers: Any, isolate: Any,
          settings: dict[str, Any]) -> tuple[list[Settings], bool, bool]:
    """The settings of each run (one per spec, device resolved), whether to isolate them and
    whether they are distributed."""
    from memprof.distributed import launch
    from memprof.optim.registry import parse_spec

    _expect("model", model, str, "a model name or path (text)")
    _expect("isolate", isolate, (bool, type(None)), "True, False or None")
    base = _settings(model, settings)
    texts = _validate_optimizers(optimizers)
    # An estimate needs no GPU: its target is CUDA unless it says cpu.
    device = ("cuda" if base.device == "auto" else base.device) if base.estimate else resolve_device(base.device)
    isolate = device.startswith("cuda") and not base.estimate if isolate is None else isolate
    if base.snapshot is not None and not device.startswith("cuda"):
        raise UsageError("--snapshot needs CUDA (a torch memory snapshot records the CUDA caching allocator); "
                         "use --device cuda on a GPU machine, or drop --snapshot")
    distributed = launch.requested(base)
    if distributed:
        base = launch.check(base.replace(device=device))
    runs = []
    for text in texts:
        spec = parse_spec(text)
        if spec.entry.requires == "cuda" and not device.startswith("cuda"):
            raise UsageError(f"optimizer {spec.name} runs only on CUDA; use --device cuda")
        runs.append(base.replace(optimizer=spec.name, spec=text, device=device,
                                 snapshot=_snapshot_path(base.snapshot, text, len(texts))))
    return runs, isolate, distributed


def estimate(
    model: str,
    optimizers: str | Sequence[str],
    *,
    on_start: Callable[[Settings], None] | None = None,
    on_result: Callable[[RunRecord], None] | None = None,
    **settings: Any,
) -> list[RunRecord]:
    """Estimate each optimizer on ``model`` without allocating it: the same runner and replay on
    fake tensors. ``device`` is the target ("cuda", the default, or "cpu"); ``gpu`` picks the GPU
    whose workspace, context and capacity apply; ``memory`` is the budget to fit in.

    An optimizer whose state depends on the data (its entry's ``upper_bound``) yields two records,
    the lower and the upper end of its range, each noted as such.
    """
    from memprof.optim.registry import parse_spec

    texts = _spec_texts(optimizers)
    expanded: list[tuple[str, str | None]] = []
    for text in _validate_optimizers(texts):
        upper = parse_spec(text).entry.upper_bound
        if not upper:
            expanded.append((text, None))
            continue
        extra = ":".join(f"{k}={v}" for k, v in upper.items())
        name, *pairs = text.split(":")  # the upper end's values replace the user's (a key is given once)
        upper_text = ":".join([name, *(p for p in pairs if p.partition("=")[0].strip() not in upper), extra])
        expanded += [(text, f"lower end of a data-dependent range: {text} at its initial state sizes"),
                     (upper_text, f"upper end of a data-dependent range: {text} with {extra}")]
    records = measure(model, [t for t, _ in expanded], isolate=False, on_start=on_start, on_result=on_result,
                      **{"device": "cuda", "steps": 2, **settings, "estimate": True})
    for record, (_, note) in zip(records, expanded):
        if note:
            record.notes.append(note)
    return records


FIT_DIMENSIONS = {"batch-size": "batch_size", "seq-len": "seq_len"}
FIT_LIMIT = 1 << 20


@dataclass
class Fit:
    """The largest value of one setting at which one optimizer's estimate fits the budget."""

    spec: str
    setting: str  # "batch_size" | "seq_len"
    budget: int
    value: int  # 0: not even 1 fits
    record: RunRecord | None  # the estimate at ``value`` that confirms it (None when nothing fits)
    probes: list[tuple[int, int | None]] = field(default_factory=list)  # (value, what the run needs), in order
    failure: str | None = None  # an estimate that failed on the way
    estimates: list[RunRecord] = field(default_factory=list)  # every estimate made, in order


def fit(model: str, optimizers: str | Sequence[str], dimension: str, *,
        on_result: Callable[[RunRecord], None] | None = None, **settings: Any) -> list[Fit]:
    """For each optimizer, the largest ``dimension`` (``batch-size`` or ``seq-len``) whose estimate fits
    the budget (``memory``, else the ``target_gpu``'s capacity): doubling from the given value, then
    bisecting. Assumes what a run needs grows with the value (true of activations and temporaries)."""
    from memprof.measure.gpus import budget
    from memprof.models import check_fit_setting
    from memprof.optim.registry import split_specs

    if dimension not in FIT_DIMENSIONS:
        raise UsageError(f"unknown --fit {dimension!r}; choose {', '.join(FIT_DIMENSIONS)}")
    name = FIT_DIMENSIONS[dimension]
    base = _settings(model, {**settings, "estimate": True, "device": settings.get("device", "cuda")})
    check_fit_setting(model, name)
    limit = budget(base)
    if limit is None:
        raise UsageError("--fit needs a budget: give --memory (e.g. 24GiB) or --gpu (e.g. h100)")
    texts = split_specs(optimizers) if isinstance(optimizers, str) else list(optimizers)
    _validate_optimizers(texts)
    search = functools.partial(_search, model, setting=name, start=getattr(base, name), budget=limit,
                               settings=settings)
    with _forked_pool(len(texts) >= 2, len(texts)) as pool:  # one optimizer's search per process
        if pool is None:
            return [search(text, on_result=on_result) for text in texts]
        futures = [pool.submit(search, text) for text in texts]
        results = []
        for text, future in zip(texts, futures):
            result = _from_worker(future, here=lambda: search(text), died=lambda why: Fit(
                spec=text, setting=name, budget=limit, value=0, record=None, failure=why))
            if on_result:
                for record in result.estimates:
                    on_result(record)
            results.append(result)
        return results


def _search(model: str, text: str, *, setting: str, start: int, budget: int, settings: dict[str, Any],
            on_result: Callable[[RunRecord], None] | None = None) -> Fit:
    """One optimizer's ``fit``: doubling ``setting`` from ``start`` while the estimate fits ``budget``,
    then bisecting."""
    from memprof.measure.gpus import need

    result = Fit(spec=text, setting=setting, budget=budget, value=0, record=None)

    def needs(value: int) -> int | None:
        (record, *_) = estimate(model, [text], **{**settings, setting: value})
        result.estimates.append(record)
        result.probes.append((value, need(record) if record.status == "ok" else None))
        if on_result:
            on_result(record)
        if record.status != "ok":
            result.failure = record.failure
            return None
        return need(record)

    low, high = 0, None  # low fits (0: nothing yet), high does not
    value = start
    while high is None and value <= FIT_LIMIT:
        used = needs(value)
        if used is None:
            break
        if used <= budget:
            low, value = value, value * 2
        else:
            high = value
    if result.failure is None and high is not None:
        lo = low
        while high - lo > 1:
            mid = (lo + high) // 2
            used = needs(mid)
            if used is None:
                break
            lo, high = (mid, high) if used <= budget else (lo, mid)
        low = lo
    result.value = low
    result.record = next((r for r in result.estimates if getattr(r.settings, setting) == low), None)
    return result


def _snapshot_path(snapshot: str | None, spec: str, count: int) -> str | None:
    if snapshot is None or count == 1:
        return snapshot
    path = Path(snapshot)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in spec)
    return str(path.with_name(f"{path.stem}-{safe}{path.suffix or '.pickle'}"))


def compare(model: str, optimizers: str | Sequence[str], **kwargs: Any) -> "pd.DataFrame":
    """Measure and return the tidy long table (one row per record, category, component)."""
    from memprof.report.export import records_to_frame

    return records_to_frame(measure(model, optimizers, **kwargs))


def profile(model: str, optimizer: str, **kwargs: Any) -> RunRecord:
    """Measure one optimizer in depth; the record carries the per-parameter state table."""
    from memprof.optim.registry import split_specs

    _expect("optimizer", optimizer, str, "one optimizer spec (text)")
    if len(split_specs(optimizer)) != 1:
        raise UsageError("profile takes one optimizer; use `memprof compare` for several")
    return measure(model, [optimizer], **kwargs)[0]


# -- what to measure: the command line merged with a config file --------------------------------------
@dataclass(frozen=True)
class Request:
    """One ``measure`` call: a model, its optimizer specs and the other settings."""

    model: str
    optimizers: str
    settings: dict[str, Any] = field(default_factory=dict)
    description: str | None = None


def requests(given: dict[str, Any], *, config: str | Path | None = None,
             explicit: set[str] = frozenset()) -> list[Request]:
    """What to measure: ``given`` settings (by field name, ``spec`` holding the comma-separated
    specs), or one request per run of a config file, where the settings in ``explicit`` (typed on
    the command line) win over the file."""
    from memprof.config import load_runs

    if config is None:
        runs = [dict(given)]
    else:
        keys = config_keys()
        runs = []
        for run in load_runs(config):
            from_file = {keys[k]: v for k, v in run.items() if k in keys}
            merged = {**given, **{k: v for k, v in from_file.items() if k not in explicit}}
            runs.append({**merged, "description": run.get("description")})
    out = []
    for run in runs:
        description = run.pop("description", None)
        if config is not None:  # what the file says is checked here, so that errors name the file
            try:
                Settings(**run)
            except UsageError as exc:
                raise UsageError(f"config {config}: {exc}") from None
            if description is not None and not isinstance(description, str):
                raise UsageError(f"config {config}: description must be text, got {description!r}")
        model, specs = run.pop("model"), run.pop("spec")
        out.append(Request(model=model, optimizers=specs, settings=run, description=description))
    return out


# -- the gate ----------------------------------------------------------------------------------------------
@dataclass
class CheckOutcome:
    """The gate's verdict, and the records measured for it (empty when a current run was given)."""

    result: "GateResult"
    measured: list[RunRecord]


def check(
    baseline: str | Path,
    current: str | Path | None = None,
    *,
    tolerances: Sequence[str] = (),
    categories: Sequence[str] | None = None,
    trust: Sequence[str] = (),
    on_start: Callable[[Settings], None] | None = None,
    on_result: Callable[[RunRecord], None] | None = None,
) -> CheckOutcome:
    """Check a current run file against a baseline file, or measure the baseline's runs again here.

    A baseline is data: measuring again loads only built-in models and registered optimizers, and
    the model files and dotted-path optimizers the user names in ``trust``.
    """
    from memprof import runfile
    from memprof.report import gate

    _expect("baseline", baseline, (str, os.PathLike), "a file path")
    _expect("current", current, (str, os.PathLike, type(None)), "a file path or None")
    tolerances, trust = _texts("tolerances", tolerances), _texts("trust", trust)
    categories = None if categories is None else _texts("categories", categories)
    base = runfile.read(baseline, "baseline")
    gate.parse_tolerances(tolerances)  # bad input fails before measuring
    for name in categories or ():
        gate.check_category(name)
    measured: list[RunRecord] = []
    if current is not None:
        runs = runfile.read(current, "current run")
    else:
        for settings, specs in group_by_request(r.settings for r in base):
            _refuse_code_from_data(settings, specs, baseline, set(trust))
            measured.extend(measure(settings.model, specs, on_start=on_start, on_result=on_result,
                                    **request_fields(settings)))
        runs = measured
    return CheckOutcome(gate.check(base, runs, tolerances=tolerances, categories=categories), measured)


def _refuse_code_from_data(settings: Settings, specs: Sequence[str], path: str | Path, trust: set[str]) -> None:
    """A model file or dotted path named only by a data file is never loaded."""
    from memprof.models import is_builtin
    from memprof.optim.registry import registry

    known = registry()
    names = [("model", settings.model, is_builtin(settings.model))]
    names += [("optimizer", spec.split(":")[0].strip(), spec.split(":")[0].strip() in known) for spec in specs]
    for what, name, builtin in names:
        if not builtin and name not in trust:
            raise UsageError(f"{path} names {what} {name!r}, which is not a built-in {what}; a baseline is data and "
                             f"never makes memprof run code it names: pass --trust {shlex.quote(name)} to measure it "
                             "again, or measure it yourself and pass --current")

