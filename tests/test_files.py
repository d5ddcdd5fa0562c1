"""Issue 19, items 10 and 11: a file that cannot be written after measuring is one line naming it and
the reason (exit 4), and a command writes all of its outputs or changes none of the files that were
there; every file a command would write, derived names included, is checked before measuring."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from files_for_tests import FailingOs
from cli_for_tests import invoke

from memprof import files
from memprof.cli import EXIT_CODES
from memprof.errors import OutputsNotWritten
from memprof.runfile import to_json

NOT_WRITTEN = dict(EXIT_CODES)[OutputsNotWritten]


def compare(model: str, *outputs) -> tuple[str, ...]:
    return ("compare", "--model", model, "--opt", "adam", "--device", "cpu", "--steps", "1", *map(str, outputs))


def contents(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder`` by name: what a failed write must leave byte for byte."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def one_error(result, code: int, *fragments: str) -> str:
    """Exit ``code``, no traceback, and besides the measured rows' lines exactly one line on stderr,
    naming every fragment."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line != "adam: ok"]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]



def fail_after_measuring(monkeypatch, name: str, nth: int, code: int) -> None:
    """Make the ``nth`` call of ``os.<name>`` that memprof.files makes after measuring fail with ``code``."""
    from memprof.measure import runner

    failing, measure = FailingOs(name, nth, code), runner.measure

    def measure_then_arm(settings):
        record = measure(settings)
        failing.armed = True
        return record

    monkeypatch.setattr(runner, "measure", measure_then_arm)
    monkeypatch.setattr(files, "os", failing)


@pytest.fixture
def never_measure(monkeypatch):
    """What is checked must fail before anything is measured."""
    monkeypatch.setattr("memprof.measure.runner.measure", lambda settings: pytest.fail("measured anyway"))


# -- failures at write time --------------------------------------------------------------------------
def test_a_full_device_is_one_line_and_changes_no_file(tmp_path, mlp_spec):
    (tmp_path / "run.json").write_text("the old run\n")
    before = contents(tmp_path)
    result = invoke(*compare(mlp_spec, "--csv", "/dev/full", "--json", tmp_path / "run.json"))
    one_error(result, NOT_WRITTEN, "/dev/full", "No space left on device")
    assert contents(tmp_path) == before


@pytest.mark.parametrize("call, nth, code", [
    ("replace", 2, errno.EROFS),  # the second rename: the first file is put back
    ("replace", 4, errno.EPERM),  # the last rename: the three before it are undone
    ("write", 3, errno.EFBIG),
    ("fsync", 1, errno.ENOSPC),
    ("open", 2, errno.EDQUOT),
])
def test_a_write_that_fails_at_any_step_changes_no_file(tmp_path, mlp_spec, monkeypatch, call, nth, code):
    for name in ("run.csv", "fig.png", "fig-timeline.png"):
        (tmp_path / name).write_text(f"the old {name}\n")
    before = contents(tmp_path)
    fail_after_measuring(monkeypatch, call, nth, code)
    result = invoke(*compare(mlp_spec, "--csv", tmp_path / "run.csv", "--plot", tmp_path / "fig.png"))
    one_error(result, NOT_WRITTEN, str(tmp_path), os.strerror(code), "no output file was changed")
    assert contents(tmp_path) == before


def test_folders_made_for_outputs_that_were_not_written_are_removed(tmp_path):
    with pytest.raises(OutputsNotWritten, match="cannot write /dev/full: No space left on device"):
        files.write_all([(tmp_path / "new" / "sub" / "run.csv", "a,b\n"), ("/dev/full", "a,b\n")])
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_cannot_be_linked_is_renamed_last(tmp_path, monkeypatch):
    """An immutable file can be neither linked (to put it back) nor replaced: renamed last, its
    failure undoes the renames before it."""
    first, locked, last = (tmp_path / name for name in ("a.csv", "b.csv", "c.csv"))
    for path in (first, locked, last):
        path.write_text(f"the old {path.name}\n")
    before = contents(tmp_path)

    class ImmutableB:
        def __getattr__(self, attr):
            return getattr(os, attr)

        def link(self, src, dst):
            if Path(src) == locked:
                raise OSError(errno.EPERM, os.strerror(errno.EPERM))
            return os.link(src, dst)

        def replace(self, src, dst):
            if Path(dst) == locked:
                raise OSError(errno.EPERM, os.strerror(errno.EPERM))
            return os.replace(src, dst)

    monkeypatch.setattr(files, "os", ImmutableB())
    with pytest.raises(OutputsNotWritten, match=f"cannot write {locked}: Operation not permitted"):
        files.write_all([(first, "new"), (locked, "new"), (last, "new")])
    assert contents(tmp_path) == before


