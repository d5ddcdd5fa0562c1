"""NCCL's communicator memory (memprof.nccl): the arithmetic from NCCL's defaults, its environment variables, and
the assumed context rows a distributed CUDA estimate gains (and that ``needs`` counts)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from cli_for_tests import invoke

from memprof.api import estimate
from memprof.errors import UsageError
from memprof.gpus import need
from memprof.nccl import NcclEnv, communicator, nccl_env
from memprof.record import Row

MiB = 1 << 20


def test_eight_h100s_hold_a_ring_of_32_channels_and_nvls_buffers_per_communicator():
    each = communicator("h100", 8, NcclEnv())
    # per channel: a receive connection of LL 512 KiB + LL128 4,800 KiB + Simple 4 MiB (+ header) rounded to
    # 10 MiB by cuMem's 2 MiB granularity, and a send connection's header rounded to 2 MiB
    assert each.ring == 32 * (10 + 2) * MiB
    assert each.nvls == 16 * 2 * (128 * 1024 * 8) * 8  # NVLS channels × 2 × chunk × NCCL_STEPS × 8 heads
    assert (each.channels, each.nvls_channels, each.nodes) == (32, 16, 1)


def test_across_nodes_the_tree_adds_its_connections_and_pcie_cards_without_p2p_hold_no_device_buffers():
    assert communicator("a100-80gb", 16, NcclEnv()).ring == 24 * 3 * 12 * MiB  # 2 nodes: ring + tree up and down
    assert communicator("a100-80gb", 16, NcclEnv()).nvls == 0
    assert communicator("rtx4090", 4, NcclEnv()).ring == 0  # SHM transport: host memory
    assert communicator("h100", 1, NcclEnv()).ring == 0


def test_nccls_environment_variables_resize_the_buffers():
    env = nccl_env({"NCCL_BUFFSIZE": str(MiB), "NCCL_MAX_NCHANNELS": "4", "NCCL_NVLS_ENABLE": "0"})
    each = communicator("h100", 8, env)
    assert (each.ring, each.nvls) == (4 * (8 + 2) * MiB, 0)  # 512 KiB + 4,800 KiB + 1 MiB rounds up to 8 MiB
    plain = communicator("h100", 2, replace(NcclEnv(), cumem=False, nvls_enable=0))
    assert plain.ring == 32 * (524_288 + 4_915_200 + 4 * MiB + 2 * 4096)
    assert "NCCL_BUFFSIZE" in each.how


@pytest.mark.parametrize("environ, message", [
    ({"NCCL_BUFFSIZE": "4M"}, "NCCL_BUFFSIZE='4M' is not a whole number"),
    ({"NCCL_MAX_NCHANNELS": "0"}, "NCCL_MAX_NCHANNELS=0 is below 1"),
])
def test_a_bad_nccl_variable_is_one_clear_error(environ, message):
    with pytest.raises(UsageError, match=message):
        nccl_env(environ)


def test_a_distributed_cuda_estimate_gains_assumed_nccl_rows_that_needs_counts(mlp_spec, monkeypatch):
    monkeypatch.delenv("NCCL_BUFFSIZE", raising=False)
    (ddp,) = estimate(mlp_spec, "adam", steps=1, target_gpu="h100", nproc=8, parallel="ddp")
    (alone,) = estimate(mlp_spec, "adam", steps=1, target_gpu="h100")
    rows = {r.component: r for r in ddp.breakdown if r.component.startswith("nccl")}
    assert {c: (r.bytes, r.basis) for c, r in rows.items()} == {
        "nccl ring buffers": (384 * MiB, "assumed"), "nccl nvls buffers": (256 * MiB, "assumed")}
    assert not any(r.component.startswith("nccl") for r in alone.breakdown)
    outside = sum(r.bytes for r in ddp.breakdown if r.basis in ("gpu table", "assumed"))
    assert need(ddp) == ddp.peaks.max_reserved + outside
    assert any(note.startswith("NCCL (assumed): 1 communicator(s)") for note in ddp.notes)


def test_nvml_measured_outside_the_allocator_replaces_the_assumed_rows(mlp_spec):
    (ddp,) = estimate(mlp_spec, "adam", steps=1, target_gpu="h100", nproc=2, parallel="ddp")
    assumed = need(ddp)
    ddp.breakdown = [r for r in ddp.breakdown if r.basis != "gpu table"] + [Row("context", "driver (nvml-reserved)",
                                                                              1000, "nvml")]
    assert need(ddp) == ddp.peaks.max_reserved + 1000 < assumed


def test_the_rank_table_shows_what_each_rank_needs(mlp_spec):
    result = invoke("estimate", "--model", mlp_spec, "--opt", "adam", "--steps", "1", "--world-size", "2",
                    "--parallel", "ddp", "--gpu", "h100", "--memory", "1GiB")
    assert result.exit_code == 0, result.output
    assert "needs" in result.stdout and "NCCL (assumed)" in result.stdout
