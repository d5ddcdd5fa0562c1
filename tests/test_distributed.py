"""Distributed runs on torch.distributed with gloo: 2 real ranks per launch (``memprof.distributed``)."""

import importlib.util
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from cli_for_tests import invoke

from memprof import api, runfile
from memprof.errors import UsageError
from memprof.measure.trackers import CpuTracker

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")

MLP_PARAM_BYTES = (32 * 16 + 32 + 4 * 32 + 4) * 4


def run(model, opt, parallel, **settings):
    return api.measure(model, opt, device="cpu", steps=1, nproc=2, parallel=parallel, **settings)


def single(model, opt):
    return api.measure(model, opt, device="cpu", steps=1)[0]


@pytest.fixture(scope="module")
def fsdp2_adam(mlp_spec):
    return single(mlp_spec, "adam"), run(mlp_spec, "adam", "fsdp2")


@pytest.mark.slow
def test_fsdp2_each_rank_holds_its_shard_of_adam_state(fsdp2_adam):
    alone, ranks = fsdp2_adam
    assert [r.settings.rank for r in ranks] == [0, 1] and all(r.status == "ok" for r in ranks)
    moments = [r.components("optimizer_state")["moment"] for r in ranks]
    # exp_avg and exp_avg_sq of each rank's Shard(0) rows: halves (this MLP's rows divide evenly)
    assert sum(moments) == alone.components("optimizer_state")["moment"] == 2 * MLP_PARAM_BYTES
    assert moments == [MLP_PARAM_BYTES, MLP_PARAM_BYTES]
    assert all(r.total("weights") == MLP_PARAM_BYTES // 2 for r in ranks)
    assert all(r.components("gradients")["grad"] == MLP_PARAM_BYTES // 2 for r in ranks)
    # each rank keeps a step counter per parameter, as one process does
    assert all(r.components("optimizer_state")["other"] == alone.components("optimizer_state")["other"] for r in ranks)


@pytest.mark.slow
def test_fsdp2_tags_collective_buffers_and_records_differ_only_by_rank(fsdp2_adam):
    _, ranks = fsdp2_adam
    for record in ranks:
        temporaries = record.components("temporaries")
        # every rank's shards of a block, all-gathered into one buffer: the whole block
        assert temporaries["all-gather"] >= MLP_PARAM_BYTES // 2
        assert temporaries["reduce-scatter"] > 0 and temporaries["unsharded params"] > 0
        assert record.total("unattributed") <= 64  # the device mesh's rank tensor
    first, second = (r.settings for r in ranks)
    assert first.replace(rank=1) == second and first.nproc == 2 and first.parallel == "fsdp2"


@pytest.mark.slow
def test_rank_records_round_trip_through_csv(fsdp2_adam, tmp_path):
    _, ranks = fsdp2_adam
    path = tmp_path / "ranks.csv"
    runfile.write(path, ranks)
    back = runfile.read(path)
    assert [(r.settings.rank, r.settings.nproc, r.settings.parallel) for r in back] == [(0, 2, "fsdp2"), (1, 2, "fsdp2")]
    assert [r.total("optimizer_state") for r in back] == [r.total("optimizer_state") for r in ranks]


@pytest.fixture(scope="module")
def zero1_adam(mlp_spec):
    return run(mlp_spec, "adam", "zero1")


@pytest.mark.slow
def test_zero1_partitions_whole_parameters(mlp_spec, zero1_adam):
    alone = single(mlp_spec, "adam")
    ranks = zero1_adam
    assert all(r.status == "ok" for r in ranks)
    states = [r.total("optimizer_state") for r in ranks]
    assert sum(states) == alone.total("optimizer_state")  # no padding: ZeRO-1 assigns whole parameters
    assert all(0 < s < alone.total("optimizer_state") for s in states)
    assert all("structure kept" in " ".join(r.notes) for r in ranks)
    assert all(r.total("weights") == MLP_PARAM_BYTES for r in ranks)


@pytest.mark.slow
def test_ddp_holds_everything_on_every_rank(mlp_spec):
    alone = single(mlp_spec, "adam")
    ranks = run(mlp_spec, "adam", "ddp")
    assert all(r.status == "ok" for r in ranks)
    for record in ranks:
        assert record.components("optimizer_state") == alone.components("optimizer_state")
        grads = record.components("gradients")
        assert grads["grad"] == MLP_PARAM_BYTES and grads["all-reduce bucket"] == MLP_PARAM_BYTES


def _processes_with(token: str) -> list[int]:
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if token.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find leftover ranks")
@pytest.mark.parametrize("optimizer, why", [
    ("crash_for_tests.KilledOnRank1", "rank 1 crashed (killed by SIGKILL)"),  # no record, no Python
    ("crash_for_tests.RaisesOnRank1", "failed in step (step 1): RuntimeError: rank 1 gave up"),
])
def test_a_crashing_rank_fails_its_row_and_leaves_nothing_running(mlp_spec, tmp_path, monkeypatch, optimizer, why):
    token = f"memprof-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("MEMPROF_TEST_TOKEN", token)
    out = tmp_path / "crash.json"
    # rank 0 then waits for rank 1 in step 2's all-gather: gloo fails it, or the launcher stops it
    result = invoke("compare", "--model", mlp_spec, "--opt", optimizer, "--device", "cpu",
                    "--steps", "2", "--nproc", "2", "--parallel", "fsdp2", "--json", out)
    assert result.exit_code == 3, result.output
    records = runfile.read(out)
    assert [(r.settings.rank, r.status) for r in records] == [(0, "failed"), (1, "failed")]
    assert why in records[1].failure
    assert _processes_with(token) == []  # this process's own environ is the one it started with


@pytest.mark.parametrize("args, message", [
    (["--nproc", "2"], "--nproc 2 needs --parallel: choose ddp, fsdp2, zero1"),
    (["--parallel", "megatron"], "unknown parallel 'megatron'; choose none, ddp, fsdp2"),
])
def test_bad_distributed_input_is_one_line(mlp_spec, args, message):
    result = invoke("compare", "--model", mlp_spec, "--opt", "adam", "--device", "cpu", *args)
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_deepspeed_missing_names_the_install(mlp_spec, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    result = invoke("compare", "--model", mlp_spec, "--opt", "adam", "--device", "cpu", "--nproc", "2",
                    "--parallel", "deepspeed-zero2")
    assert result.exit_code == 2 and "pip install deepspeed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- DeepSpeed's engine on 2 gloo ranks (the optional extra: pip install -e '.[deepspeed]') ----------------
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is an optional extra, not installed: pip install -e '.[deepspeed]'")
HALF = MLP_PARAM_BYTES // 2  # the MLP's 676 parameters split evenly: no padding in DeepSpeed's partitions


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_ranks_hold_half_of_adam_state_and_a_master_partition(mlp_spec, stage):
    alone = single(mlp_spec, "adam").components("optimizer_state")
    ranks = run(mlp_spec, "adam", f"deepspeed-zero{stage}")
    assert [r.settings.rank for r in ranks] == [0, 1]
    for record in ranks:
        assert record.status == "ok", record.failure
        state = record.components("optimizer_state")
        assert state["moment"] == alone["moment"] // 2 == 2 * HALF  # exp_avg and exp_avg_sq of this rank's partition
        assert state["master"] == HALF and "master" not in alone  # the fp32 master copy of the partition
        # ZeRO-1/2 keep whole parameters on every rank; ZeRO-3 partitions them and keeps a flat gradient partition
        assert record.total("weights") == (HALF if stage == 3 else MLP_PARAM_BYTES)
        if stage == 3:
            assert record.components("gradients")["grad"] == HALF
        assert record.components("gradients")["all-reduce bucket"] > 0  # DeepSpeed's contiguous gradient bucket
        assert "structure lost: flat partition" in " ".join(record.notes)
        assert record.settings.parallel == f"deepspeed-zero{stage}" and record.settings.nproc == 2


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_flat_partitions_unfactor_adafactor_and_fail_muon(mlp_spec, tmp_path):
    out = tmp_path / "zero2.json"
    result = invoke("compare", "--model", mlp_spec, "--opt", "adafactor,muon", "--device", "cpu", "--steps", "1",
                    "--nproc", "2", "--parallel", "deepspeed-zero2", "--json", out)
    assert result.exit_code == 3, result.output
    records = {(r.settings.optimizer, r.settings.rank): r for r in runfile.read(out)}
    assert "factor" in single(mlp_spec, "adafactor").components("optimizer_state")
    for rank in (0, 1):
        adafactor = records["adafactor", rank]
        assert adafactor.status == "ok", adafactor.failure
        assert "structure lost: flat partition" in " ".join(adafactor.notes)
        state = adafactor.components("optimizer_state")
        assert "factor" not in state and state["moment"] == HALF  # one unfactored variance over the 1-D partition
        muon = records["muon", rank]
        assert muon.status == "failed" and "2D matrix" in muon.failure


def test_deepspeed_is_not_simulated(mlp_spec):
    result = invoke("estimate", "--model", mlp_spec, "--opt", "adam", "--world-size", "2", "--parallel",
                    "deepspeed-zero3")
    assert result.exit_code == 2 and "deepspeed" in result.stderr.lower(), result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_more_ranks_than_gpus_is_a_usage_error(mlp_spec, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match="--nproc 2 needs 2 GPUs .* this machine has 1"):
        api.measure(mlp_spec, "adam", device="cuda", nproc=2, parallel="ddp")


@pytest.mark.slow
def test_under_a_users_torchrun_rank_0_reports_every_rank(mlp_spec, tmp_path):
    out = tmp_path / "ranks.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    memprof = Path(sys.executable).with_name("memprof")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--no-python", str(memprof), "compare", "--model", mlp_spec, "--opt", "sgd", "--device", "cpu",
                           "--steps", "1", "--parallel", "zero1", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads(out.read_text())["records"]
    assert [(r["settings"]["rank"], r["settings"]["nproc"]) for r in records] == [(0, 2), (1, 2)]
    assert proc.stdout.count("zero1 × 2 ranks") == 1  # rank 0 prints, rank 1 does not


def test_cpu_tracker_sees_a_storage_resized_in_place():
    """FSDP2 frees and re-allocates unsharded parameters with ``UntypedStorage.resize_``."""
    with CpuTracker() as tracker:
        t = torch.empty(256)
        storage = t.untyped_storage()
        storage.resize_(0)
        storage.resize_(1024)
    sizes = [(a.nbytes, a.end is None) for a in tracker.allocations]
    assert sizes == [(1024, False), (1024, True)]


def test_ranks_of_one_run_are_one_request_to_measure_again():
    from memprof.settings import (
        Settings,
        group_by_request,
        reproduce_command,
        request_fields,
    )

    ranks = [Settings(model="gpt2", optimizer="adam", spec="adam", device="cpu", nproc=2, parallel="fsdp2", rank=r)
             for r in (0, 1)]
    ((settings, specs),) = group_by_request(ranks)
    assert specs == ["adam"] and "rank" not in request_fields(settings)
    assert reproduce_command(settings, specs).endswith("--nproc 2 --parallel fsdp2")
    with pytest.raises(UsageError, match="rank 2 is outside --nproc 2"):
        ranks[0].replace(rank=2)


def test_flat_partitions_are_reported_as_structure_lost():
    from memprof.strategies.base import structure

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    flat = torch.nn.Parameter(torch.zeros(sum(p.numel() for p in model.parameters()) // 2))  # ZeRO's 1-D partition
    assert structure(model, torch.optim.Adam([flat])).startswith("structure lost: flat partition")
    assert structure(model, torch.optim.Adam(model.parameters())).startswith("structure kept")


# -- simulated ranks: memprof estimate --world-size N (memprof.distributed.simulate) ------------------------
def simulate(model, opt, parallel, world_size=2, rank=0, **settings):
    (record,) = api.estimate(model, opt, device="cpu", steps=1, nproc=world_size, parallel=parallel, rank=rank,
                             **settings)
    assert record.status == "ok", record.failure
    return record


def _same_rank_figures(simulated, real, peak=True):
    for category in ("weights", "gradients", "optimizer_state"):
        assert simulated.components(category) == real.components(category), category
    if peak:
        assert abs(simulated.peaks.allocated - real.peaks.allocated) <= 0.05 * real.peaks.allocated


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_simulated_fsdp2_rank_agrees_with_the_gloo_run(fsdp2_adam, mlp_spec, rank):
    _, ranks = fsdp2_adam
    simulated = simulate(mlp_spec, "adam", "fsdp2", rank=rank)
    # gloo copies a reduce-scatter's input into a flat buffer of its own, freed when its thread is done: a
    # few hundred bytes, some of the time, which is more than 5 % of this MLP's peak (tiny_gpt2 below)
    _same_rank_figures(simulated, ranks[rank], peak=False)
    assert simulated.peaks.allocated <= ranks[rank].peaks.allocated
    # FSDP2's own buffers, tagged from the same collectives as on real ranks
    assert simulated.components("temporaries")["all-gather"] == ranks[rank].components("temporaries")["all-gather"]
    assert simulated.components("temporaries")["unsharded params"] > 0
    assert simulated.settings.rank == rank and simulated.settings.estimate
    assert f"simulated rank {rank} of 2 (fsdp2)" in simulated.environment["distributed"]


@pytest.mark.slow
def test_simulated_zero1_ranks_agree_with_the_gloo_run(mlp_spec, zero1_adam):
    real = zero1_adam
    for rank in (0, 1):
        _same_rank_figures(simulate(mlp_spec, "adam", "zero1", rank=rank), real[rank])
    assert real[0].total("optimizer_state") != real[1].total("optimizer_state")  # the ranks differ: rank matters


@pytest.fixture(scope="module")
def fsdp2_tiny_gpt2(gpt2_spec):
    return run(gpt2_spec, "adam", "fsdp2")


def _shard_bytes(spec: str, ranks: int) -> tuple[int, int]:
    """(the whole model's parameter bytes, one rank's padded Shard(0) bytes) of an fp32 model."""
    from memprof.models import ModelOptions, build_model

    params = list(build_model(spec, ModelOptions(batch_size=2), device="meta").model.parameters())
    whole = sum(p.numel() * 4 for p in params)
    return whole, sum(-(-p.shape[0] // ranks) * (p.numel() // p.shape[0]) * 4 for p in params)


def _setup_peak(record) -> int:
    return max(p.peak for p in record.phase_peaks if p.phase == "setup")


@pytest.mark.slow
def test_fsdp2_ranks_materialise_only_their_shards(fsdp2_tiny_gpt2, gpt2_spec):
    whole, shard = _shard_bytes(gpt2_spec, 2)
    for record in fsdp2_tiny_gpt2:
        assert record.status == "ok" and not any(n.startswith("loss became") for n in record.notes)
        assert record.total("weights") == shard  # the materialised local shards' storage, padding included
        # built on meta and sharded there: the setup never holds the whole model (a full build did)
        assert _setup_peak(record) < whole
        assert any("built on the meta device" in n for n in record.notes)


@pytest.mark.slow
def test_simulated_fsdp2_peak_agrees_with_the_gloo_run_on_tiny_gpt2(fsdp2_tiny_gpt2, gpt2_spec):
    whole, shard = _shard_bytes(gpt2_spec, 2)
    for rank in (0, 1):
        simulated = simulate(gpt2_spec, "adam", "fsdp2", rank=rank)
        _same_rank_figures(simulated, fsdp2_tiny_gpt2[rank])
        assert simulated.total("weights") == shard and _setup_peak(simulated) < whole


def test_meta_builds_keep_the_batch_on_the_device(mlp_spec):
    from memprof.models import ModelOptions, build_model

    for name in (mlp_spec, "gpt2"):
        built = build_model(name, ModelOptions(batch_size=2, seq_len=8), "cpu", weights_on_meta=True)
        assert all(t.is_meta for t in (*built.model.parameters(), *built.model.buffers()))
        assert all(t.device.type == "cpu" for t in built.batch.values())


def test_materialised_llama_recomputes_its_rotary_buffers():
    import transformers

    from memprof.strategies.fsdp2 import initialise_materialised

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=100)
    reference = transformers.LlamaForCausalLM(config)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    initialise_materialised(model, seed=0)
    for (name, buffer), (_, expected) in zip(model.named_buffers(), reference.named_buffers()):
        assert torch.equal(buffer, expected), name
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.model.norm.weight, torch.ones(32))


def test_simulating_64_ranks_is_one_quick_process(mlp_spec):
    import time

    start = time.perf_counter()
    record = simulate(mlp_spec, "adam", "fsdp2", world_size=64, rank=63)
    assert time.perf_counter() - start < 30
    # 32- and 4-row parameters over 64 ranks: each rank's padded shard is one row of each, but rank 63's
    # local shards are empty (torch.chunk gives the rows to the first ranks), so Adam keeps no moments there
    padded_row = (16 + 1 + 32 + 1) * 4
    assert record.total("weights") == padded_row and record.components("optimizer_state").get("moment", 0) == 0
    first = simulate(mlp_spec, "adam", "fsdp2", world_size=64, rank=0)
    assert first.total("weights") == padded_row and first.components("optimizer_state")["moment"] == 2 * padded_row
    assert not torch.distributed.is_initialized()  # the fake process group lives for the call only


def test_estimate_command_prints_the_simulated_rank(mlp_spec):
    result = invoke("estimate", "--model", mlp_spec, "--opt", "adam", "--steps", "1", "--world-size", "4",
                    "--parallel", "zero1", "--rank", "3")
    assert result.exit_code == 0, result.output
    assert "zero1 × 4 ranks (simulated)" in result.stdout and "simulated rank 3 of 4 (zero1)" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--world-size", "0", "--parallel", "fsdp2"], "--world-size"),
    (["--world-size", "2", "--parallel", "fsdp2", "--rank", "2"], "rank 2 is outside --world-size 2"),
    (["--world-size", "4"], "--world-size 4 needs --parallel: choose ddp, fsdp2, zero1"),
])
def test_bad_simulation_input_is_one_line(mlp_spec, args, message):
    result = invoke("estimate", "--model", mlp_spec, "--opt", "adam", "--steps", "1", *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
