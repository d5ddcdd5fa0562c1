"""FSDP2 mixed precision (``--fsdp-mixed-precision``): fp32 shards, bf16 all-gathered parameters, fp32 reduce."""

import pytest
import torch
from cli_for_tests import invoke

from memprof import api, runfile
from memprof.errors import UsageError
from memprof.settings import Settings, config_keys, reproduce_command

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")

SHAPE = dict(batch_size=2, seq_len=32, steps=1)
SAME = ("weights", "gradients", "optimizer_state")


def real(model: str, precision: str | None):
    return api.measure(model, "adam", device="cpu", nproc=2, parallel="fsdp2", fsdp_mixed_precision=precision,
                       **SHAPE)


def simulated(model: str, precision: str | None, rank: int = 0, **settings):
    (record,) = api.estimate(model, "adam", device="cpu", nproc=2, parallel="fsdp2", rank=rank,
                             fsdp_mixed_precision=precision, **SHAPE, **settings)
    assert record.status == "ok", record.failure
    return record


@pytest.fixture(scope="module")
def real_runs(tiny_configs):
    """Two gloo ranks of tiny GPT-2, without and with the bf16 policy."""
    return {precision: real(tiny_configs["gpt2"], precision) for precision in (None, "bf16")}


def _assert_halves_the_gathered_parameters(fp32, mixed) -> None:
    for category in SAME:  # the fp32 shards, their fp32 gradients and Adam's fp32 moments
        assert mixed.components(category) == fp32.components(category), category
    gathered, plain = mixed.components("temporaries"), fp32.components("temporaries")
    assert gathered["all-gather"] * 2 == plain["all-gather"]  # the bf16 all-gather buffer: half the bytes
    assert gathered["unsharded params"] * 2 == plain["unsharded params"]
    assert gathered["reduce-scatter"] == plain["reduce-scatter"]  # gradients reduced in fp32
    # bf16 compute: saved activations drop, not to half (the loss upcasts the logits to fp32)
    assert mixed.total("activations") < 0.7 * fp32.total("activations")
    assert mixed.peaks.allocated < fp32.peaks.allocated


@pytest.mark.slow
def test_real_ranks_gather_bf16_over_unchanged_fp32_shards(real_runs):
    fp32, mixed = real_runs[None], real_runs["bf16"]
    for rank in (0, 1):
        assert mixed[rank].status == "ok", mixed[rank].failure
        assert mixed[rank].settings.fsdp_mixed_precision == "bf16" and mixed[rank].settings.rank == rank
        _assert_halves_the_gathered_parameters(fp32[rank], mixed[rank])
        assert any(n.startswith("mixed precision (MixedPrecisionPolicy)") for n in mixed[rank].notes)
        assert not any(n.startswith("mixed precision") for n in fp32[rank].notes)


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_simulated_rank_agrees_with_the_gloo_run(real_runs, tiny_configs, rank):
    measured = real_runs["bf16"][rank]
    estimated = simulated(tiny_configs["gpt2"], "bf16", rank=rank)
    for category in SAME:
        assert estimated.components(category) == measured.components(category), category
    for component in ("all-gather", "unsharded params", "reduce-scatter"):
        assert estimated.components("temporaries")[component] == measured.components("temporaries")[component]
    assert estimated.total("activations") == measured.total("activations")
    assert abs(estimated.peaks.allocated - measured.peaks.allocated) <= 0.05 * measured.peaks.allocated


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_simulated_policy_halves_the_gathered_parameters(tiny_configs, precision):
    _assert_halves_the_gathered_parameters(simulated(tiny_configs["gpt2"], None),
                                           simulated(tiny_configs["gpt2"], precision))


def test_the_setting_is_a_csv_column_a_config_key_a_title_and_a_reproduce_flag(tiny_configs, tmp_path):
    record = simulated(tiny_configs["gpt2"], "bf16")
    path = tmp_path / "mixed.csv"
    runfile.write(path, [record])
    (back,) = runfile.read(path)
    assert back.settings.fsdp_mixed_precision == "bf16"
    assert config_keys()["fsdp_mixed_precision"] == "fsdp_mixed_precision"
    assert record.settings.recipes() == "mixed precision bf16 (fp32 reduce)"
    command = reproduce_command(record.settings, ["adam"])
    assert command.startswith("memprof estimate") and "--parallel fsdp2 --fsdp-mixed-precision bf16" in command


def test_a_csv_written_before_the_setting_still_loads(tiny_configs, tmp_path):
    record = simulated(tiny_configs["gpt2"], None)
    path = tmp_path / "old.csv"
    runfile.write(path, [record])
    lines = path.read_text().splitlines()
    column = lines[0].split(",").index("fsdp_mixed_precision")
    path.write_text("\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != column)
                              for line in lines) + "\n")
    (back,) = runfile.read(path)
    assert back.settings.fsdp_mixed_precision is None and back.settings.parallel == "fsdp2"


@pytest.mark.parametrize("args, message", [
    (["--fsdp-mixed-precision", "bf16"], "--fsdp-mixed-precision bf16 is FSDP2's MixedPrecisionPolicy: it needs "
                                         "--parallel fsdp2 (got none)"),
    (["--nproc", "2", "--parallel", "ddp", "--fsdp-mixed-precision", "bf16"], "needs --parallel fsdp2 (got ddp)"),
    (["--nproc", "2", "--parallel", "fsdp2", "--fsdp-mixed-precision", "bf16", "--dtype", "bfloat16"],
     "keeps fp32 shards as the master copy: it needs --dtype float32 (got bfloat16)"),
    (["--nproc", "2", "--parallel", "fsdp2", "--fsdp-mixed-precision", "bf16", "--amp", "bf16"],
     "already computes in bf16: drop --amp bf16"),
    (["--nproc", "2", "--parallel", "fsdp2", "--fsdp-mixed-precision", "fp8"],
     "unknown fsdp_mixed_precision 'fp8'; choose bf16, fp16"),
])
def test_bad_input_is_one_line(mlp_spec, args, message):
    result = invoke("compare", "--model", mlp_spec, "--opt", "adam", "--device", "cpu", *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_estimate_refuses_it_without_fsdp2(mlp_spec):
    result = invoke("estimate", "--model", mlp_spec, "--opt", "adam", "--steps", "1", "--world-size", "2",
                    "--parallel", "zero1", "--fsdp-mixed-precision", "bf16")
    assert result.exit_code == 2 and "needs --parallel fsdp2 (got zero1)" in result.stderr, result.output
    with pytest.raises(UsageError, match="needs --parallel fsdp2"):
        Settings(fsdp_mixed_precision="bf16")
