"""The pytest plugin, driven through pytester: budgets on both sides of the exact boundary."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import records_for_tests  # noqa: F401  (the inner runs' records, imported here as the modules below are)

# In-process pytester runs drop every module first imported during the run; import what the
# inner runs use here, so that the modules later tests see stay the same objects.
import memprof.pytest_plugin  # noqa: F401
import memprof.report.gate  # noqa: F401

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytest_plugins = ["pytester"]

TESTS = Path(__file__).parent
RECORD = '''
import pytest
from records_for_tests import run_record


def record(state=20 * 2**20):
    rows = [("weights", "param", 2**20), ("optimizer_state", "moment", state)]
    return run_record("adam", rows=rows, peak=rows, model="toy", environment={})
'''


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    """Run pytest on a test file with only this plugin loaded (no other installed plugin)."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))

    def run_source(source: str, *args: str, subprocess: bool = False) -> pytest.RunResult:
        pytester.makepyfile(RECORD + source)
        run_pytest = pytester.runpytest_subprocess if subprocess else pytester.runpytest_inprocess
        return run_pytest("-p", "memprof.pytest_plugin", "-p", "no:cacheprovider", *args)

    return run_source


def test_marker_checks_a_returned_record_at_the_exact_boundary(run):
    result = run('''
@pytest.mark.memprof(max_optimizer_state="20MiB")
def test_at_limit():
    return record(20 * 2**20)

@pytest.mark.memprof(max_optimizer_state="20MiB")
def test_one_byte_over():
    return record(20 * 2**20 + 1)

@pytest.mark.memprof(max_peak="21MiB", max_weights=2**20)
def test_peak_and_int_budget():
    return [record()]
''')
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "*test_one_byte_over*",
        "*memprof budget exceeded: adam on toy: optimizer_state limited to 20.00 MiB but used 20.00 MiB (+0.0%)*",
        "*moment: 20.00 MiB*",
    ])
    assert "PytestReturnNotNoneWarning" not in result.stdout.str()


def test_marker_without_a_measurement_or_with_a_bad_budget_fails(run):
    result = run('''
@pytest.mark.memprof(max_optimizer_state="1MiB")
def test_nothing_measured():
    pass

@pytest.mark.memprof(max_state="1MiB")
def test_bad_key():
    return record()

@pytest.mark.memprof(max_optimizer_state="1MiB")
def test_own_failure_wins():
    assert False, "the test's own failure"
''')
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(["*the test measured nothing; call the memprof_measure fixture*",
                                 "*unknown memprof budget 'max_state'*", "*the test's own failure*"])


@pytest.mark.slow
def test_fixture_measures_and_enforces_budgets(run, mlp_spec):
    # The zoo MLP: Adam keeps two fp32 moments of its 676 parameters (5408 bytes) and a 4-byte step per tensor.
    result = run(f'''
MODEL = {mlp_spec!r}

def test_within(memprof_measure):
    rec = memprof_measure(model=MODEL, opt="adam", device="cpu", steps=1, max_optimizer_state=5424)
    assert rec.components("optimizer_state") == {{"moment": 5408, "other": 16}}

@pytest.mark.memprof(max_optimizer_state=5423)
def test_marker_sees_fixture_runs(memprof_measure):
    memprof_measure(model=MODEL, opt="adam", device="cpu", steps=1)

def test_budget_in_the_call(memprof_measure):
    memprof_measure(model=MODEL, opt="adam", device="cpu", steps=1, max_optimizer_state="5KiB")
''', subprocess=True)  # it measures: torch and the runner load in a process of their own
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*test_marker_sees_fixture_runs*", "*optimizer_state limited to 5.30 KiB but used 5.30 KiB*",
                                 "*test_budget_in_the_call*", "*optimizer_state limited to 5.00 KiB but used 5.30 KiB (+5.9%)*"])


def test_marker_is_documented(run):
    result = run("", "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.memprof(**budgets): fail the test when a run it measured*"])


def test_entry_point_is_declared():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["pytest11"] == {"memprof": "memprof.pytest_plugin"}


def test_the_marker_checks_a_loop_tracked_with_the_memprof_track_fixture(run):
    result = run('''
import torch

def loop(memprof_track, steps=2):
    model = torch.nn.Linear(64, 64)  # 16,640 B of weights: Adam keeps 33,280 B of moments and two 4-B steps
    optimizer = torch.optim.Adam(model.parameters())
    with memprof_track(model, optimizer):
        for _ in range(steps):
            model(torch.randn(4, 64)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()

@pytest.mark.memprof(max_optimizer_state=33_288)
def test_within(memprof_track):
    loop(memprof_track)

@pytest.mark.memprof(max_optimizer_state=33_287)
def test_one_byte_over(memprof_track):
    loop(memprof_track)
''', subprocess=True)  # in a process of its own: an in-process run would drop the torch modules it imports first
    result.assert_outcomes(passed=1, failed=1)
    assert "optimizer_state" in result.stdout.str() and "test_one_byte_over" in result.stdout.str()
