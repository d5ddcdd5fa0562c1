"""The command line end to end (typer's CliRunner): tables, exports, bad input, startup cost."""

import csv
import json
import subprocess
import sys

import pytest
from cli_for_tests import invoke

from memprof.runfile import CSV_COLUMNS


def test_compare_writes_table_csv_and_json(mlp_spec, tmp_path):
    out_csv, out_json = tmp_path / "r.csv", tmp_path / "r.json"
    result = invoke("compare", "--model", mlp_spec, "--opt", "adam,sgd", "--device", "cpu", "--steps", "2",
                    "--csv", str(out_csv), "--json", str(out_json))
    assert result.exit_code == 0, result.output
    assert "adam" in result.output and "sgd" in result.output and "n/a on CPU" in result.output
    rows = list(csv.DictReader(out_csv.open()))
    assert tuple(rows[0]) == CSV_COLUMNS
    required = {"model", "optimizer", "spec", "device", "dtype", "batch_size", "seq_len", "category", "component", "bytes"}
    assert required <= set(rows[0])
    state = [r for r in rows if r["optimizer"] == "sgd" and r["category"] == "optimizer_state" and r["measure"] == "steady"]
    assert [int(r["bytes"]) for r in state] == [(32 * 16 + 32 + 4 * 32 + 4) * 4]
    data = json.loads(out_json.read_text())
    assert [r["settings"]["spec"] for r in data["records"]] == ["adam", "sgd"]
    assert data["records"][0]["environment"]["torch"]


def test_profile_lists_parameters(mlp_spec):
    result = invoke("profile", "--model", mlp_spec, "--opt", "adafactor", "--device", "cpu", "--steps", "1", "--top", "3")
    assert result.exit_code == 0, result.output
    assert "0.weight" in result.output and "global peak" in result.output
    assert "allocated per phase" in result.output
    assert "keep unfactored" in result.output


def test_config_file_runs_each_entry(mlp_spec, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'opt = "sgd"\ndevice = "cpu"\nsteps = 1\n[[runs]]\nmodel = "{mlp_spec}"\nbatch_size = 2\n'
                      f'[[runs]]\nmodel = "{mlp_spec}"\nbatch_size = 8\n')
    out_csv = tmp_path / "c.csv"
    result = invoke("compare", "--config", str(config), "--csv", str(out_csv))
    assert result.exit_code == 0, result.output
    assert {r["batch_size"] for r in csv.DictReader(out_csv.open())} == {"2", "8"}
    # an option given on the command line wins over the file
    result = invoke("compare", "--config", str(config), "--csv", str(out_csv), "--batch-size", "3")
    assert result.exit_code == 0, result.output
    assert {r["batch_size"] for r in csv.DictReader(out_csv.open())} == {"3"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "gtp2", "--opt", "adam"], "unknown model 'gtp2'; closest: gpt2"),
        (["--opt", "adamm"], "unknown optimizer 'adamm'; closest: adam"),
        (["--opt", "adam", "--dtype", "float8"], "unknown dtype 'float8'"),
        (["--opt", "adam:lr=-1"], "optimizer adam: Invalid learning rate: -1"),
        (["--opt", "adam:learning_rate=1"], "optimizer adam: unknown hyperparameter 'learning_rate'; valid:"),
        (["--opt", "adam:lr"], "optimizer adam: expected key=value"),
        (["--opt", "adam", "--unit", "MiBs"], "unknown unit 'MiBs'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = invoke("compare", "--device", "cpu", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_exits_2():
    result = invoke("compare", "--opt", "adam", "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA device" in result.output


def test_models_and_optimizers_list():
    models = invoke("models")
    assert models.exit_code == 0 and "gpt2-xl" in models.output and "resnet50" in models.output
    opts = invoke("optimizers")
    assert opts.exit_code == 0
    assert "exp_avg→moment" in opts.output and "smmf" in opts.output


def test_help_and_models_start_without_heavy_imports():
    code = (
        "import sys; from typer.testing import CliRunner; from memprof.cli import app;"
        "r = CliRunner().invoke(app, ['models']); assert r.exit_code == 0, r.output;"
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output;"
        "heavy = [m for m in ('transformers', 'torchvision', 'torch') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    from memprof import files

    target = tmp_path / "keep.csv"
    target.write_text("precious")

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(target, "new contents")
    assert target.read_text() == "precious"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


class CrashingSGD(__import__("torch").optim.SGD):
    """Kills its process in step(), like a segfaulting kernel."""

    def step(self, closure=None):
        import os

        os._exit(9)


@pytest.mark.slow
def test_crashed_child_is_a_failed_row_and_others_finish(mlp_spec):
    from memprof.api import measure

    records = measure(mlp_spec, "test_cli.CrashingSGD,sgd", device="cpu", steps=1, isolate=True)
    assert [r.status for r in records] == ["failed", "ok"]
    assert "child crashed" in records[0].failure


def test_profile_shows_adapprox_rank_per_step(mlp_spec):
    result = invoke("profile", "--model", mlp_spec, "--opt", "adapprox", "--device", "cpu", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert "reported per step" in result.output and "rank/0.weight" in result.output
