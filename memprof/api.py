"""The Python API: measure optimizers on a model and get run records or a tidy DataFrame.

    >>> import memprof
    >>> df = memprof.compare("gpt2", "smmf,adam", device="cpu", steps=2)

Settings are the fields of ``memprof.settings.Settings``, passed as keyword arguments. The work is done
below: checking a request and measuring it in ``memprof.execute``, the fit search in ``memprof.fit``,
merging a config file with command-line options in ``memprof.config`` (``requests``). Checking a run
against a baseline, measuring again where needed, is here (``check``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from memprof import execute
from memprof.config import Request, requests
from memprof.errors import UsageError
from memprof.execute import Plan, command_line, resolve_device
from memprof.execute import expect as _expect
from memprof.execute import text_list as _texts
from memprof.record import RunRecord
from memprof.settings import Settings, group_by_request, request_fields

if TYPE_CHECKING:
    import pandas as pd

    from memprof.fit import Fit
    from memprof.report.gate import GateResult

__all__ = ["compare", "profile", "measure", "estimate", "fit", "validate", "run", "check", "CheckOutcome", "Plan",
           "Request", "requests", "resolve_device", "command_line"]


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
    _expect_callbacks(on_start, on_result)
    return execute.run(execute.plan(model, optimizers, settings, isolate=isolate),
                       on_start=on_start, on_result=on_result)


def validate(model: str, optimizers: str | Sequence[str], **settings: Any) -> Plan:
    """Every check ``measure`` makes before measuring: ``UsageError`` on bad input, nothing measured.
    Returns the checked plan, which ``run`` measures without checking it again."""
    return execute.plan(model, optimizers, settings)


def run(plan: Plan, *, on_start: Callable[[Settings], None] | None = None,
        on_result: Callable[[RunRecord], None] | None = None) -> list[RunRecord]:
    """Measure a plan that ``validate`` returned: the records ``measure`` gives for the same request."""
    _expect("plan", plan, Plan, "a plan from memprof.api.validate")
    _expect_callbacks(on_start, on_result)
    return execute.run(plan, on_start=on_start, on_result=on_result)


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
    _expect_callbacks(on_start, on_result)
    return execute.estimate(model, optimizers, settings, on_start=on_start, on_result=on_result)


def fit(model: str, optimizers: str | Sequence[str], dimension: str, *,
        on_result: Callable[[RunRecord], None] | None = None, **settings: Any) -> list[Fit]:
    """For each optimizer, the largest ``dimension`` (``batch-size`` or ``seq-len``) whose estimate fits
    the budget (``memory``, else the ``target_gpu``'s capacity): doubling from the given value, then
    bisecting (``memprof.fit``)."""
    from memprof import fit as fitting

    _expect_callbacks(None, on_result)
    return fitting.fit(model, optimizers, dimension, on_result=on_result, **settings)


def _expect_callbacks(on_start: Any, on_result: Any) -> None:
    for name, callback in (("on_start", on_start), ("on_result", on_result)):
        if callback is not None and not callable(callback):
            raise UsageError(f"{name} must be callable, got {type(callback).__name__}")


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
        from memprof.trust import refuse_untrusted

        refuse_untrusted(base, trust, baseline)  # every run, before anything is imported or measured
        for settings, specs in group_by_request(r.settings for r in base):
            measured.extend(measure(settings.model, specs, on_start=on_start, on_result=on_result,
                                    **request_fields(settings)))
        runs = measured
    return CheckOutcome(gate.check(base, runs, tolerances=tolerances, categories=categories), measured)
