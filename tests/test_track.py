"""memprof.track around a loop the test writes: the same record as memprof's own runner, and what it says of a
loop that is not memprof's (warm-up skipped, several optimizers, unknown ones, accumulation, failures)."""

from __future__ import annotations

import pytest
import torch

import memprof
from memprof.api import measure
from memprof.errors import UsageError
from memprof.models import ModelOptions, build_model
from memprof.optim.registry import build_optimizer, parse_spec

STEPS = 3


def tracked_runner_loop(model: str, spec: str, options: ModelOptions) -> memprof.RunRecord:
    """The runner's loop (memprof.measure.runner), written as a user would: same model, batch, optimizer, steps."""
    torch.manual_seed(0)
    built = build_model(model, options, device="cpu")
    optimizer = build_optimizer(parse_spec(spec), built.model)

    def step() -> None:
        optimizer.zero_grad()
        loss = built.loss(built.model, built.batch)
        loss.backward()
        del loss  # as the runner does: a loss kept through the optimizer step is 4 more bytes at a step peak
        optimizer.step()

    with memprof.track(built.model, optimizer) as run:
        for _ in range(STEPS):
            step()
    return run.record


@pytest.mark.parametrize(("model", "spec", "sizes"), [
    ("gpt2", "adam", {"batch_size": 2, "seq_len": 16}),
    ("gpt2", "smmf", {"batch_size": 2, "seq_len": 16}),
    ("resnet18", "adam", {"batch_size": 2, "image_size": 32}),
])
def test_a_tracked_loop_gives_the_runners_bytes_and_peak(model, spec, sizes, tiny_configs):
    name = tiny_configs.get(model, model)
    (expected,) = measure(name, spec, device="cpu", steps=STEPS, **sizes)
    tracked = tracked_runner_loop(name, spec, ModelOptions(**sizes))
    assert tracked.status == "ok", tracked.failure
    # resnet18's labels go to the loss, not the model: the hooks cannot tell them from a tensor saved for backward
    # (nll_loss saves its target), so their 16 bytes are activations here and inputs in the runner's record
    labels = 2 * 8 if model == "resnet18" else 0
    for category in ("weights", "gradients", "optimizer_state", "temporaries", "step_transient"):
        assert tracked.components(category) == expected.components(category), category
    assert tracked.total("activations") - expected.total("activations") == labels
    assert expected.total("inputs") - tracked.total("inputs") == labels
    assert tracked.peaks.allocated == expected.peaks.allocated
    assert (tracked.peaks.phase, tracked.peaks.step) == (expected.peaks.phase, expected.peaks.step)
    if not labels:
        assert tracked.peak == expected.peak
    assert [(p.name, p.by_key, p.roles) for p in tracked.parameters] == [
        (p.name, p.by_key, p.roles) for p in expected.parameters]
    assert (tracked.settings.spec, tracked.settings.steps, tracked.settings.batch_size) == (spec, STEPS, 2)


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def train(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], steps: int, micro: int = 1) -> None:
    x = torch.randn(8, 16)
    for _ in range(steps):
        for _ in range(micro):
            model(x).square().mean().backward()
        for optimizer in optimizers:
            optimizer.step()
        for optimizer in optimizers:
            optimizer.zero_grad()


def test_skipped_warm_up_steps_are_not_in_the_window_and_the_model_is_found():
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters())
    with memprof.track(steps=2, skip=1) as run:  # model and optimizer found by the hooks
        train(model, [optimizer], 5)
    record = run.record
    assert record.settings.steps == 2 and record.settings.model == "Sequential"
    assert [p.step for p in record.phase_peaks if p.phase == "forward"] == [1, 2]
    assert record.total("optimizer_state") == 2 * 4 * sum(p.numel() for p in model.parameters()) + 4 * 4
    assert record.total("weights") == record.total("gradients") == 4 * sum(p.numel() for p in model.parameters())
    # state and weights from the skipped step are live from the window's start
    assert record.phase_peaks[0].start >= record.total("optimizer_state") + record.total("weights")
    assert any("after 1 skipped" in note for note in record.notes)


