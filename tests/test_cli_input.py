"""The command line's input and outputs: every bad input is one line (exit 2) before anything is
measured, user code fails as one line naming it, files are honest, a NaN loss is said."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cli_for_tests import invoke
from records_for_tests import run_record

import memprof
from memprof import api, files, runfile
from memprof.errors import UsageError
from memprof.record import RunRecord
from memprof.report import gate
from memprof.runfile import to_csv, to_json

TESTS = Path(__file__).parent


def one_line(result, *fragments: str, code: int = 2) -> None:
    """Exit ``code`` with exactly one line on stderr, no traceback, naming every fragment."""
    assert result.exit_code == code, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def never_measure(monkeypatch):
    """Bad input must fail before anything is measured."""
    monkeypatch.setattr("memprof.measure.runner.measure", lambda settings: pytest.fail("measured anyway"))


def record(spec: str = "adam", *, nbytes: int = 4096, status: str = "ok") -> RunRecord:
    return run_record(spec, rows=[("weights", "param", nbytes), ("optimizer_state", "moment", 2 * nbytes)],
                      peak=[("weights", "param", nbytes)], status=status, steps=1)


# -- code the user owns ----------------------------------------------------------------------------
MODEL_FILES = {
    "syntax": ("def build(:\n", "SyntaxError"),
    "import_raises": ("raise ValueError('import boom')\n", "ValueError: import boom"),
    "import_exits": ("import sys\nsys.exit(5)\n", "called sys.exit(5)"),
    "build_raises": ("def build(options):\n    raise RuntimeError('boom in build')\n", "RuntimeError: boom in build"),
    "build_exits": ("import sys\ndef build():\n    sys.exit()\n", "called sys.exit()"),
    "no_build": ("def make(options):\n    pass\n", "has no function 'build'"),
}


@pytest.mark.parametrize("case", MODEL_FILES)
def test_a_failing_model_file_is_one_line_naming_it(case, tmp_path):
    source, error = MODEL_FILES[case]
    path = tmp_path / f"{case}.py"
    path.write_text(source)
    one_line(invoke("compare", "--model", f"{path}:build", "--opt", "adam", "--device", "cpu"), str(path), error)


OPTIMIZER_MODULES = {
    "opt_raises": ("raise RuntimeError('opt import boom')\n", "RuntimeError: opt import boom"),
    "opt_exits": ("import sys\nsys.exit(3)\n", "called sys.exit(3)"),
    "opt_needs": ("import package_that_is_not_installed\n", "No module named 'package_that_is_not_installed'"),
    "opt_init_raises": ("import torch\nclass Opt(torch.optim.SGD):\n    def __init__(self, params, **kw):\n"
                        "        raise RuntimeError('init boom')\n", "RuntimeError: init boom"),
    "opt_init_exits": ("import torch, sys\nclass Opt(torch.optim.SGD):\n    def __init__(self, params, **kw):\n"
                       "        sys.exit(7)\n", "called sys.exit(7)"),
}


@pytest.mark.parametrize("case", OPTIMIZER_MODULES)
def test_a_failing_dotted_path_optimizer_is_one_line_naming_it(case, mlp_spec, tmp_path, monkeypatch, never_measure):
    source, error = OPTIMIZER_MODULES[case]
    (tmp_path / f"{case}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    one_line(invoke("compare", "--model", mlp_spec, "--opt", f"{case}.Opt", "--device", "cpu"), f"{case}.Opt", error)


def test_a_step_that_calls_sys_exit_is_a_failed_row(mlp_spec):
    records = api.measure(mlp_spec, "optim_for_tests.ExitingSGD,sgd", device="cpu", steps=1)
    assert [r.status for r in records] == ["failed", "ok"]
    assert records[0].failure == "failed in step (step 1): SystemExit: 4"


def test_a_model_too_big_to_allocate_is_an_oom_row_and_the_outputs_are_written(tmp_path):
    config = _tiny_gpt2_config(tmp_path, positions=16)
    out_csv = tmp_path / "r.csv"
    result = invoke("compare", "--model", str(config), "--opt", "sgd,adam", "--device", "cpu", "--seq-len", "16",
                    "--batch-size", str(10**11), "--csv", str(out_csv))  # a 12.8 TB batch
    assert result.exit_code == 3, result.output
    assert [r.status for r in runfile.read(out_csv)] == ["oom", "oom"]
    assert "sgd: OOM outside the training steps: RuntimeError" in result.stderr and "Traceback" not in result.output


# -- values typer accepts that the run cannot take -------------------------------------------------
BATCHNORM = """
import torch
from torch import nn
def head(options):
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
def conv(options):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
"""


def test_batch_size_1_on_a_training_batchnorm_is_one_line(tmp_path):
    path = tmp_path / "bn.py"
    path.write_text(BATCHNORM)
    one_line(invoke("compare", "--model", f"{path}:head", "--opt", "sgd", "--device", "cpu", "--batch-size", "1"),
             "BatchNorm layer 1 needs more than one value per channel", "use --batch-size 2 or more")
    # one image still has many values per channel: that trains, and is measured
    (rec,) = api.measure(f"{path}:conv", "sgd", device="cpu", batch_size=1, image_size=8, steps=1)
    assert rec.status == "ok", rec.failure


def _tiny_gpt2_config(tmp_path: Path, positions: int) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_layer=1, n_embd=16,
                                    n_head=2, vocab_size=64, n_positions=positions, bos_token_id=0, eos_token_id=0)))
    return path


def test_a_sequence_past_a_config_files_positions_is_one_line(tmp_path):
    config = _tiny_gpt2_config(tmp_path, positions=16)
    one_line(invoke("compare", "--model", str(config), "--opt", "sgd", "--device", "cpu", "--seq-len", "17"),
             "--seq-len 17 is longer than", "learned positions for 16 tokens")
    (rec,) = api.measure(str(config), "sgd", device="cpu", seq_len=16, steps=1)
    assert rec.status == "ok", rec.failure


@pytest.mark.parametrize("name", ["gpt2", "bert-base-uncased", "roberta-base", "albert-base-v2", "t5-small",
                                  "llama-60m"])
def test_learned_positions_agree_with_the_catalog(name):
    from memprof.models import ModelOptions, build_model
    from memprof.models.catalog import TEXT_MODELS
    from memprof.models.hf import learned_positions

    built = build_model(name, ModelOptions(batch_size=1, seq_len=8), "meta")
    assert learned_positions(built.model) == TEXT_MODELS[name].max_seq_len


@pytest.mark.parametrize("args, message", [
    (["--seed", str(2**64)], "--seed must be between -9223372036854775808 and 18446744073709551615"),
    (["--seed", str(-2**63 - 1)], "Invalid value for '--seed'"),
    (["--batch-size", str(2**63)], "--batch-size must be at most 9223372036854775807"),
    (["--steps", "99999999999999999999999"], "--steps must be at most"),
])
def test_integers_past_what_torch_takes_are_one_line(args, message, mlp_spec, never_measure):
    one_line(invoke("compare", "--model", mlp_spec, "--opt", "sgd", "--device", "cpu", *args), message)


CONFIGS = {
    "wrong_type": ('opt = "sgd"\nbatch_size = "two"\n', "--batch-size must be an integer, got 'two'"),
    "opt_not_text": ("opt = 5\n", "--opt must be text, got 5"),
    "runs_not_tables": ('runs = "x"\n', "runs must be one or more [[runs]] tables"),
    "runs_of_numbers": ("runs = [1, 2]\n", "runs must be one or more [[runs]] tables"),
    "no_runs": ("runs = []\n", "runs must be one or more [[runs]] tables"),
    "description": ('opt = "sgd"\ndescription = 5\n', "description must be text, got 5"),
    "bool_steps": ('opt = "sgd"\nsteps = true\n', "--steps must be an integer, got True"),
    "not_toml": ("opt = \n", "is not TOML"),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_a_bad_config_file_is_one_line_naming_it(case, mlp_spec, tmp_path, never_measure):
    source, message = CONFIGS[case]
    config = tmp_path / f"{case}.toml"
    config.write_text(f'model = "{mlp_spec}"\ndevice = "cpu"\n' + source)
    one_line(invoke("compare", "--config", str(config)), f"config {config}", message)


def test_a_config_file_that_is_not_text_is_one_line(tmp_path, never_measure):
    config = tmp_path / "binary.toml"
    config.write_bytes(b"\xff\xfe\x00")
    one_line(invoke("compare", "--config", str(config)), f"config {config} is not TOML")


# -- optimizer specs -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--opt", "adam,adam"], "--opt names 'adam' twice"),
    (["--opt", "adam:lr=1e-3,adam:lr=0.001"], "twice ('adam:lr=1e-3' and 'adam:lr=0.001')"),
    (["--opt", "adam:lr=1e-3:lr=2e-3"], "optimizer adam: lr is given twice"),
    (["--opt", "adam", "--reference", "sgd"], "--reference 'sgd' is not one of the optimizers to measure"),
    (["--opt", "adam", "--baseline", "sgd"], "--reference 'sgd' is not one of the optimizers to measure"),
])
def test_specs_that_cannot_be_measured_as_asked_are_refused_before_measuring(args, message, mlp_spec, never_measure):
    one_line(invoke("compare", "--model", mlp_spec, "--device", "cpu", *args), message)


def test_an_estimates_upper_end_replaces_the_users_value_instead_of_repeating_it(mlp_spec):
    lower, upper = api.estimate(mlp_spec, "adapprox:rank_init=2", device="cpu", steps=1, timeline=False)
    assert lower.settings.spec == "adapprox:rank_init=2"
    assert upper.settings.spec == "adapprox:rank_init=2147483647"


# -- a NaN loss --------------------------------------------------------------------------------------
NAN_MODEL = """
import torch
from torch import nn
class Poisoned(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 2)
    def forward(self, x):
        return self.layer(x) * float("nan")
