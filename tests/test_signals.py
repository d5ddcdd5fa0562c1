"""A signal stops the whole run with its conventional exit code, and nothing memprof started outlives it:
not a forked estimate worker, not torchrun or its ranks, not the ranks' temporary folder (next run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_for_tests import invoke
from processes_for_tests import running, wait

from memprof import runfile
from memprof.measure import isolation

TESTS = Path(__file__).parent
MLP = f"{TESTS / 'zoo_for_tests.py'}:mlp"
# The command line as a user's shell starts it: Ctrl-C raises KeyboardInterrupt even where the test runner
# was started with SIGINT ignored (a background job).
MEMPROF = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n" \
          "from memprof.cli import main; sys.exit(main())"
FORKS = sys.platform.startswith("linux") and len(os.sched_getaffinity(0)) >= 2
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
forking = pytest.mark.skipif(not FORKS, reason="estimates fork workers only on Linux with two cores or more")


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (a scan of /proc by parent id)."""
    parents = {int(p.name): _parent_of(int(p.name)) for p in Path("/proc").glob("[0-9]*")}
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found




@pytest.fixture
def memprof(tmp_path):
    """Start ``memprof ARGS`` with the test optimizers importable and a temporary folder of its own; every
    process started (and what it started) is killed at the end, whatever the test found."""
    started: list[tuple[subprocess.Popen, list[int]]] = []
    pids = tmp_path / "pids"
    pids.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path), "MEMPROF_TEST_PIDFILE": str(pids / "sleepy"),
           "MEMPROF_TEST_PIDDIR": str(pids), "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}

    def start(*args: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", MEMPROF, *args], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        started.append((process, []))
        return process

    def in_step(process: subprocess.Popen, count: int = 1, seconds: float = 120) -> list[Path]:
        """Wait until ``count`` steps have left their process id; remember every process below ``process``."""
        if not wait(lambda: len([p for p in pids.iterdir() if p.stat().st_size or "-" in p.name]) >= count
                     or process.poll() is not None, seconds) or process.poll() is not None:
            process.kill()
            pytest.fail(f"no step was reached: {process.communicate()[0][-2000:]}")
        time.sleep(0.5)  # every rank or worker of the run is in its step by now
        started[-1][1].extend(_descendants(process.pid))
        return sorted(pids.iterdir())

    start.in_step = in_step
    start.started = started
    yield start
    for process, below in started:
        process.kill()
        process.wait()
        process.stdout.close()
        for pid in below:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def _left_running(memprof) -> list[int]:
    return [pid for _, below in memprof.started for pid in below if running(pid)]


def test_sigterm_stops_a_compare_at_once_with_143(memprof):
    process = memprof("compare", "--model", MLP, "--opt", "optim_for_tests.SleepySGD,sgd", "--device", "cpu",
                      "--steps", "1")
    memprof.in_step(process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 143  # before: 3, the sleeping step a failed row ("SystemExit: 143")
    output = process.communicate()[0]
    assert "sgd: ok" not in output and "SystemExit" not in output, output  # the next optimizer never ran


SLOW_MODEL = """
import os, time
from pathlib import Path

def slow(options):
    Path(os.environ["MEMPROF_TEST_PIDFILE"]).write_text(str(os.getpid()))
    time.sleep(60)
"""


def test_sigterm_while_a_users_model_builds_is_143_not_a_usage_error(memprof, tmp_path):
    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)
    process = memprof("compare", "--model", f"{tmp_path / 'slow_model.py'}:slow", "--opt", "sgd", "--device", "cpu")
    memprof.in_step(process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 143  # before: 2, "… failed: called sys.exit(143)"
    assert "error" not in process.communicate()[0]


@forking
def test_sigint_stops_an_estimate_in_forked_workers_at_once_with_130(memprof):
    process = memprof("estimate", "--model", MLP, "--opt", "optim_for_tests.SleepySGD,sgd", "--device", "cpu",
                      "--steps", "1")
    memprof.in_step(process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=20) == 130  # before: it waited for the sleeping worker (120 s)
    assert wait(lambda: not _left_running(memprof), 5), "a forked worker outlived the run"


def test_a_sys_exit_in_a_users_step_stays_that_optimizers_failed_row():
    result = invoke("compare", "--model", MLP, "--opt", "optim_for_tests.ExitingSGD,sgd", "--device", "cpu",
                    "--steps", "1")
    assert result.exit_code == 3, result.output
    assert "failed in step (step 1): SystemExit: 4" in result.output and "sgd: ok" in result.output


@forking
def test_sigkill_of_an_estimate_takes_its_forked_workers(memprof):
    process = memprof("estimate", "--model", MLP, "--opt",
                      "optim_for_tests.NappingSGD:nap=60,optim_for_tests.NappingSGD:nap=61", "--device", "cpu",
                      "--steps", "1")
    memprof.in_step(process, count=2)
    assert _left_running(memprof), "no forked worker found"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert wait(lambda: not _left_running(memprof), 2), "a forked worker outlived its SIGKILLed parent"


def test_sigkill_during_a_two_rank_run_takes_torchrun_and_its_ranks_and_the_next_run_removes_the_folder(
        memprof, tmp_path, monkeypatch):
    process = memprof("compare", "--model", MLP, "--opt", "optim_for_tests.SleepySGD", "--device", "cpu",
                      "--steps", "1", "--parallel", "ddp", "--nproc", "2")
    memprof.in_step(process)
    assert len(_left_running(memprof)) >= 3, "torchrun and two ranks were expected"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert wait(lambda: not _left_running(memprof), 5), "torchrun or a rank outlived the SIGKILLed run"
    (left,) = tmp_path.glob("memprof-ranks-*")
    assert left.name.startswith(f"memprof-ranks-{process.pid}-")  # it names the run that made it
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with isolation.owned_folder("memprof-ranks-") as mine:  # what the next distributed run does first
        assert [p.name for p in tmp_path.glob("memprof-ranks-*")] == [Path(mine).name]


@forking
def test_a_killed_forked_worker_fails_only_the_row_it_held(memprof, tmp_path):
    out = tmp_path / "estimate.json"
    process = memprof("estimate", "--model", MLP, "--opt",
                      "optim_for_tests.NappingSGD:nap=60,optim_for_tests.NappingSGD:nap=8,sgd", "--device", "cpu",
                      "--steps", "1", "--json", str(out))
    napping = memprof.in_step(process, count=2)
    (sleeper,) = [int(p.name.split("-")[0]) for p in napping if p.name.endswith("-60")]
    os.kill(sleeper, signal.SIGKILL)
    assert process.wait(timeout=60) == 3, process.communicate()[0]
    records = runfile.read(out)
    assert [r.status for r in records] == ["failed", "ok", "ok"]  # before: the others failed with it
    assert "the estimating process died (killed by SIGKILL)" in records[0].failure
