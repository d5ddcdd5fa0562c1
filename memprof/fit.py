"""The fit search: the largest batch size or sequence length at which each optimizer's estimate fits a budget.

Each value is tried with a full estimate (``memprof.execute.estimate``): doubling from the given value while
it fits, then bisecting. With several optimizers, each one's search runs in a forked process of its own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from memprof import execute
from memprof.errors import UsageError
from memprof.record import RunRecord

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
    from memprof.gpus import budget
    from memprof.models import check_fit_setting
    from memprof.optim.registry import split_specs

    if dimension not in FIT_DIMENSIONS:
        raise UsageError(f"unknown --fit {dimension!r}; choose {', '.join(FIT_DIMENSIONS)}")
    name = FIT_DIMENSIONS[dimension]
    base = execute.checked_settings(model, {**settings, "estimate": True, "device": settings.get("device", "cuda")})
    check_fit_setting(model, name)
    if base.all_ranks:
        raise UsageError("--fit searches one rank's figures: drop --all-ranks (pick the rank with --rank)")
    limit = budget(base)
    if limit is None:
        raise UsageError("--fit needs a budget: give --memory (e.g. 24GiB) or --gpu (e.g. h100)")
    texts = split_specs(optimizers) if isinstance(optimizers, str) else list(optimizers)
    execute.validate_optimizers(texts)
    search = functools.partial(_search, model, setting=name, start=getattr(base, name), budget=limit,
                               settings=settings)
    with execute.forked_pool(len(texts) >= 2, len(texts)) as pool:  # one optimizer's search per process
        if pool is None:
            return [search(text, on_result=on_result) for text in texts]
        futures = [pool.submit(search, text) for text in texts]
        results = []
        for text, future in zip(texts, futures):
            result = execute.from_worker(
                future, here=lambda: search(text), records=lambda done: done.estimates,
                died=lambda why: Fit(spec=text, setting=name, budget=limit, value=0, record=None, failure=why))
            if on_result:
                for record in result.estimates:
                    on_result(record)
            results.append(result)
        return results


def _search(model: str, text: str, *, setting: str, start: int, budget: int, settings: dict[str, Any],
            on_result: Callable[[RunRecord], None] | None = None) -> Fit:
    """One optimizer's ``fit``: doubling ``setting`` from ``start`` while the estimate fits ``budget`` (what it
    reserves, simulated, and the context outside the allocator: ``memprof.gpus.fits``), then bisecting."""
    from memprof.gpus import fits, need

    result = Fit(spec=text, setting=setting, budget=budget, value=0, record=None)

    def fitting(value: int) -> bool | None:
        (record, *_) = execute.estimate(model, [text], {**settings, setting: value})
        result.estimates.append(record)
        result.probes.append((value, need(record) if record.status == "ok" else None))
        if on_result:
            on_result(record)
        if record.status != "ok":
            result.failure = record.failure
            return None
        return fits(record, budget)

    low, high = 0, None  # low fits (0: nothing yet), high does not
    value = start
    while high is None and value <= FIT_LIMIT:
        fit_here = fitting(value)
        if fit_here is None:
            break
        if fit_here:
            low, value = value, value * 2
        else:
            high = value
    if result.failure is None and high is not None:
        lo = low
        while high - lo > 1:
            mid = (lo + high) // 2
            fit_here = fitting(mid)
            if fit_here is None:
                break
            lo, high = (mid, high) if fit_here else (lo, mid)
        low = lo
    result.value = low
    result.record = next((r for r in result.estimates if getattr(r.settings, setting) == low), None)
    return result