def build(options):
    return Poisoned(), torch.randn(options.batch_size, 4)
"""


def test_a_nan_loss_is_said_in_the_row(tmp_path, mlp_spec):
    path = tmp_path / "nan.py"
    path.write_text(NAN_MODEL)
    result = invoke("compare", "--model", f"{path}:build", "--opt", "adam,sgd", "--device", "cpu", "--steps", "2",
                    "--json", str(tmp_path / "run.json"))
    assert result.exit_code == 0, result.output
    assert "adam: loss became nan at step 1" in result.stdout and "sgd: loss became nan at step 1" in result.stdout
    assert [r.notes for r in runfile.read(tmp_path / "run.json")] == [["loss became nan at step 1"]] * 2
    (clean,) = api.measure(mlp_spec, "sgd", device="cpu", steps=1)
    assert clean.notes == []


# -- outputs -----------------------------------------------------------------------------------------
def test_output_paths_are_checked_before_measuring(tmp_path, mlp_spec, never_measure):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    base = ["compare", "--model", mlp_spec, "--opt", "sgd", "--device", "cpu"]
    one_line(invoke(*base, "--csv", str(tmp_path)), f"--csv {tmp_path}: is a folder")
    # the CSV is fine and the JSON is not: nothing is written, not even the CSV
    one_line(invoke(*base, "--csv", str(tmp_path / "r.csv"), "--json", str(a_file / "r.json")),
             f"--json {a_file / 'r.json'}: {a_file} is not a folder")
    assert not (tmp_path / "r.csv").exists()
    one_line(invoke(*base, "--csv", str(tmp_path / "r.csv"), "--markdown", str(tmp_path / "r.csv")),
             "--csv and --markdown both write")
    one_line(invoke("report", str(tmp_path / "missing.json"), "-f", "csv", "-o", str(tmp_path)), "is a folder")
    one_line(invoke("baseline", "--model", mlp_spec, "--opt", "sgd", "--device", "cpu", "-o", str(tmp_path)),
             "is a folder")
    one_line(invoke("check", "--baseline", str(a_file), "--csv", str(tmp_path)), "--csv", "is a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_an_unwritable_folder_is_refused_before_measuring(tmp_path, mlp_spec, never_measure):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        one_line(invoke("compare", "--model", mlp_spec, "--opt", "sgd", "--device", "cpu",
                        "--csv", str(locked / "r.csv")), "is not writable")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_a_new_file_gets_the_mode_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        files.write_atomic(tmp_path / "new.csv", "a,b\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "new.csv").stat().st_mode) == 0o666 & ~umask


def test_a_replaced_file_keeps_its_mode_and_a_symlink_stays_a_symlink(tmp_path):
    target, link = tmp_path / "target.csv", tmp_path / "link.csv"
    target.write_text("old")
    target.chmod(0o640)
    link.symlink_to(target)
    files.write_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_a_fifo_is_written_through(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    files.write_atomic(fifo, "streamed\n")
    reader.join(timeout=10)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and received == ["streamed\n"]


def test_dev_stdout_streams_the_csv(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(to_json([record()]))
    stdout = tmp_path / "stdout"  # what /dev/stdout is; a bug would replace this link, not the system's
    stdout.symlink_to("/proc/self/fd/1")
    command = [sys.executable, "-m", "memprof.cli", "report", str(run), "-f", "csv", "-o", str(stdout)]
    piped = subprocess.run(command, capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == to_csv(runfile.read(run))
    # stdout redirected to a file: the CSV goes through the open stream, the file is not replaced
    with open(tmp_path / "out.txt", "w") as handle:
        handle.write("before\n")
        handle.flush()
        redirected = subprocess.run(command, stdout=handle, stderr=subprocess.PIPE, text=True)
    assert redirected.returncode == 0, redirected.stderr
    assert (tmp_path / "out.txt").read_text() == "before\n" + to_csv(runfile.read(run))
    assert stdout.is_symlink()


def test_a_temporary_file_of_a_dead_writer_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.csv.{dead.pid}.abc123.tmp"
    live = tmp_path / f".out.csv.{os.getpid()}.def456.tmp"
    stale.write_text("half")
    live.write_text("being written")
    files.write_atomic(tmp_path / "out.csv", "whole\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.csv", live.name])


# -- the gate ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tolerances, message", [
    (["nan%"], "is not a finite percentage"),
    (["inf%"], "is not a finite percentage"),
    (["1e999%"], "is not a finite percentage"),
    (["weights=nan%"], "is not a finite percentage"),
    (["-1MiB"], "must be finite and not negative"),
    (["-0.5KiB"], "must be finite and not negative"),
    (["1e999MiB"], "must be finite and not negative"),
    (["0.02"], "has no unit: write a percentage (2%) or a size (20KiB)"),
    (["0"], "has no unit"),
    (["inf"], "has no unit"),
    (["nan"], "has no unit"),
    (["2%", "3%"], "give one default"),
    (["weights=1%", "weights=2%"], "--tolerance weights= is given twice"),
])
def test_tolerances_that_cannot_gate_are_refused(tmp_path, tolerances, message):
    base = tmp_path / "base.csv"
    base.write_text(to_csv([record()]))
    args = [item for t in tolerances for item in ("--tolerance", t)]
    one_line(invoke("check", "--baseline", str(base), "--current", str(base), *args), message)


def test_a_regression_fails_whatever_tolerance_is_accepted(tmp_path):
    base, grown = tmp_path / "base.csv", tmp_path / "grown.csv"
    base.write_text(to_csv([record(nbytes=4096)]))
    grown.write_text(to_csv([record(nbytes=8192)]))
    for tolerance in ("2%", "0%", "1KiB", "0B"):
        assert invoke("check", "--baseline", str(base), "--current", str(grown), "--tolerance", tolerance).exit_code == 1


def test_a_baseline_with_nothing_to_gate_is_a_usage_error(tmp_path):
    base = tmp_path / "base.csv"
    base.write_text(to_csv([record()]))
    one_line(invoke("check", "--baseline", str(base), "--current", str(base), "--category", "allocator"),
             "nothing to check: the baseline has no rows in the gated categories (cpu: allocator)")
    with pytest.raises(UsageError, match="the baseline has no runs"):
        gate.check([], [record()])
    empty = json.loads(to_json([record()]))
    empty["records"][0].update(breakdown=[], peak=[])
    (tmp_path / "empty.json").write_text(json.dumps(empty))
    one_line(invoke("check", "--baseline", str(tmp_path / "empty.json"), "--current", str(base)),
             "status ok but no rows")


@pytest.mark.parametrize("kind", ["folder", "missing folder"])
@pytest.mark.parametrize("grown, code", [(False, 0), (True, 1)])
def test_a_step_summary_that_cannot_be_written_never_changes_the_verdict(tmp_path, monkeypatch, kind, grown, code):
    base, current = tmp_path / "base.csv", tmp_path / "now.csv"
    base.write_text(to_csv([record()]))
    current.write_text(to_csv([record(nbytes=8192 if grown else 4096)]))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path if kind == "folder" else tmp_path / "no" / "summary.md"))
    result = invoke("check", "--baseline", str(base), "--current", str(current))
    assert result.exit_code == code, result.output
    assert result.stderr.startswith("warning: cannot append the summary to GITHUB_STEP_SUMMARY=")


# -- run files ---------------------------------------------------------------------------------------
def _json_with(change) -> str:
    data = json.loads(to_json([record()]))
    change(data["records"][0])
    return json.dumps(data)


RUN_FILES = {
    "bytes_text.json": (_json_with(lambda r: r["breakdown"][0].update(bytes="lots")),
                        "breakdown[0].bytes is 'lots', not int"),
    "bytes_negative.json": (_json_with(lambda r: r["breakdown"][0].update(bytes=-5)), "weights/param has -5 bytes"),
    "peak_negative.json": (_json_with(lambda r: r["peaks"].update(allocated=-1)), "peaks.allocated is -1 bytes"),
    "status_number.json": (_json_with(lambda r: r.update(status=5)), "status is 5, not str"),
    "status_unknown.json": (_json_with(lambda r: r.update(status="fine")), "status 'fine' is not one of ok, oom"),
    "timings_text.json": (_json_with(lambda r: r.update(timings_ms="x")), "timings_ms is 'x', not a mapping"),
    "rows_not_list.json": (_json_with(lambda r: r.update(breakdown={"a": 1})), "breakdown is not a list"),
    "settings_list.json": (_json_with(lambda r: r.update(settings=[])), "settings is not a mapping"),
    "notes_number.json": (_json_with(lambda r: r.update(notes=[1])), "notes[0] is 1, not str"),
    "unknown_field.json": (_json_with(lambda r: r.update(colour="red")), "unknown field(s) colour"),
    "record_number.json": ('{"records": [5]}', "the record is not a mapping"),
    "no_records.json": ('{"records": []}', "it holds no run records"),
    "bytes_negative.csv": (to_csv([record()]).replace(",4096,", ",-4096,"), "weights/param has -4096 bytes"),
    "status_unknown.csv": (to_csv([record()]).replace(",ok,", ",fine,"), "status 'fine' is not one of ok, oom"),
    "seed_inf.csv": (to_csv([record()]).replace(",0,False,", ",inf,False,"), "seed 'inf' is not a valid int"),
}


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_run_file_with_bad_values_is_one_line(tmp_path, name):
    text, message = RUN_FILES[name]
    path = tmp_path / name
    path.write_text(text)
    one_line(invoke("report", str(path)), f"run file {path} is not a memprof run file", message)
    one_line(invoke("check", "--baseline", str(path), "--current", str(path)), f"baseline {path}", message)


def test_committed_gpu_runs_still_read():
    for path in sorted((TESTS.parent / "reports" / "gpu").glob("*.json")):
        assert runfile.read(path)


# -- the Python API ----------------------------------------------------------------------------------
def test_errors_are_exported_from_memprof():
    from memprof import GateRegression, MeasurementFailed, MemprofError
    from memprof import UsageError as Exported

    assert Exported is UsageError and issubclass(Exported, MemprofError)
    assert issubclass(GateRegression, MemprofError) and issubclass(MeasurementFailed, MemprofError)


@pytest.mark.parametrize("call, message", [
    (lambda: memprof.compare(5, "adam"), "model must be a model name or path (text), got int 5"),
    (lambda: memprof.compare("gpt2", 5), "optimizers must be comma-separated specs or a list of them"),
    (lambda: memprof.compare("gpt2", ["adam", None]), "optimizers must be comma-separated specs"),
    (lambda: memprof.compare("gpt2", "adam", batch_size="2"), "--batch-size must be an integer, got '2'"),
    (lambda: memprof.compare("gpt2", "adam", isolate="yes"), "isolate must be True, False or None"),
    (lambda: memprof.compare("gpt2", "adam", on_result=3), "on_result must be callable"),
    (lambda: memprof.profile("gpt2", ["adam"]), "optimizer must be one optimizer spec (text)"),
    (lambda: api.check(5), "baseline must be a file path"),
    (lambda: api.check("base.csv", tolerances="2%"), "tolerances must be a list of strings, got str '2%'"),
    (lambda: api.check("base.csv", categories=[1]), "categories must be a list of strings"),
    (lambda: api.check("base.csv", trust="x.py:f"), "trust must be a list of strings"),
])
def test_wrong_argument_types_are_usage_errors(call, message, never_measure):
    with pytest.raises(UsageError) as caught:
        call()
    assert message in str(caught.value)


# -- the command line's own parsing ------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["compare", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["compare", "--batch-size", "x"], "Invalid value for '--batch-size'"),
    (["compare", "--nope"], "No such option: --nope"),
    (["nope"], "No such command 'nope'"),
    (["check"], "Missing option '--baseline'"),
    (["report", "x.json", "--format", "pdf"], "Invalid value for '--format'"),
    (["compare", "--model", "[/]", "--opt", "adam", "--device", "cpu"], "unknown model '[/]'"),
])
def test_the_command_lines_own_errors_are_one_line(args, message, never_measure):
    one_line(invoke(*args), message)
