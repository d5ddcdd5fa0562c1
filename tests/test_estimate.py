"""memprof estimate: fake tensors through the same runner and replay, against real CPU runs."""

from __future__ import annotations

import pytest
from cli_for_tests import invoke

from memprof.api import estimate, measure
from memprof.gpus import GPUS, H100_DRIVER, H100_WORKSPACE
from memprof.optim.registry import registry
from memprof.taxonomy import PERSISTENT

EXACT = PERSISTENT
CLOSE = 0.005  # a real CPU run can lose small storages when an address is reused before the old one's finalizer ran
SLACK = 256  # bytes: on the MLP (activations of ~512 B) one such storage is a large share


def _pairs(model: str, specs: list[str], **settings):
    real = measure(model, specs, device="cpu", timeline=False, **settings)
    fake = estimate(model, specs, device="cpu", timeline=False, **settings)
    by_spec = {r.settings.spec: r for r in fake}
    return [(r, by_spec[r.settings.spec], [f for f in fake if f.settings.spec.startswith(r.settings.spec + ":")])
            for r in real]


EVERY = [name for name, entry in registry().items() if entry.requires is None]
CANNOT_ESTIMATE = {"spam"}  # pytorch-optimizer's SPAM masks spikes with nonzero(): a data-dependent shape
ON_GPT2 = ["adam", "adafactor", "smmf", "alada", "adamem", "adapprox", "io_adam", "galore", "adam_mini"]


@pytest.mark.parametrize("model, specs", [("mlp", EVERY), ("tiny_gpt2", ON_GPT2)])
def test_every_registered_optimizer_estimates_a_cpu_run_exactly(mlp_spec, gpt2_spec, model, specs):
    cannot = {}
    for real, fake, upper in _pairs(mlp_spec if model == "mlp" else gpt2_spec, specs, steps=1, batch_size=4):
        assert real.status == "ok", (real.settings.spec, real.failure)
        if fake.status != "ok":
            # An op whose output shape depends on the data cannot run on fake tensors: a row says which.
            assert "aten." in fake.failure and "(step 1)" in fake.failure, fake.failure
            cannot[real.settings.spec] = fake.failure
            continue
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
        for fake_bytes, real_bytes in ((fake.peaks.allocated, real.peaks.allocated),
                                       (fake.total("activations"), real.total("activations"))):
            assert abs(fake_bytes - real_bytes) <= max(SLACK, CLOSE * real_bytes), real.settings.spec
        assert fake.settings.estimate and "fake tensors" in fake.environment["estimate"]
    assert set(cannot) <= CANNOT_ESTIMATE, cannot


def test_smmf_walks_one_row_block_of_fake_tensors_and_peaks_as_the_real_walk_of_all(gpt2_spec, monkeypatch):
    from memprof.optim import smmf

    monkeypatch.setattr(smmf, "_CHUNK_ELEMENTS", 40)  # many row blocks per parameter, most with a shorter last one
    ((real, fake, _),) = _pairs(gpt2_spec, ["smmf"], steps=2, batch_size=4)
    for category in EXACT:
        assert fake.total(category) == real.total(category), category
    assert [(p.phase, p.step, p.peak) for p in fake.phase_peaks] == [(p.phase, p.step, p.peak) for p in real.phase_peaks]
    assert fake.peaks.allocated == real.peaks.allocated


def test_resnet18_estimate_equals_the_cpu_run():
    for real, fake, _ in _pairs("resnet18", ["adam", "smmf", "sgd"], steps=1, batch_size=2, image_size=32):
        for category in EXACT:
            assert fake.total(category) == real.total(category), (real.settings.spec, category)
        # the real CPU run can lose a small saved storage to address reuse (2048 B seen on resnet18)
        for fake_bytes, real_bytes in ((fake.peaks.allocated, real.peaks.allocated),
                                       (fake.total("activations"), real.total("activations"))):
            assert abs(fake_bytes - real_bytes) <= max(4096, CLOSE * real_bytes), real.settings.spec


def test_a_cuda_estimate_rounds_blocks_and_adds_the_gpu_table(mlp_spec):
    (cpu,) = estimate(mlp_spec, "adam", device="cpu", steps=1)
    (cuda,) = estimate(mlp_spec, "adam", steps=1, target_gpu="h100")
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
    if args == ["--opt", "adam8bit"]:  # a CUDA-library optimizer: its documented layout, marked analytic
        assert result.exit_code == 0 and "analytic: state laid out as bitsandbytes documents it" in result.stdout
        return
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_gpu_table_says_where_each_figure_comes_from():
    for gpu in GPUS.values():
        assert gpu.source.startswith(("measured:", "assumed:")) and gpu.capacity_source
    assert GPUS["h100"].source.startswith("measured:")


def test_fit_finds_the_largest_batch_that_fits_and_confirms_it(mlp_spec):
    from memprof.api import fit
    from memprof.gpus import need

    (at_8,) = estimate(mlp_spec, "sgd", device="cpu", steps=2, batch_size=8)
    (result,) = fit(mlp_spec, "sgd", "batch-size", device="cpu", steps=2, memory=f"{need(at_8)}B")
    assert result.value == 8 and result.record.settings.batch_size == 8 and need(result.record) == need(at_8)
    probes = dict(result.probes)
    assert probes[9] > need(at_8) and all(n <= need(at_8) for v, n in probes.items() if v <= 8)


