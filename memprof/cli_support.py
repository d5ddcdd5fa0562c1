"""What the commands share: the consoles, measuring with progress on stderr, checking every output path
before measuring, and writing the exports all or none. The commands themselves, and the exit codes, are
in ``memprof.cli``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import typer
from rich.console import Console
from rich.markup import escape

from memprof.errors import MeasurementFailed, UsageError
from memprof.report.formats import FORMATS, View

# Tables are data: when piped, keep them whole rather than folded to 80 columns.
out = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
err = Console(stderr=True)


def explicit_options(ctx: typer.Context, names: Sequence[str]) -> set[str]:
    """The options typed on the command line (they win over a config file)."""
    # By name: typer vendors its own click, whose ParameterSource is a different enum.
    return {n for n in names if getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE"}


# -- measuring, with progress on stderr ----------------------------------------------------------------
def measure(request, estimate: bool = False, plan=None) -> list:
    """Run one API request (its ``plan`` where ``api.validate`` checked it) with a spinner; the spinner
    starts at the first measurement, so that bad input fails as one clean line before it."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from memprof import api

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                        transient=True)
    task = progress.add_task("preparing…", total=None)

    def on_start(settings) -> None:
        if err.is_terminal:  # elsewhere a spinner only leaves a blank line
            progress.start()
        progress.update(task, description=f"measuring {settings.spec} on {settings.model} ({settings.device})")

    def on_result(record) -> None:
        from memprof.report.trace import record_label

        status = "ok" if record.status == "ok" else record.failure
        progress.console.print(f"[dim]{escape(f'{record_label(record)}: {status}')}[/dim]", highlight=False)

    try:
        if plan is not None:
            return api.run(plan, on_start=on_start, on_result=on_result)
        run = api.estimate if estimate else api.measure
        return run(request.model, request.optimizers, on_start=on_start, on_result=on_result, **request.settings)
    finally:
        if progress.live.is_started:
            progress.stop()


def fit_search(request, dimension: str) -> list:
    """Search the largest value that fits, with a spinner naming each probe."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from memprof import api

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                  transient=True) as progress:
        task = progress.add_task(f"fitting {dimension}…", total=None)

        def on_result(record) -> None:
            s = record.settings
            progress.update(task, description=f"{s.spec}: batch {s.batch_size}, seq {s.seq_len} estimated")

        return api.fit(request.model, request.optimizers, dimension, on_result=on_result, **request.settings)


def measure_requests(ctx: typer.Context, settings: dict[str, Any], config: Path | None, *, unit: str,
                      reference: str | None = None) -> list:
    """Measure what the command line (and the config file, if any) asks for, printing a table per request."""
    from memprof import api
    from memprof.distributed.launch import reporting
    from memprof.report.ranks import results_table

    todo = api.requests(settings, config=config, explicit=explicit_options(ctx, list(settings)))
    # every run of a config file is checked before the first is measured
    plans = [api.validate(request.model, request.optimizers, **request.settings) for request in todo]
    if reference is not None:
        check_reference(reference, todo)
    records = []
    for request, plan in zip(todo, plans):
        if request.description:
            err.print(request.description, style="bold", markup=False, highlight=False)
        batch = measure(request, plan=plan)
        if reporting():  # under a user's torchrun: rank 0 prints every rank's rows
            out.print(results_table(batch, unit=unit, baseline=reference))
        records.extend(batch)
    return records


def check_reference(reference: str, requests: Sequence) -> None:
    """``--reference`` must name a spec (or an optimizer) of every request, before anything is measured."""
    from memprof.optim.registry import parse_spec, split_specs

    for request in requests:
        texts = split_specs(request.optimizers)
        if reference not in texts and reference not in {parse_spec(t).name for t in texts}:
            raise UsageError(f"--reference {reference!r} is not one of the optimizers to measure; "
                             f"choose from {', '.join(texts)}")


def check_outputs(unit: str, plot: Path | None = None, *, specs: str | None = None,
                   **paths: Path | str | None) -> None:
    """Fail on a bad unit, figure extension or output path (``--csv=PATH``…) before measuring, not after:
    every file the command would write takes part, the figures beside ``plot`` and the snapshot of
    each of ``specs`` included."""
    from memprof.files import check_writable
    from memprof.units import scale

    scale(unit)
    snapshot = paths.pop("snapshot", None)
    outputs = [(f"--{name}", path) for name, path in paths.items()]
    for name in (name for name, path in paths.items() if path is not None and name in FORMATS):
        FORMATS[name].check()
    if snapshot is not None:
        from memprof.execute import snapshot_path
        from memprof.optim.registry import split_specs

        texts = split_specs(specs or "")
        names = [snapshot_path(snapshot, text, len(texts)) for text in texts] or [snapshot]
        outputs += [("--snapshot", name) for name in names]
    if plot is not None:
        from memprof.report.plot import figure_paths

        outputs += [("--plot", path) for path in figure_paths(plot).values()]
    check_writable(outputs)


def write_exports(records, *, plot: Path | None = None, unit: str = "MiB", detail: bool = False, top: int = 20,
                   rendered: Sequence[tuple[Path, bytes]] = (), fits: Sequence = (), **paths: Path | None) -> None:
    """Render every export (``paths`` by format name; ``fits`` for the views that draw a fit search) and figure,
    then write them with the ``rendered`` ones all or none (``memprof.files.write_all``): a failure leaves every
    file as it was."""
    from memprof.files import write_all

    view = View(unit=unit, detail=detail, top=top, fits=tuple(fits))
    outputs = [(path, FORMATS[name].render(records, view)) for name, path in paths.items() if path is not None]
    if plot is not None:
        from memprof.report.plot import figures

        outputs += figures(records, plot, unit=unit)
    outputs += rendered
    write_all(outputs)
    for path, _ in outputs:
        err.print(f"wrote {path}", highlight=False, markup=False)


def raise_if_failed(records) -> None:
    failed = [r for r in records if r.status != "ok"]
    if failed:
        raise MeasurementFailed(f"{len(failed)} of {len(records)} measurement(s) failed: "
                                + "; ".join(f"{r.settings.spec}: {r.failure or r.status}" for r in failed))


def append_step_summary(markdown: str) -> None:
    """Append to $GITHUB_STEP_SUMMARY when set. It is a side channel: a path that cannot be
    written is a warning on stderr, never a change of the verdict."""
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if not summary:
        return
    try:
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(markdown)
    except OSError as exc:
        err.print(f"warning: cannot append the summary to GITHUB_STEP_SUMMARY={summary}: {exc.strerror or exc}",
                  markup=False, highlight=False, soft_wrap=True)
