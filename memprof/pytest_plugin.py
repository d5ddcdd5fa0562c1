"""memprof as a pytest plugin (entry point ``pytest11: memprof``): memory budgets in tests.

Two ways to use it::

    @pytest.mark.memprof(max_optimizer_state="20MiB", max_peak="1GiB")
    def test_smmf_state(memprof_measure):
        memprof_measure(model="tests/tiny.py:build", opt="smmf", device="cpu")

    def test_adam_state(memprof_measure):
        memprof_measure(model="gpt2", opt="adam", device="cpu", steps=1, max_optimizer_state="500MiB")

    @pytest.mark.memprof(max_optimizer_state="1MiB", max_peak="8MiB")
    def test_my_loop(memprof_track):
        with memprof_track(model, optimizer):      # memprof.track around the test's own training loop
            for batch in batches:
                ...

The marker checks every run the test measured with the ``memprof_measure`` fixture or tracked with the
``memprof_track`` fixture, and a ``RunRecord`` (or a list of them) the test returns. Budgets are ``max_<category>`` for any
category of the record (``weights``, ``gradients``, ``optimizer_state``, ``activations``…) or
``max_peak`` (the peak of allocated bytes), each a size such as ``"20MiB"``, ``"1.5GB"`` or an int
of bytes. The check is ``memprof.report.gate.check_budgets``, the same code ``memprof check`` uses.
This module imports only pytest at load time, so it costs nothing in test runs that do not use it.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, Callable

import pytest

if TYPE_CHECKING:
    from memprof.record import RunRecord

RECORDS = pytest.StashKey[list]()
TRACKS = pytest.StashKey[list]()
RETURNED = pytest.StashKey[object]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "memprof(**budgets): fail the test when a run it measured (memprof_measure fixture, or a returned "
        "RunRecord) exceeds a budget: max_<category>='20MiB' for a memprof category, or max_peak.",
    )


@pytest.fixture
def memprof_measure(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``memprof_measure(model=..., opt=..., device="cpu", **settings, **budgets)`` measures and returns
    the run record (a list for several comma-separated optimizers); ``max_<category>=...`` budgets
    given here fail the test at once, and the ``memprof`` marker's budgets are checked after it."""
    records = request.node.stash.setdefault(RECORDS, [])

    def measure(*, model: str, opt: str, device: str = "cpu", **kwargs: Any) -> RunRecord | list[RunRecord]:
        from memprof import api
        from memprof.report.gate import BUDGET_KEYS

        budgets = {k: kwargs.pop(k) for k in list(kwargs) if k in BUDGET_KEYS}
        measured = api.measure(model, opt, device=device, **kwargs)
        records.extend(measured)
        failures = _failures(measured, budgets)
        if failures:
            pytest.fail(failures, pytrace=False)
        return measured[0] if len(measured) == 1 else measured

    return measure


@pytest.fixture
def memprof_track(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``with memprof_track(model, optimizer, steps=None, skip=0) as run:`` around the test's own loop
    (``memprof.track``); ``run.record`` is the record, which the ``memprof`` marker's budgets check."""
    tracks = request.node.stash.setdefault(TRACKS, [])

    def track(*args: Any, **kwargs: Any) -> Any:
        from memprof.measure.tracked import track as start

        tracks.append(start(*args, **kwargs))
        return tracks[-1]

    return track


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function):
    """For marked tests, keep what the test function returns (a record to check) without pytest's
    'test returned a value' warning."""
    original = pyfuncitem.obj
    if pyfuncitem.get_closest_marker("memprof") is None or inspect.iscoroutinefunction(original):
        yield
        return

    @functools.wraps(original)
    def keep_result(*args: Any, **kwargs: Any) -> None:
        pyfuncitem.stash[RETURNED] = original(*args, **kwargs)

    pyfuncitem.obj = keep_result
    try:
        yield
    finally:
        pyfuncitem.obj = original


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("memprof")
    if marker is None or call.when != "call" or not report.passed:
        return
    records = list(item.stash.get(RECORDS, []))
    records += [track.record for track in item.stash.get(TRACKS, []) if track.record is not None]
    returned = item.stash.get(RETURNED, None)
    records += _as_records(returned)
    if marker.args:
        message = "memprof marker takes keyword budgets only, e.g. @pytest.mark.memprof(max_optimizer_state='20MiB')"
    elif not records:
        message = ("memprof marker: the test measured nothing; call the memprof_measure fixture, track a loop "
                   "with memprof_track, or return a RunRecord")
    else:
        message = _failures(records, marker.kwargs)
    if message:
        report.outcome = "failed"
        report.longrepr = message


def _as_records(value: object) -> list[RunRecord]:
    from memprof.record import RunRecord

    if isinstance(value, RunRecord):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, RunRecord) for v in value):
        return list(value)
    return []


def _failures(records: list[RunRecord], budgets: dict[str, Any]) -> str:
    """The budget failures as one message (empty when every budget holds)."""
    from memprof.errors import UsageError
    from memprof.report.gate import check_budgets

    try:
        failures = check_budgets(records, budgets)
    except UsageError as exc:
        return f"memprof: {exc}"
    lines = []
    for failure in failures:
        lines.append(f"memprof budget exceeded: {failure.long_repr}")
        if failure.section:
            lines.append(failure.section)
    return "\n".join(lines)
