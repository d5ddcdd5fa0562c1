"""`memprof run script.py`: the script runs as Python runs it, its steps are measured and gated; a script that
raises shows its own traceback and exits 5 with the steps so far written; too few steps is one line."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

import pytest
from cli_for_tests import invoke

EXAMPLE = Path(__file__).parents[1] / "examples" / "train_gpt2.py"
TINY = ["--", "--batch-size", "2", "--seq-len", "16", "--steps", "6"]


def script(tmp_path: Path, body: str, name: str = "train.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent('''
        import sys
        import torch
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        optimizer = torch.optim.AdamW(model.parameters())
        def step(i):
            model(torch.randn(8, 16)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            print("step", i, flush=True)
    ''') + textwrap.dedent(body))
    return path


def test_the_example_is_measured_written_and_gated(tmp_path):
    first = invoke("run", EXAMPLE, "--steps", "2", "--csv", tmp_path / "run.csv", *TINY)
    assert first.exit_code == 0, first.output
    assert "adamw on GPT2LMHeadModel: bytes after the last" in first.stdout and "optimizer_state" in first.stdout
    assert "step 2: loss" not in first.stdout  # stopped after the steps measured (step 0 and 1)
    rows = list(csv.DictReader((tmp_path / "run.csv").open()))
    assert {(r["category"], r["component"]) for r in rows} >= {("optimizer_state", "moment"), ("gradients", "grad")}
    assert {(r["model"], r["spec"], r["steps"], r["batch_size"], r["seq_len"]) for r in rows} == {
        ("GPT2LMHeadModel", "adamw", "2", "2", "16")}
    second = invoke("run", EXAMPLE, "--steps", "2", "--csv", tmp_path / "run2.csv", *TINY)
    assert second.exit_code == 0, second.output
    gate = invoke("check", "--baseline", tmp_path / "run.csv", "--current", tmp_path / "run2.csv")
    assert gate.exit_code == 0, gate.output
    assert "0 regression(s)" in gate.stdout


def test_the_script_gets_its_arguments_and_finishes_with_finish(tmp_path):
    path = script(tmp_path, '''
        for i in range(int(sys.argv[1])):
            step(i)
        print("argv", sys.argv[0].endswith("train.py"), __name__)
    ''')
    stopped = invoke("run", path, "--steps", "2", "--skip", "1", "--", "5")
    assert stopped.exit_code == 0, stopped.output
    assert "step 2" in stopped.stdout and "step 3" not in stopped.stdout and "argv" not in stopped.stdout
    finished = invoke("run", "--finish", "--steps", "2", path, "5")
    assert finished.exit_code == 0, finished.output
    assert "step 4" in finished.stdout and "argv True __main__" in finished.stdout


def test_a_module_runs_as_python_m_runs_it(tmp_path, monkeypatch):
    script(tmp_path, "for i in range(3):\n    step(i)\n", name="trainmod.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke("run", "-m", "trainmod", "--steps", "2", "--json", tmp_path / "run.json")
    assert result.exit_code == 0, result.output
    import json

    reproduce = json.loads((tmp_path / "run.json").read_text())["reproduce"]
    assert len(reproduce) == 1 and not reproduce[0].startswith("memprof compare")  # the command that ran it


def test_a_raising_script_shows_its_traceback_writes_the_steps_so_far_and_exits_5(tmp_path):
    path = script(tmp_path, '''
        for i in range(3):
            step(i)
        model(torch.randn(8, 16))
        raise RuntimeError("diverged")
    ''')
    result = invoke("run", path, "--steps", "5", "--csv", tmp_path / "run.csv")
    assert result.exit_code == 5, result.output
    trace = result.stderr[result.stderr.index("Traceback"):]
    line = path.read_text().splitlines().index('raise RuntimeError("diverged")') + 1
    assert f'File "{path}", line {line}, in <module>' in trace and "RuntimeError: diverged" in trace
    assert "memprof" not in trace.split("RuntimeError: diverged")[0]  # the script's frames only
    assert "raised RuntimeError: diverged; the record of the steps measured before it (RuntimeError: diverged " \
           "in forward (step 4))" in result.stderr
    rows = list(csv.DictReader((tmp_path / "run.csv").open()))
    assert {r["status"] for r in rows} == {"failed"} and {r["steps"] for r in rows} == {"3"}  # completed; it failed in the 4th


def test_a_script_exiting_with_an_error_code_is_a_failure_without_a_traceback(tmp_path):
    path = script(tmp_path, 'sys.exit("bad config")\n')
    result = invoke("run", path)
    assert result.exit_code == 5
    assert "bad config" in result.stderr and "Traceback" not in result.stderr
    assert "no step was measured" in result.stderr


@pytest.mark.parametrize(("body", "line"), [
    ("model(torch.randn(8, 16))\n", "saw no optimizer step and 1 forward pass"),
    ("for i in range(2):\n    step(i)\n", "steps=3 after skip=1 but saw 2 optimizer step(s) in 2 training step(s)"),
])
def test_too_few_steps_is_one_line_and_no_record(tmp_path, body, line):
    result = invoke("run", script(tmp_path, body), "--skip", "1", "--csv", tmp_path / "run.csv")
    assert result.exit_code == 2
    assert line in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "run.csv").exists()


def test_no_script_or_a_missing_one_is_a_usage_error(tmp_path):
    assert "needs a script" in invoke("run").stderr
    missing = invoke("run", tmp_path / "nope.py")
    assert missing.exit_code == 2 and "no script" in missing.stderr
    assert invoke("run", "-m", "no_such_module_here").exit_code == 2


@pytest.mark.slow
def test_under_torchrun_rank_0_reports_every_rank(tmp_path):
    import os
    import subprocess
    import sys

    path = tmp_path / "train_ddp.py"
    path.write_text(textwrap.dedent('''
        import torch, torch.distributed as dist
        dist.init_process_group("gloo")
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 4))
        optimizer = torch.optim.Adam(model.parameters())
        for _ in range(5):
            model(torch.randn(8, 16)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    '''))
    memprof = [sys.executable, "-c", "import sys; from memprof.cli import main; sys.exit(main())"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--no-python", *memprof, "run", path, "--steps", "2", "--csv", tmp_path / "run.csv"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((tmp_path / "run.csv").open()))
    assert {(r["rank"], r["nproc"], r["parallel"]) for r in rows} == {("0", "2", "ddp"), ("1", "2", "ddp")}
    assert {r["component"] for r in rows if r["category"] == "gradients"} == {"grad", "all-reduce bucket"}
    assert done.stdout.count("│ adam") == 3  # rank 0 printed both ranks and their range
