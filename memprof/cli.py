"""The memprof command line: parse, call the API, render. Heavy imports happen inside commands.

Exit codes are decided in ``main()`` alone, from ``EXIT_CODES``: 0 ok, 1 a gate regression,
2 bad input, 3 a measurement failed (its row is still written), 4 measured but the outputs could
not be written (none was changed); a signal that stops the run gives ``128 + signum``: 130 Ctrl-C
(SIGINT), 143 SIGTERM.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional, Sequence

import typer
from rich.console import Console
from rich.markup import escape

from memprof.errors import GateRegression, MeasurementFailed, MemprofError, OutputsNotWritten, Terminated, UsageError
from memprof.gpus import DEFAULT_GPU
from memprof.cli_options import (
    ConfigOpt,
    PlotOpt,
    ReferenceOpt,
    TopOpt,
    UnitOpt,
    export_options,
    filled,
    run_options,
)
from memprof.report.formats import FORMATS, View, listed

EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (GateRegression, 1),
    (UsageError, 2),
    (MeasurementFailed, 3),
    (OutputsNotWritten, 4),
)
"""The first matching type decides the exit code (0 when nothing was raised)."""

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Where every byte of a training step goes: weights, gradients, each piece of optimizer state, "
    "activations, step transients, allocator and driver overhead.",
)
# Tables are data: when piped, keep them whole rather than folded to 80 columns.
out = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
err = Console(stderr=True)

ReportFormat = Enum("ReportFormat", {name: name for name in ("table", *FORMATS)}, type=str)
"""``memprof report --format``: the terminal table or an export format."""


def _explicit(ctx: typer.Context, names: Sequence[str]) -> set[str]:
    """The options typed on the command line (they win over a config file)."""
    # By name: typer vendors its own click, whose ParameterSource is a different enum.
    return {n for n in names if getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE"}


# -- measuring, with progress on stderr ----------------------------------------------------------------
def _measure(request, estimate: bool = False, plan=None) -> list:
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
        status = "ok" if record.status == "ok" else record.failure
        progress.console.print(f"[dim]{escape(f'{record.settings.spec}: {status}')}[/dim]", highlight=False)

    try:
        if plan is not None:
            return api.run(plan, on_start=on_start, on_result=on_result)
        run = api.estimate if estimate else api.measure
        return run(request.model, request.optimizers, on_start=on_start, on_result=on_result, **request.settings)
    finally:
        if progress.live.is_started:
            progress.stop()


def _fit(request, dimension: str) -> list:
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


def _measure_requests(ctx: typer.Context, settings: dict[str, Any], config: Path | None, *, unit: str,
                      reference: str | None = None) -> list:
    """Measure what the command line (and the config file, if any) asks for, printing a table per request."""
    from memprof import api
    from memprof.distributed.launch import reporting
    from memprof.report.ranks import results_table

    todo = api.requests(settings, config=config, explicit=_explicit(ctx, list(settings)))
    # every run of a config file is checked before the first is measured
    plans = [api.validate(request.model, request.optimizers, **request.settings) for request in todo]
    if reference is not None:
        _check_reference(reference, todo)
    records = []
    for request, plan in zip(todo, plans):
        if request.description:
            err.print(request.description, style="bold", markup=False, highlight=False)
        batch = _measure(request, plan=plan)
        if reporting():  # under a user's torchrun: rank 0 prints every rank's rows
            out.print(results_table(batch, unit=unit, baseline=reference))
        records.extend(batch)
    return records


def _check_reference(reference: str, requests: Sequence) -> None:
    """``--reference`` must name a spec (or an optimizer) of every request, before anything is measured."""
    from memprof.optim.registry import parse_spec, split_specs

    for request in requests:
        texts = split_specs(request.optimizers)
        if reference not in texts and reference not in {parse_spec(t).name for t in texts}:
            raise UsageError(f"--reference {reference!r} is not one of the optimizers to measure; "
                             f"choose from {', '.join(texts)}")


def _check_outputs(unit: str, plot: Path | None = None, *, specs: str | None = None,
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


def _write_exports(records, *, plot: Path | None = None, unit: str = "MiB", detail: bool = False, top: int = 20,
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


def _raise_if_failed(records) -> None:
    failed = [r for r in records if r.status != "ok"]
    if failed:
        raise MeasurementFailed(f"{len(failed)} of {len(records)} measurement(s) failed: "
                                + "; ".join(f"{r.settings.spec}: {r.failure or r.status}" for r in failed))


# -- commands ----------------------------------------------------------------------------------------------
@app.command()
@run_options("run", "capture", "distributed")
@export_options
def compare(
    ctx: typer.Context,
    settings: dict,
    reference: ReferenceOpt = None,
    unit: UnitOpt = "MiB",
    *,
    exports: dict,
    config: ConfigOpt = None,
) -> None:
    """Measure several optimizers on one model, side by side.

    Example: memprof compare --model gpt2 --opt smmf,adam --csv gpt2.csv --latex gpt2.tex --plot gpt2.pdf
    """
    from memprof.distributed.launch import reporting

    _check_outputs(unit, **exports, snapshot=settings["snapshot"], specs=settings["spec"])
    records = _measure_requests(ctx, settings, config, unit=unit, reference=reference)
    if reporting():
        _write_exports(records, **exports, unit=unit)
    _raise_if_failed(records)


@app.command()
@run_options("run", "capture", spec={"default": "adam", "help": "One optimizer spec."})
@export_options
def profile(
    settings: dict,
    top: TopOpt = 20,
    unit: UnitOpt = "MiB",
    *,
    exports: dict,
    estimate: Annotated[bool, typer.Option("--estimate", help="On fake tensors, as `memprof estimate` does: for a model that does not fit here (target: --device, cuda when auto).")] = False,
) -> None:
    """One optimizer in depth: every category, the composition at the peak, state per parameter.

    Example: memprof profile --model resnet50 --opt smmf --top 10
             memprof profile --model llama-7b --opt smmf --estimate --seq-len 2048
    """
    from memprof import api
    from memprof.optim.registry import split_specs
    from memprof.report.table import print_tables, profile_tables

    _check_outputs(unit, **exports, snapshot=settings["snapshot"], specs=settings["spec"])
    if len(split_specs(settings["spec"])) != 1:
        raise UsageError("profile takes one optimizer; use `memprof compare` for several")
    (request,) = api.requests(settings)
    records = _measure(request, estimate=estimate)
    record = records[0]
    if record.status != "ok":
        err.print(f"[red]{record.settings.spec}: {record.failure}[/red]", highlight=False)
    print_tables(profile_tables(record, unit=unit, top=top), out)
    _write_exports(records, **exports, unit=unit, detail=True)
    _raise_if_failed(records)


@app.command()
@run_options("run", "estimate", "distributed", "capture",
             nproc={"flags": ("--world-size", "--nproc"),
                    "help": "Ranks to simulate (with --parallel): one process, a fake process group; --rank picks "
                            "the rank whose figures are given (default 0)."},
             device={"flags": ("--target", "--device"), "default": "cuda",
                                        "help": "What the estimate is for: cuda (a GPU run, the default; no GPU "
                                                "needed) or cpu."},
             steps={"default": 2, "help": "Training steps on fake tensors: the first creates the optimizer state, "
                                          "the second has it live through forward and backward."})
@export_options
@filled(default_gpu=DEFAULT_GPU)
def estimate(
    settings: dict,
    reference: ReferenceOpt = None,
    unit: UnitOpt = "GiB",
    *,
    exports: dict,
    fit: Annotated[Optional[str], typer.Option(metavar="SETTING", help="Find the largest batch-size or seq-len that fits the budget (--memory or --gpu), per optimizer; --plot then draws what each needs against it.")] = None,
) -> None:
    """Estimate a model that need not fit this machine: every byte per optimizer, on fake tensors.

    The same runner and replay as compare, with nothing allocated: exact weights, gradients and
    optimizer state, and the peak a GPU run would reach (512-B allocator blocks, and the library
    workspace and CUDA context of --gpu, default {default_gpu}). GPUs: h100 (measured), h200, a100-80gb,
    a100-40gb, l40s, rtx4090 (the H100's workspace and context, marked as assumed).

    Example: memprof estimate --model llama-7b --opt adam,smmf,adafactor --seq-len 2048 --gpu h100
             memprof estimate --model llama-7b --opt adam --world-size 64 --parallel fsdp2 --rank 0
    """
    from memprof import api
    from memprof.report.ranks import rank_table
    from memprof.report.table import estimate_table, fit_table

    plot = exports.pop("plot")
    _check_outputs(unit, plot, **exports, snapshot=settings["snapshot"], specs=settings["spec"])
    if fit is not None and settings["snapshot"] is not None:
        raise UsageError("--snapshot records one estimate; --fit makes many: drop one of them")
    (request,) = api.requests(settings)
    if reference is not None:
        _check_reference(reference, [request])
    if fit is not None:
        fits = _fit(request, fit)
        out.print(fit_table(fits, unit=unit))
        records = [f.record for f in fits if f.record is not None]
        rendered = []
        if plot is not None:
            from memprof.report.plot import fit_figure

            rendered.append(fit_figure(fits, plot, unit=unit))
        _write_exports(records, **exports, unit=unit, rendered=rendered, fits=fits)
        if any(f.failure for f in fits):
            raise MeasurementFailed("; ".join(f"{f.spec}: {f.failure}" for f in fits if f.failure))
        return
    records = _measure(request, estimate=True)
    simulated = any(r.settings.parallel != "none" for r in records)
    out.print((rank_table if simulated else estimate_table)(records, unit=unit, baseline=reference))
    _write_exports(records, **exports, plot=plot, unit=unit)
    _raise_if_failed(records)


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run files written by --json (one or more).", show_default=False)],
    format: Annotated[ReportFormat, typer.Option("--format", "-f", help=f"table (terminal), {listed(FORMATS)}.")] = ReportFormat.table,
    unit: UnitOpt = "MiB",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
    plot: PlotOpt = None,
    detail: Annotated[bool, typer.Option(help="Markdown/LaTeX: add each record's breakdown (and top parameters).")] = False,
    top: TopOpt = 20,
) -> None:
    """Re-render saved runs without measuring anything.

    Example: memprof report gpt2.json --format latex --unit GiB -o gpt2.tex --plot gpt2.pdf
    """
    from memprof import runfile

    _check_outputs(unit, plot, output=output)
    if format is not ReportFormat.table:
        FORMATS[format.value].check()
    if format is ReportFormat.table and output is not None:
        raise UsageError(f"--format table prints to the terminal; with -o choose {listed(FORMATS)}")
    records = [record for path in runs for record in runfile.read(path)]
    if format is ReportFormat.table:
        from memprof.report.ranks import results_table
        from memprof.report.table import print_tables, profile_tables

        tables = profile_tables(records[0], unit=unit, top=top) if len(records) == 1 else [results_table(records, unit=unit)]
        print_tables(tables, out)
    elif output is None:
        sys.stdout.write(FORMATS[format.value].render(records, View(unit=unit, detail=detail, top=top)))
    exported = {format.value: output} if output is not None else {}
    _write_exports(records, plot=plot, unit=unit, detail=detail, top=top, **exported)


@app.command()
@run_options("run", "distributed",
             spec={"default": "adam,adafactor", "help": "Comma-separated optimizer specs, as for compare."})
def baseline(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="The baseline file: .csv (tidy rows) or .json (full records).", show_default=False)],
    settings: dict,
    unit: UnitOpt = "MiB",
    config: ConfigOpt = None,
) -> None:
    """Measure as compare does and record the result as the baseline for `memprof check`.

    Example: memprof baseline --model gpt2 --opt smmf,adam --device cpu -o memory-baseline.csv
    """
    from memprof import runfile

    _check_outputs(unit, output=output)
    records = _measure_requests(ctx, settings, config, unit=unit)
    runfile.write(output, records)
    err.print(f"wrote {output}; gate later runs with: memprof check --baseline {output}", highlight=False)
    _raise_if_failed(records)


@app.command()
def check(
    baseline: Annotated[Path, typer.Option(help="The baseline `memprof baseline` (or --csv/--json) wrote.", show_default=False)],
    current: Annotated[Optional[Path], typer.Option(help="A run file (.csv or .json) to check; default: measure the baseline's settings again here (built-in models and registered optimizers only).")] = None,
    tolerance: Annotated[Optional[list[str]], typer.Option(metavar="TOL", help="Allowed growth, repeatable: 2% or 1MiB for every gated category, CATEGORY=2% for one. Default: 0% for the exact persistent rows, 2% for the rest.")] = None,
    category: Annotated[Optional[list[str]], typer.Option(metavar="CATEGORY", help="Gate these categories (repeatable) instead of the device's default set (see docs/ci-gate.md); `peak` is the peak allocated.")] = None,
    csv: Annotated[Optional[Path], typer.Option(help="Also write the re-measured run's tidy CSV here.")] = None,
    trust: Annotated[Optional[list[str]], typer.Option(metavar="NAME", help="A model file or dotted-path optimizer the baseline names that memprof may load to measure again (repeatable); built-in models and registered optimizers need none.")] = None,
) -> None:
    """Fail (exit 1) when memory grew past the tolerance since the baseline; improvements are reported, never fail.

    Appends a Markdown summary to $GITHUB_STEP_SUMMARY when it is set.
    Example: memprof check --baseline memory-baseline.csv --tolerance 2% --tolerance optimizer_state=0%
    """
    from memprof import api
    from memprof.files import check_writable

    check_writable([("--csv", csv)])
    outcome = api.check(baseline, current, tolerances=tolerance or (), categories=category, trust=trust or ())
    if outcome.measured:
        _write_exports(outcome.measured, csv=csv)
    result = outcome.result
    out.print(result.text(), end="", markup=False, highlight=False)
    _append_step_summary(result.markdown())
    if not result.passed:
        raise GateRegression("")


def _append_step_summary(markdown: str) -> None:
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


@app.command()
def papers(
    names: Annotated[Optional[list[str]], typer.Argument(metavar="NAME", help="Reproductions to regenerate (reports/NAME.toml); default: all.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for NAME.csv, NAME.md and README.md.")] = Path("reports"),
) -> None:
    """Regenerate the papers' memory tables from reports/NAME.toml: state on CPU, peaks from GPU runs or estimates.

    Example: memprof papers smmf-table4 alada-table4
    """
    from memprof.papers import regenerate

    outcome = regenerate(names or [], out, say=lambda line: err.print(line, style="dim", markup=False, highlight=False))
    for line in [*outcome.timing, *(f"wrote {path}" for path in outcome.written)]:
        err.print(line, markup=False, highlight=False)
    for line in outcome.unexplained:
        err.print(f"warning: no reason recorded for a paper cell more than 2 % off: {line}", markup=False, highlight=False)


@app.command()
def models() -> None:
    """List the built-in models (all built from configs with random weights; nothing is downloaded)."""
    from rich.table import Table

    from memprof.models import model_names

    table = Table("name", "family", "description", header_style="bold")
    for name, family, description in model_names():
        table.add_row(name, family, description)
    out.print(table)
    out.print("Also: a local HF config.json path, or path/to/file.py:function returning a model.")


@app.command()
def optimizers() -> None:
    """List the registered optimizers with their state roles and defaults."""
    from rich.table import Table

    from memprof.optim.registry import registry

    table = Table("name", "source", "state key → role", "defaults", "summary", header_style="bold")
    for entry in registry().values():
        try:
            roles = ", ".join(f"{k}→{v}" for k, v in entry.state_roles().items())
            defaults = ", ".join(f"{k}={v}" for k, v in entry.signature_defaults().items())
        except MemprofError as exc:
            roles, defaults = f"[dim]{exc}[/dim]", ""
        table.add_row(entry.name, entry.source, roles, defaults, entry.summary)
    out.print(table)
    out.print("Any torch.optim.Optimizer subclass also works by dotted path (--opt torch.optim.RAdam); its roles are inferred.")


# -- entry point -------------------------------------------------------------------------------------------
OPT_SHORT_FLAG_COMMANDS = ("compare", "profile")
"""``-o`` was ``--opt``'s short flag in these commands before it meant ``--output`` elsewhere; kept working."""


def _old_spellings(argv: list[str]) -> list[str]:
    if argv and argv[0] in OPT_SHORT_FLAG_COMMANDS:
        return [argv[0], *("--opt" if arg == "-o" else arg for arg in argv[1:])]
    return argv


def exit_code(exc: BaseException) -> int | None:
    """The exit code ``EXIT_CODES`` gives an exception (None: not one of memprof's)."""
    return next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), None)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the command and decide its exit code."""
    args = _old_spellings(list(sys.argv[1:] if argv is None else argv))
    with _terminate_cleanly():
        code = _run(args)
    if argv is None:  # the process ends next: a final collection of torch's and transformers' objects takes ~1.5 s
        gc.freeze()
    return code


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """SIGTERM ends the whole command like Ctrl-C does, through every ``finally`` (a measuring child is
    killed, a temporary file removed), with exit code 143: it raises ``Terminated``, which no handler that
    makes a crash an optimizer's row catches (a ``sys.exit`` in a user's step stays that row)."""
    def stop(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: list[str]) -> int:
    try:  # typer vendors click from 0.20 on
        from typer._click import exceptions as click_errors
    except ImportError:  # pragma: no cover
        from click import exceptions as click_errors

    try:
        code = app(args=args, prog_name="memprof", standalone_mode=False)
        return code if isinstance(code, int) else 0  # --help: 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except click_errors.NoArgsIsHelpError:
        return 2  # the help is already printed
    except click_errors.UsageError as exc:  # a malformed option or argument: one line, as ours
        hint = f"; see `{exc.ctx.command_path} --help`" if exc.ctx is not None else ""
        _print_error(f"{exc.format_message().rstrip('.')}{hint}")
        return exc.exit_code
    except typer.Abort:  # Ctrl-C (click turns KeyboardInterrupt into Abort)
        return 128 + signal.SIGINT
    except Terminated as exc:  # SIGTERM
        return 128 + exc.signum
    except MemprofError as exc:
        code = exit_code(exc)
        if code is None or os.environ.get("MEMPROF_DEBUG"):
            raise
        if str(exc):
            _print_error(str(exc))
        return code


def _print_error(message: str) -> None:
    """One line on stderr; the message is text, never markup (it may quote the user's input)."""
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
