"""A measuring child never outlives its parent, and its temporary folder does not outlive the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from processes_for_tests import running, wait

from memprof.measure import isolation

TESTS = Path(__file__).parent
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

# The parent: measure one sleeping optimizer in a child, as a CUDA run does (isolate=True), through
# the command line (its SIGTERM handler) or the Python API (no handler).
CLI_PARENT = """
import dataclasses, sys
from memprof import api
from memprof.cli import main
validate = api.validate
api.validate = lambda *args, **kwargs: dataclasses.replace(validate(*args, **kwargs), isolate=True)
sys.exit(main(["compare", "--model", sys.argv[1], "--opt", "optim_for_tests.SleepySGD", "--device", "cpu",
               "--steps", "1"]))
"""
API_PARENT = """
import sys
from memprof import api
api.measure(sys.argv[1], "optim_for_tests.SleepySGD", device="cpu", steps=1, isolate=True)
"""




def _start_parent(code: str, mlp_spec: str, tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    """Start a parent and wait until its child is inside step(); return (parent, child pid, temp root)."""
    temp_root, pidfile = tmp_path / "tmp", tmp_path / "child.pid"
    temp_root.mkdir()
    env = {**os.environ, "TMPDIR": str(temp_root), "MEMPROF_TEST_PIDFILE": str(pidfile),
           "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    parent = subprocess.Popen([sys.executable, "-c", code, mlp_spec], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    if not wait(lambda: pidfile.exists() and pidfile.read_text(), seconds=120):
        parent.kill()
        pytest.fail(f"the child never reached step(): {parent.communicate()}")
    return parent, int(pidfile.read_text()), temp_root


def _child_folders(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name.startswith(isolation.TEMP_PREFIX)]


@pytest.mark.slow
def test_a_killed_parent_takes_its_child_and_the_next_run_removes_its_folder(mlp_spec, tmp_path, monkeypatch):
    parent, child, temp_root = _start_parent(API_PARENT, mlp_spec, tmp_path)
    assert running(child) and len(_child_folders(temp_root)) == 1
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert wait(lambda: not running(child)), "the child outlived its SIGKILLed parent"
    (left,) = _child_folders(temp_root)
    assert left.name.startswith(f"{isolation.TEMP_PREFIX}{parent.pid}-")  # findable: it names its owner
    monkeypatch.setattr("tempfile.tempdir", str(temp_root))
    from memprof.api import measure

    (record,) = measure(mlp_spec, "sgd", device="cpu", steps=1, isolate=True)  # the next run
    assert record.status == "ok"
    assert _child_folders(temp_root) == []


@pytest.mark.slow
def test_sigterm_to_the_command_ends_the_child_and_its_folder_at_once(mlp_spec, tmp_path):
    parent, child, temp_root = _start_parent(CLI_PARENT, mlp_spec, tmp_path)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 143
    assert not running(child)
    assert _child_folders(temp_root) == []


def test_a_folder_of_a_running_process_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    mine = tmp_path / f"{isolation.TEMP_PREFIX}{os.getpid()}-abc"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / f"{isolation.TEMP_PREFIX}{dead.pid}-abc"
    other = tmp_path / "memprof-notes"
    for folder in (mine, gone, other):
        folder.mkdir()
    isolation.remove_orphaned_folders()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name])
