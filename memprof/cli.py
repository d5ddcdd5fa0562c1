"""The memprof command line: parse, call the API, render. Heavy imports happen inside commands.

Exit codes are decided in ``main()`` alone, from ``EXIT_CODES``: 0 ok, 1 a gate regression,
2 bad input, 3 a measurement failed (its row is still written), 4 measured but the outputs could
not be written (none was changed), 5 the script ``memprof run`` ran raised (the steps measured before are
written, status failed); a signal that stops the run gives ``128 + signum``: 130 Ctrl-C
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
from typing import Annotated, Any, Iterator, Optional

import typer

from memprof.errors import (GateRegression, MeasurementFailed, MemprofError, OutputsNotWritten, ScriptFailed,
                            Terminated, UsageError)
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
from memprof import cli_support
from memprof.cli_support import (append_step_summary, check_outputs, check_reference, err, fit_search,
                                 measure_requests, out, raise_if_failed, write_exports)
from memprof.report.formats import FORMATS, View, listed

EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (GateRegression, 1),
    (UsageError, 2),
    (MeasurementFailed, 3),
    (OutputsNotWritten, 4),
    (ScriptFailed, 5),
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

ReportFormat = Enum("ReportFormat", {name: name for name in ("table", *FORMATS)}, type=str)
"""``memprof report --format``: the terminal table or an export format."""


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

    check_outputs(unit, **exports, snapshot=settings["snapshot"], specs=settings["spec"])
    records = measure_requests(ctx, settings, config, unit=unit, reference=reference)
    if reporting():
        write_exports(records, **exports, unit=unit)
    raise_if_failed(records)


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

    check_outputs(unit, **exports, snapshot=settings["snapshot"], specs=settings["spec"])
    if len(split_specs(settings["spec"])) != 1:
        raise UsageError("profile takes one optimizer; use `memprof compare` for several")
    (request,) = api.requests(settings)
    records = cli_support.measure(request, estimate=estimate)
    record = records[0]
    if record.status != "ok":
        err.print(f"[red]{record.settings.spec}: {record.failure}[/red]", highlight=False)
    print_tables(profile_tables(record, unit=unit, top=top), out)
    write_exports(records, **exports, unit=unit, detail=True)
    raise_if_failed(records)


@app.command()
@run_options("run", "estimate", "distributed", "capture",
             nproc={"flags": ("--world-size", "--nproc"),
                    "help": "Ranks to simulate (with --parallel): one process, a fake process group; --rank picks "
                            "the rank whose figures are given (default 0), --all-ranks gives every rank's."},
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
             memprof estimate --model llama-7b --opt adam --world-size 8 --parallel fsdp2 --all-ranks --html ranks.html
    """
    from memprof import api
    from memprof.report.ranks import rank_table
    from memprof.report.table import estimate_table, fit_table

    plot = exports.pop("plot")
    check_outputs(unit, plot, **exports, snapshot=settings["snapshot"], specs=settings["spec"])
    if fit is not None and settings["snapshot"] is not None:
        raise UsageError("--snapshot records one estimate; --fit makes many: drop one of them")
    (request,) = api.requests(settings)
    if reference is not None:
        check_reference(reference, [request])
    if fit is not None:
        fits = fit_search(request, fit)
        out.print(fit_table(fits, unit=unit))
        records = [f.record for f in fits if f.record is not None]
        rendered = []
        if plot is not None:
            from memprof.report.plot import fit_figure

            rendered.append(fit_figure(fits, plot, unit=unit))
        write_exports(records, **exports, unit=unit, rendered=rendered, fits=fits)
        if any(f.failure for f in fits):
            raise MeasurementFailed("; ".join(f"{f.spec}: {f.failure}" for f in fits if f.failure))
        return
    records = cli_support.measure(request, estimate=True)
    simulated = any(r.settings.parallel != "none" for r in records)
    out.print((rank_table if simulated else estimate_table)(records, unit=unit, baseline=reference))
    write_exports(records, **exports, plot=plot, unit=unit)
    raise_if_failed(records)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@export_options
def run(
    ctx: typer.Context,
    script: Annotated[Optional[str], typer.Argument(help="Your training script, then its own arguments.", show_default=False)] = None,
    module: Annotated[Optional[str], typer.Option("-m", "--module", metavar="MODULE", help="Run a module as python -m does (its arguments follow).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Training steps to measure (a step: forward and backward up to the optimizer steps after them).")] = 3,
    skip: Annotated[int, typer.Option(min=0, help="Warm-up steps to leave out before them.")] = 0,
    finish: Annotated[bool, typer.Option("--finish", help="Let the script run to its end (default: stop it once the steps are measured).")] = False,
    top: TopOpt = 20,
    unit: UnitOpt = "MiB",
    *,
    exports: dict,
) -> None:
    """Run your own training script as Python would and measure its steps: the breakdown compare gives.

    memprof's options go anywhere; the script's arguments follow it (after -- if one shares a memprof option's name).
    It stops the script once the steps are measured (--finish: it runs to its end). Exit 5: the script raised.
    Example: memprof run train.py --steps 3 --csv run.csv -- --lr 3e-4
             memprof run --skip 1 -m mypkg.train
    """
    from memprof import script as scripts
    from memprof.distributed.launch import reporting
    from memprof.report.ranks import results_table
    from memprof.report.table import print_tables, profile_tables

    if script is None and module is None:
        raise UsageError("memprof run needs a script (memprof run train.py) or -m MODULE")
    target, args = (module, [script, *ctx.args] if script else ctx.args) if module else (script, ctx.args)
    check_outputs(unit, **exports)
    try:
        records = scripts.run(target, args, module=module is not None, steps=steps, skip=skip, finish=finish)
    except ScriptFailed as exc:
        if exc.record is not None:
            write_exports([exc.record], **exports, unit=unit, detail=True)
        raise
    if reporting():
        print_tables(profile_tables(records[0], unit=unit, top=top) if len(records) == 1 else [results_table(records, unit=unit)], out)
        write_exports(records, **exports, unit=unit, detail=True)


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

    check_outputs(unit, plot, output=output)
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
    write_exports(records, plot=plot, unit=unit, detail=detail, top=top, **exported)


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

    check_outputs(unit, output=output)
    records = measure_requests(ctx, settings, config, unit=unit)
    runfile.write(output, records)
    err.print(f"wrote {output}; gate later runs with: memprof check --baseline {output}", highlight=False)
    raise_if_failed(records)


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
        write_exports(outcome.measured, csv=csv)
    result = outcome.result
    out.print(result.text(), end="", markup=False, highlight=False)
    append_step_summary(result.markdown())
    if not result.passed:
        raise GateRegression("")


@app.command()
def papers(
    names: Annotated[Optional[list[str]], typer.Argument(metavar="NAME", help="Reproductions to regenerate (reports/NAME.toml); default: all.", show_default=False)] = None,
    folder: Annotated[Path, typer.Option("--out", help="Folder for NAME.csv, NAME.md and README.md.")] = Path("reports"),
) -> None:
    """Regenerate the papers' memory tables from reports/NAME.toml: state on CPU, peaks from GPU runs or estimates.

    Example: memprof papers smmf-table4 alada-table4
    """
    from memprof.papers import regenerate

    outcome = regenerate(names or [], folder, say=lambda line: err.print(line, style="dim", markup=False, highlight=False))
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