def test_two_optimizers_stepped_together_are_one_step_each_with_its_own_state():
    model = mlp()
    adam = torch.optim.Adam(model[0].parameters())
    sgd = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    with memprof.track(model) as run:
        train(model, [adam, sgd], 3)
    record = run.record
    first, last = (sum(p.numel() for p in model[i].parameters()) for i in (0, 2))
    assert record.settings.steps == 3 and record.settings.spec == "adam+sgd"
    assert record.components("optimizer_state") == {"moment (adam)": 2 * 4 * first, "other (adam)": 2 * 4,
                                                    "moment (sgd)": 4 * last}
    assert [p.phase for p in record.phase_peaks if p.step == 2] == ["forward", "backward", "step", "between steps"]


def test_an_unregistered_optimizer_has_its_roles_inferred_and_marked():
    model = mlp()
    with memprof.track(model, torch.optim.RAdam(model.parameters())) as run:
        train(model, run.optimizers, 2)
    assert run.record.inferred_roles
    assert run.record.settings.spec == "torch.optim.radam.RAdam"
    assert any("roles inferred for torch.optim.radam.RAdam" in note for note in run.record.notes)


def test_gradient_accumulation_is_micro_batches_of_one_step():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(model, optimizer) as run:
        train(model, [optimizer], 2, micro=3)
    assert run.record.settings.grad_accum == 3 and run.record.settings.steps == 2
    assert [p.micro for p in run.record.phase_peaks if p.phase == "backward" and p.step == 2] == [0, 1, 2]


def test_a_block_without_an_optimizer_step_or_with_too_few_says_what_it_saw():
    model = mlp()
    with pytest.raises(UsageError, match="saw no optimizer step and 2 forward pass"):
        with memprof.track(model):
            model(torch.randn(2, 16))
            model(torch.randn(2, 16)).sum().backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UsageError, match="steps=3 after skip=1 but saw 2 optimizer step"):
        with memprof.track(model, optimizer, steps=3, skip=1) as run:
            train(model, [optimizer], 2)
    assert run.record is None


def test_a_loop_that_raises_keeps_the_steps_so_far_as_a_failed_record():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ZeroDivisionError):
        with memprof.track(model, optimizer) as run:
            train(model, [optimizer], 2)
            model(torch.randn(2, 16))
            1 / 0
    assert run.record.status == "failed"
    assert run.record.failure == "ZeroDivisionError: division by zero in forward (step 3)"


@pytest.mark.parametrize("bad", [{"steps": 0}, {"skip": -1}, {"model": "gpt2"}, {"optimizer": object()}])
def test_bad_arguments_are_one_usage_error(bad):
    with pytest.raises(UsageError, match="memprof.track: "):
        memprof.track(**bad)


def test_cuda_blocks_held_before_the_history_are_live_from_its_start():
    from memprof.measure.trackers import blocks_from_trace

    mib = 2**20
    before = [{"device": 0, "address": 0, "total_size": 4 * mib, "blocks": [
        {"size": 2 * mib, "state": "active_allocated"}, {"size": 2 * mib, "state": "inactive"}]}]
    trace = [{"action": "alloc", "addr": 2 * mib, "size": mib, "time_us": 10},  # into the free rest: split
             {"action": "free_requested", "addr": 0, "size": 2 * mib, "time_us": 20},
             {"action": "free_completed", "addr": 0, "size": 2 * mib, "time_us": 20}]
    held, new = blocks_from_trace(trace, segments_before=before)
    assert (held.ptr, held.nbytes, held.start, held.end) == (0, 2 * mib, 0.0, 20.0)
    assert (new.ptr, new.nbytes, new.start, new.end) == (2 * mib, mib, 10.0, None)
    # without the snapshot the free of the held block is of nothing known, and it is not counted at all
    assert [(a.ptr, a.nbytes) for a in blocks_from_trace(trace)] == [(2 * mib, mib)]