@pytest.mark.slow
def test_several_optimizers_fit_in_forked_workers_as_they_would_in_turn(mlp_spec):
    # A fresh process that has not trained searches each optimizer in a forked worker; here, in turn.
    import json
    import os
    import subprocess
    import sys

    from memprof.api import fit

    if sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("estimates fork workers only on Linux with two cores or more")
    settings = dict(device="cpu", steps=2, memory="16KiB")  # batch 22 for SGD, 16 for Adam: 9 probes each
    script = (
        "import json\n"
        "from memprof import api\n"
        "seen = []\n"
        f"fits = api.fit({mlp_spec!r}, 'sgd,adam', 'batch-size', on_result=lambda r: seen.append(r.settings.spec), "
        f"**{settings!r})\n"
        "print(json.dumps({'fits': [(f.spec, f.value, f.probes, f.failure) for f in fits], 'seen': seen}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    forked = json.loads(done.stdout.strip().splitlines()[-1])
    in_turn = fit(mlp_spec, "sgd,adam", "batch-size", **settings)
    assert forked["fits"] == json.loads(json.dumps([(f.spec, f.value, f.probes, f.failure) for f in in_turn]))
    assert all(f.value > 1 for f in in_turn) and in_turn[0].value > in_turn[1].value  # SGD keeps no state
    assert forked["seen"] == [f.spec for f in in_turn for _ in f.estimates]  # every estimate reported


def test_fit_needs_a_budget_and_a_known_setting(mlp_spec):
    from memprof.api import fit
    from memprof.errors import UsageError

    with pytest.raises(UsageError, match="needs a budget"):
        fit(mlp_spec, "sgd", "batch-size", device="cpu")
    result = invoke("estimate", "--model", mlp_spec, "--opt", "sgd", "--fit", "width", "--gpu", "h100")
    assert result.exit_code == 2 and "unknown --fit 'width'; choose batch-size, seq-len" in result.stderr


def test_profile_estimate_shows_the_parameter_table(mlp_spec):
    result = invoke("profile", "--model", mlp_spec, "--opt", "adafactor", "--estimate", "--steps", "2", "--top", "2")
    assert result.exit_code == 0, result.output
    assert "0.weight" in result.stdout and "allocated per phase (estimated" in result.stdout


@pytest.mark.parametrize("name, expected", [
    # weight 64 x 128 = 8192 elements (quantized), bias 64 (kept plain), as docs/baselines.md lays them out
    ("adam8bit", 2 * 8192 + 2 * 32 * 4 + 2 * 256 * 4 + 2 * 64 * 4),
    ("ao_adamw8bit", 2 * (8192 + 32 * 4 + 256 * 4) + 2 * 64 * 4 + 2 * 4),
    ("ao_adamw4bit", 2 * (4096 + 64 * 4 + 16 * 4) + 2 * 64 * 4 + 2 * 4),
    ("ao_adamw_fp8", 2 * (8192 + 32 * 4) + 2 * 64 * 4 + 2 * 4),
])
def test_cuda_library_optimizers_estimate_with_their_documented_layout(name, expected):
    import torch

    from memprof.measure.state import unique_bytes, walk_state
    from memprof.optim.registry import build_optimizer, parse_spec

    spec = parse_spec(name)
    layer = torch.nn.Linear(128, 64)
    optimizer = build_optimizer(spec, layer, analytic=True)
    layer(torch.randn(2, 128)).sum().backward()
    optimizer.step()
    names = {p: n for n, p in layer.named_parameters()}
    state = walk_state(optimizer, names, spec.entry.state_roles())
    assert unique_bytes([s.tensor for s in state]) == expected
    assert not any(s.inferred for s in state) and {s.role for s in state} <= {"quant", "moment", "other"}


@pytest.mark.slow
def test_several_optimizers_estimate_in_forked_workers_as_they_would_in_turn(mlp_spec):
    # A fresh process that has not trained forks one worker per core; this process has trained (other tests),
    # so here they run in turn: both must give the same records.
    import json
    import os
    import subprocess
    import sys

    if sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("estimates fork workers only on Linux with two cores or more")
    script = (
        "import json, sys\n"
        "from memprof import api\n"
        "from memprof.measure import runner\n"
        f"records = api.estimate({mlp_spec!r}, ['adam', 'sgd', 'smmf'], device='cpu', steps=1, timeline=False)\n"
        "print(json.dumps({'trained_here': runner.trained_here,\n"
        "                  'peaks': [r.peaks.allocated for r in records],\n"
        "                  'state': [r.total('optimizer_state') for r in records]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    forked = json.loads(done.stdout.strip().splitlines()[-1])
    in_turn = estimate(mlp_spec, ["adam", "sgd", "smmf"], device="cpu", steps=1, timeline=False)
    assert forked["trained_here"] is False  # the parent ran no step: the workers did
    assert forked["peaks"] == [r.peaks.allocated for r in in_turn]
    assert forked["state"] == [r.total("optimizer_state") for r in in_turn]
