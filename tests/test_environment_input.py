"""Input from outside the command line: launch variables left in the environment, a config.json's layer
counts, a --parallel or --fit the model or the estimate cannot honour. Each is one line, exit 2, before
anything is measured (``nothing_measured`` makes a measurement fail the test at once)."""

from __future__ import annotations

import json
import sys

import pytest
import torch.distributed as dist
from cli_for_tests import invoke

from memprof import api
from memprof.models.hf import MAX_LAYERS

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
MASTER = {"MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}


@pytest.fixture
def nothing_measured(monkeypatch):
    """Fail any measurement (the check must come first); leave no process group behind."""
    from memprof.measure import runner

    def measure(*args, **kwargs):
        raise AssertionError("measured: the input should have been refused first")

    monkeypatch.setattr(runner, "measure", measure)
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    if dist.is_initialized():
        dist.destroy_process_group()


def refused(*args: str):
    """Run the command line; assert it refused the input in one line (exit 2, no traceback)."""
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    return result.stderr


def case(name: str, parallel: str, named: str, **environment: str):
    return pytest.param(environment, parallel, named, id=name)


@pytest.mark.parametrize("environment, parallel, named", [
    case("rank-not-a-number", "ddp", "RANK='abc' is not a whole number", RANK="abc", WORLD_SIZE="2"),
    case("rank-alone-not-a-number", "none", "RANK='abc' is not a whole number", RANK="abc"),
    case("world-size-alone", "none", "WORLD_SIZE=2 is set but RANK is not", WORLD_SIZE="2"),
    case("no-master-addr", "ddp", "but MASTER_ADDR is not", RANK="0", WORLD_SIZE="2"),
    case("no-master-port", "ddp", "but MASTER_PORT is not", RANK="0", WORLD_SIZE="1", MASTER_ADDR="localhost"),
    case("world-size-0", "none", "WORLD_SIZE=0 is not a number of ranks", RANK="0", WORLD_SIZE="0", **MASTER),
    case("world-size-negative", "none", "WORLD_SIZE=-2 is not a number of ranks", RANK="0", WORLD_SIZE="-2",
         **MASTER),
    case("rank-past-world", "ddp", "RANK=2 is outside WORLD_SIZE=2", RANK="2", WORLD_SIZE="2", **MASTER),
    case("rank-negative", "ddp", "RANK=-1 is outside WORLD_SIZE=2", RANK="-1", WORLD_SIZE="2", **MASTER),
    case("local-rank-not-a-number", "none", "LOCAL_RANK='x' is not a whole number", RANK="0", WORLD_SIZE="1",
         LOCAL_RANK="x", **MASTER),
    case("local-rank-past-world", "none", "LOCAL_RANK=1 is outside WORLD_SIZE=1", RANK="0", WORLD_SIZE="1",
         LOCAL_RANK="1", **MASTER),
    case("master-port-out-of-range", "ddp", "MASTER_PORT=99999 is not a TCP port", RANK="0", WORLD_SIZE="1",
         MASTER_ADDR="localhost", MASTER_PORT="99999"),
    case("master-addr-unknown", "none", "MASTER_ADDR='no-such-host.invalid' names no host", RANK="0",
         WORLD_SIZE="1", MASTER_ADDR="no-such-host.invalid", MASTER_PORT="29500"),
])
def test_a_launch_variable_without_a_launch_is_one_line(environment, parallel, named, nothing_measured, mlp_spec,
                                                        tmp_path):
    for name, value in environment.items():
        nothing_measured.setenv(name, value)
    stderr = refused("compare", "--model", mlp_spec, "--opt", "sgd", "--device", "cpu", "--steps", "1",
                     "--parallel", parallel, "--csv", tmp_path / "out.csv")
    assert named in stderr and "torchrun" in stderr
    assert not (tmp_path / "out.csv").exists()


def test_rank_1_of_1_is_refused_not_silent(nothing_measured, mlp_spec, tmp_path):
    """It used to measure, print nothing (only rank 0 reports) and write no --csv, with exit code 0."""
    nothing_measured.setenv("RANK", "1")
    nothing_measured.setenv("WORLD_SIZE", "1")
    for command in ("compare", "estimate"):
        stderr = refused(command, "--model", mlp_spec, "--opt", "sgd", "--device", "cpu", "--steps", "1",
                         "--csv", tmp_path / "out.csv")
        assert "RANK=1 is outside WORLD_SIZE=1" in stderr and "unset RANK and WORLD_SIZE" in stderr
    assert not (tmp_path / "out.csv").exists()


def test_ranks_that_never_meet_are_one_line(nothing_measured, mlp_spec):
    """The process group's rendezvous failing (torch's timeout, a refused connection) names where it waited."""
    def init_process_group(*args, **kwargs):
        raise dist.DistStoreError("Timed out after 601 seconds waiting for clients. 1/2 clients joined.")

    nothing_measured.setattr(dist, "init_process_group", init_process_group)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", **MASTER}.items():
        nothing_measured.setenv(name, value)
    stderr = refused("compare", "--model", mlp_spec, "--opt", "sgd", "--device", "cpu", "--steps", "1",
                     "--parallel", "ddp")
    assert "could not meet the other ranks at localhost:29500" in stderr and "1/2 clients joined" in stderr


def test_a_local_rank_past_the_machines_gpus_is_one_line(nothing_measured, mlp_spec):
    import torch

    nothing_measured.setattr(torch.cuda, "is_available", lambda: True)
    nothing_measured.setattr(torch.cuda, "device_count", lambda: 1)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", **MASTER}.items():
        nothing_measured.setenv(name, value)
    stderr = refused("compare", "--model", mlp_spec, "--opt", "sgd", "--device", "cuda", "--parallel", "ddp")
    assert "this rank's GPU is cuda:1" in stderr and "this machine has 1" in stderr


@pytest.mark.parametrize("installed", [True, False], ids=["as-installed-here", "as-if-not-installed"])
def test_estimate_says_deepspeed_is_not_simulated_and_what_to_run(installed, nothing_measured, mlp_spec):
    if not installed:
        nothing_measured.setitem(sys.modules, "deepspeed", None)
    stderr = refused("estimate", "--model", mlp_spec, "--opt", "adam", "--world-size", "2",
                     "--parallel", "deepspeed-zero2")
    assert "does not simulate --parallel deepspeed-zero2" in stderr and "install" not in stderr
    assert "memprof compare --nproc N --parallel deepspeed-zero2" in stderr and "zero1" in stderr and "fsdp2" in stderr


def test_fit_seq_len_on_an_image_classifier_is_one_line(nothing_measured):
    stderr = refused("estimate", "--model", "resnet18", "--opt", "adam", "--fit", "seq-len", "--gpu", "h100")
    assert "resnet18 is an image classifier" in stderr and "--fit batch-size" in stderr


def gpt2_config(path, **config) -> str:
    path.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_head": 2, **config}))
    return str(path)


@pytest.mark.parametrize("config, named", [
    ({"n_layer": 100_000}, "n_layer=100,000"),
    ({"n_layer": -1}, "n_layer=-1"),
    ({"model_type": "t5", "num_layers": 2, "num_decoder_layers": 20_000}, "num_decoder_layers=20,000"),
])
def test_a_config_beyond_the_layer_bound_is_one_line(config, named, nothing_measured, tmp_path):
    stderr = refused("estimate", "--model", gpt2_config(tmp_path / "config.json", **config), "--opt", "adam")
    assert named in stderr and f"0 to {MAX_LAYERS:,}" in stderr


def test_the_layer_bound_itself_is_accepted(tmp_path):
    api.validate(gpt2_config(tmp_path / "config.json", n_layer=MAX_LAYERS), "adam", estimate=True)
