"""memprof estimate: fake tensors through the same runner and replay, against real CPU runs."""

from __future__ import annotations

import pytest

from cli_for_tests import invoke
from memprof.api import estimate, measure
from memprof.measure.gpus import GPUS, H100_DRIVER, H100_WORKSPACE
from memprof.optim.registry import registry
from memprof.taxonomy import PERSISTENT

EXACT = (*PERSISTENT, "activations")


def _pairs(model: str, specs: list[str], **settings):
    real = measure(model, specs, device="cpu", timeline=False, **settings)
    fake = estimate(model, specs, device="cpu", timeline=False, **settings)
    by_spec = {r.settings.spec: r for r in fake}
    return [(r, by_spec[r.settings.spec], [f for f in fake if f.settings.spec.startswith(r.settings.spec + ":")])
            for r in real]


def test_every_registered_optimizer_estimates_a_cpu_run_exactly(gpt2_spec):
    specs = [name for name, entry in registry().items() if entry.requires is None]
    for real, fake, upper in _pairs(gpt2_spec, specs, steps=1, batch_size=1):
        assert real.status == fake.status == "ok", (real.settings.spec, fake.failure)
        data_dependent = bool(registry()[real.settings.optimizer].upper_bound)
        for category in EXACT:
            if not (data_dependent and category == "optimizer_state"):
                assert fake.total(category) == real.total(category), (real.settings.spec, category)
        if data_dependent:
            # State that depends on the data (Adapprox's rank): the real run lies inside the range.
            (high,) = upper
            assert fake.total("optimizer_state") <= real.total("optimizer_state") <= high.total("optimizer_state")
            assert "lower end" in fake.notes[0] and "upper end" in high.notes[0]
            continue
        assert fake.peaks.allocated == real.peaks.allocated, real.settings.spec
        assert fake.peak == real.peak, real.settings.spec
        assert fake.settings.estimate and "fake tensors" in fake.environment["estimate"]


def test_resnet18_estimate_equals_the_cpu_run():
    for real, fake, _ in _pairs("resnet18", ["adam", "smmf", "sgd"], steps=1, batch_size=2, image_size=32):
        assert fake.breakdown == real.breakdown and fake.peak == real.peak, real.settings.spec


def test_a_cuda_estimate_rounds_blocks_and_adds_the_gpu_table(mlp_spec):
    (cpu,) = estimate(mlp_spec, "adam", device="cpu", steps=1)
    (cuda,) = estimate(mlp_spec, "adam", steps=1, gpu="h100")
    assert cuda.settings.device == "cuda" and cuda.total("optimizer_state") == cpu.total("optimizer_state")
    assert cuda.components("context") == {"library workspace": H100_WORKSPACE, "driver (gpu table)": H100_DRIVER}
    assert cuda.peaks.allocated % 512 == 0 and cuda.peaks.allocated > cpu.peaks.allocated + H100_WORKSPACE
    assert "512-B" in cuda.environment["estimate"] and "measured" in cuda.environment["estimate"]


def test_estimate_command_reports_fit_and_headroom(mlp_spec, tmp_path):
    out = tmp_path / "est.csv"
    result = invoke("estimate", "--model", mlp_spec, "--opt", "adam,sgd", "--steps", "1", "--memory", "1KiB",
                    "--csv", out)
    assert result.exit_code == 0, result.output
    assert "estimate for cuda (h100)" in result.stdout and " no " in result.stdout
    assert "True" in out.read_text().splitlines()[1]  # the estimate column
    fits = invoke("estimate", "--model", mlp_spec, "--opt", "adam", "--steps", "1", "--gpu", "rtx4090")
    assert fits.exit_code == 0 and " yes " in fits.stdout


@pytest.mark.parametrize("args, message", [
    (["--gpu", "h1000"], "unknown --gpu 'h1000'"),
    (["--memory", "lots"], "cannot read size 'lots'"),
    (["--memory", "0GiB"], "must be positive"),
    (["--opt", "adam8bit"], ""),
])
def test_estimate_bad_input_is_one_line(mlp_spec, args, message):
    result = invoke("estimate", "--model", mlp_spec, "--steps", "1", *(["--opt", "adam"] if "--opt" not in args else []),
                    *args)
    if args == ["--opt", "adam8bit"]:  # a CUDA-library optimizer is a row saying why, not a usage error
        assert result.exit_code in (2, 3), result.output
        return
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_gpu_table_says_where_each_figure_comes_from():
    for gpu in GPUS.values():
        assert gpu.source.startswith(("measured:", "assumed:")) and gpu.capacity_source
    assert GPUS["h100"].source.startswith("measured:")