def test_a_file_size_limit_changes_no_file(tmp_path, mlp_spec):
    """Under ``ulimit -f`` the small CSV fits and the JSON does not: neither file is replaced."""
    for name in ("run.csv", "run.json"):
        (tmp_path / name).write_text(f"the old {name}\n")
    before = contents(tmp_path)
    limited = ("import resource, signal, sys\n"
               "from memprof.cli import main\n"
               "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG\n"
               "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))\n"
               "sys.exit(main(sys.argv[1:]))\n")
    command = [sys.executable, "-c", limited, *compare(mlp_spec, "--csv", tmp_path / "run.csv",
                                                       "--json", tmp_path / "run.json")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line != "adam: ok"]
    assert proc.returncode == NOT_WRITTEN and len(lines) == 1, proc.stderr
    assert f"cannot write {tmp_path / 'run.json'}: File too large" in lines[0]
    assert contents(tmp_path) == before


@pytest.mark.parametrize("length", [244, 255])
def test_a_long_file_name_is_written(tmp_path, mlp_spec, length):
    """The temporary beside it is named within the file system's limit (255 bytes here)."""
    name = "n" * (length - 4) + ".csv"
    result = invoke(*compare(mlp_spec, "--csv", tmp_path / name))
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (tmp_path / name).read_text().startswith("model,")


def test_a_temporary_of_a_long_name_left_by_a_dead_writer_is_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / ("é" * 120 + ".csv")  # 244 bytes in UTF-8
    stale = tmp_path / f".{files._short_name(target)}.{dead.pid}.0a1b2c3d.tmp"
    stale.write_text("half")
    files.write_atomic(target, "whole\n")
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


# -- checked before measuring ------------------------------------------------------------------------
def test_a_folder_that_takes_no_new_file_is_refused_before_measuring(mlp_spec, never_measure):
    """As root, os.access says /proc is writable; creating a file there fails (as root: "cannot create
    a file in /proc (No such file or directory)")."""
    one_error(invoke(*compare(mlp_spec, "--csv", "/proc/memprof-test.csv")), 2, "/proc/memprof-test.csv")


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr")
def test_an_immutable_file_is_refused_before_measuring(tmp_path, mlp_spec, never_measure):
    locked = tmp_path / "locked.csv"
    locked.write_text("kept\n")
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("this file system or user cannot set the immutable attribute")
    try:
        one_error(invoke(*compare(mlp_spec, "--csv", locked)), 2, str(locked), "immutable")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert locked.read_text() == "kept\n"


@pytest.mark.parametrize("command, derived", [
    ("compare", "fig-timeline.png"),
    ("profile", "fig-parameters.png"),
    ("estimate", "fig-timeline.png"),
    ("report", "fig-parameters.png"),
])
def test_a_derived_figure_name_may_not_be_another_output(tmp_path, mlp_spec, never_measure, command, derived):
    """Before 39b37f7 the figures' keys, not their paths, were checked: the CSV was overwritten."""
    plot, other = tmp_path / "fig.png", tmp_path / derived
    if command == "report":
        run = tmp_path / "run.json"
        run.write_text(to_json([]))
        args = ["report", run, "--format", "csv", "-o", other, "--plot", plot]
    else:
        args = [command, "--model", mlp_spec, "--opt", "adam", "--device", "cpu", "--csv", other, "--plot", plot]
    one_error(invoke(*args), 2, "both write", derived)
    assert not other.exists()


def test_a_derived_snapshot_name_may_not_be_another_output(tmp_path, mlp_spec, never_measure):
    """With several optimizers, --snapshot s.pickle writes s-<spec>.pickle for each."""
    snapshot, other = tmp_path / "s.pickle", tmp_path / "s-sgd.pickle"
    result = invoke("compare", "--model", mlp_spec, "--opt", "adam,sgd", "--device", "cpu",
                    "--snapshot", snapshot, "--csv", other)
    one_error(result, 2, "--csv and --snapshot both write", str(other))
