"""The memprof command line: parse, call the API, render. Heavy imports happen inside commands."""

from __future__ import annotations

import functools
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console

from memprof.errors import MemprofError

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

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model name (see `memprof models`), a local HF config.json, or file.py:function.")]
OptOpt = Annotated[str, typer.Option("--opt", "-o", help="Comma-separated optimizer specs: NAME or NAME:key=value[:key=value…]; NAME may be a dotted class path.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cuda or cpu.")]
DtypeOpt = Annotated[str, typer.Option(help="Weight dtype: float32, bfloat16 or float16.")]
AmpOpt = Annotated[Optional[str], typer.Option(help="Mixed precision with fp32 weights: bf16 or fp16 autocast.")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Batch size.")]
SeqOpt = Annotated[int, typer.Option(min=1, help="Sequence length (text models).")]
ImageOpt = Annotated[int, typer.Option(min=8, help="Image side in pixels (vision models).")]
ClassesOpt = Annotated[Optional[int], typer.Option(min=1, help="Number of classes (vision models; default: the model's).")]
StepsOpt = Annotated[int, typer.Option(min=1, help="Instrumented training steps; the first is warm-up for timings.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed for weights and batch.")]
UnitOpt = Annotated[str, typer.Option(help="Units: B, KiB, MiB, GiB, KB, MB or GB.")]
CsvOpt = Annotated[Optional[Path], typer.Option(help="Write the tidy long table (one row per category/component) to this CSV.")]
JsonOpt = Annotated[Optional[Path], typer.Option(help="Write the run records with environment metadata to this JSON.")]
MarkdownOpt = Annotated[Optional[Path], typer.Option(help="Write a Markdown table (GitHub-flavoured; settings and environment in a comment).")]
LatexOpt = Annotated[Optional[Path], typer.Option(help="Write a booktabs LaTeX table, ready to paste (settings and environment in % comments).")]
PlotOpt = Annotated[Optional[Path], typer.Option(help="Write figures (.png, .pdf or .svg): PATH is the breakdown; <stem>-timeline and <stem>-parameters go beside it.")]
ConfigOpt = Annotated[Optional[Path], typer.Option(help="A TOML run configuration (see reports/*.toml); command-line options win.")]
SnapshotOpt = Annotated[Optional[Path], typer.Option(help="CUDA only: write a torch memory snapshot (drag it onto pytorch.org/memory_viz); bounded history, Python-only stacks.")]


class ReportFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"
    markdown = "markdown"
    latex = "latex"


def _handle_errors(command: Callable) -> Callable:
    """Turn memprof's own errors into one line on stderr and their exit code; no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MemprofError as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            if os.environ.get("MEMPROF_DEBUG"):
                raise
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def _run(model, opt, device, dtype, amp, batch_size, seq_len, image_size, num_classes, steps, seed, snapshot):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from memprof import api
    from memprof.errors import UsageError

    if snapshot is not None and not api.resolve_device(device).startswith("cuda"):
        raise UsageError("--snapshot needs CUDA (a torch memory snapshot records the CUDA caching allocator); "
                         "use --device cuda on a GPU machine, or drop --snapshot")

    # Started at the first measurement, so that bad input fails as one clean line before it.
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                        transient=True)
    task = progress.add_task("preparing…", total=None)

    def on_start(settings):
        progress.start()
        progress.update(task, description=f"measuring {settings.spec} on {settings.model} ({settings.device})")

    def on_result(record):
        status = "ok" if record.status == "ok" else record.failure
        progress.console.print(f"[dim]{record.settings.spec}: {status}[/dim]", highlight=False)

    try:
        return api.measure(
            model, opt, device=device, dtype=dtype, amp=amp, batch_size=batch_size, seq_len=seq_len,
            image_size=image_size, num_classes=num_classes, steps=steps, seed=seed,
            snapshot=str(snapshot) if snapshot else None, on_start=on_start, on_result=on_result,
        )
    finally:
        if progress.live.is_started:
            progress.stop()


def _check_plot(plot: Path | None) -> None:
    """Fail on a bad figure extension before measuring, not after."""
    if plot is not None:
        from memprof.report.plot import figure_paths

        figure_paths(plot)


def _write_exports(records, *, csv: Path | None = None, json: Path | None = None, markdown: Path | None = None,
                   latex: Path | None = None, plot: Path | None = None, unit: str = "MiB", detail: bool = False) -> None:
    from memprof.report.export import to_csv, to_json, write_atomic
    from memprof.report.latex import to_latex
    from memprof.report.markdown import to_markdown

    renders = ((csv, lambda: to_csv(records)), (json, lambda: to_json(records)),
               (markdown, lambda: to_markdown(records, unit=unit, detail=detail)),
               (latex, lambda: to_latex(records, unit=unit, detail=detail)))
    for path, render in renders:
        if path is not None:
            write_atomic(path, render())
            err.print(f"wrote {path}", highlight=False)
    if plot is not None:
        from memprof.report.plot import save_figures

        for path in save_figures(records, plot, unit=unit):
            err.print(f"wrote {path}", highlight=False)


@app.command()
@_handle_errors
def compare(
    ctx: typer.Context,
    model: ModelOpt = "gpt2",
    opt: OptOpt = "smmf,adam",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    amp: AmpOpt = None,
    batch_size: BatchOpt = 2,
    seq_len: SeqOpt = 128,
    image_size: ImageOpt = 224,
    num_classes: ClassesOpt = None,
    steps: StepsOpt = 3,
    seed: SeedOpt = 0,
    baseline: Annotated[Optional[str], typer.Option(help="Spec or name the Δ columns compare against (default: the first).")] = None,
    unit: UnitOpt = "MiB",
    csv: CsvOpt = None,
    json: JsonOpt = None,
    markdown: MarkdownOpt = None,
    latex: LatexOpt = None,
    plot: PlotOpt = None,
    snapshot: SnapshotOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Measure several optimizers on one model, side by side.

    Example: memprof compare --model gpt2 --opt smmf,adam --csv gpt2.csv --latex gpt2.tex --plot gpt2.pdf
    """
    _check_plot(plot)
    records = _measure_runs(ctx, config, unit=unit, snapshot=snapshot, baseline=baseline)
    _write_exports(records, csv=csv, json=json, markdown=markdown, latex=latex, plot=plot, unit=unit)


def _measure_runs(ctx: typer.Context, config: Path | None, *, unit: str, snapshot: Path | None = None,
                  baseline: str | None = None) -> list:
    """Measure what the command line (and the config file, if any) asks for, printing a table per run."""
    from memprof.config import KEYS, load_runs
    from memprof.errors import UsageError
    from memprof.report.table import compare_table
    from memprof.report.units import scale

    scale(unit)
    given = {k: v for k, v in ctx.params.items() if k in KEYS}
    # By name: typer may vendor its own click, whose ParameterSource is a different enum.
    explicit = {k for k in given if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"}
    runs = [{**given, **{k: v for k, v in run.items() if k not in explicit}} for run in load_runs(config)] if config else [given]
    records = []
    for run in runs:
        if run.get("description"):
            err.print(f"[bold]{run['description']}[/bold]", highlight=False)
        batch = _run(**{k: run[k] for k in KEYS}, snapshot=snapshot)
        if baseline is not None and not any(baseline in (r.settings.spec, r.settings.optimizer) for r in batch):
            raise UsageError(f"--baseline {baseline!r} is not one of the measured optimizers")
        out.print(compare_table(batch, unit=unit, baseline=baseline))
        records.extend(batch)
    return records


@app.command()
@_handle_errors
def profile(
    model: ModelOpt = "gpt2",
    opt: Annotated[str, typer.Option("--opt", "-o", help="One optimizer spec.")] = "adam",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    amp: AmpOpt = None,
    batch_size: BatchOpt = 2,
    seq_len: SeqOpt = 128,
    image_size: ImageOpt = 224,
    num_classes: ClassesOpt = None,
    steps: StepsOpt = 3,
    seed: SeedOpt = 0,
    top: Annotated[int, typer.Option(min=1, help="Parameters to list, largest state first.")] = 20,
    unit: UnitOpt = "MiB",
    csv: CsvOpt = None,
    json: JsonOpt = None,
    markdown: MarkdownOpt = None,
    latex: LatexOpt = None,
    plot: PlotOpt = None,
    snapshot: SnapshotOpt = None,
) -> None:
    """One optimizer in depth: every category, the composition at the peak, state per parameter.

    Example: memprof profile --model resnet50 --opt smmf --top 10
    """
    from memprof.errors import UsageError
    from memprof.optim.registry import split_specs
    from memprof.report.table import print_tables, profile_tables
    from memprof.report.units import scale

    scale(unit)
    _check_plot(plot)
    if len(split_specs(opt)) != 1:
        raise UsageError("profile takes one optimizer; use `memprof compare` for several")
    records = _run(model, opt, device, dtype, amp, batch_size, seq_len, image_size, num_classes, steps, seed, snapshot)
    record = records[0]
    if record.status != "ok":
        err.print(f"[red]{record.settings.spec}: {record.failure}[/red]", highlight=False)
    print_tables(profile_tables(record, unit=unit, top=top), out)
    _write_exports(records, csv=csv, json=json, markdown=markdown, latex=latex, plot=plot, unit=unit, detail=True)


@app.command()
@_handle_errors
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run files written by --json (one or more).", show_default=False)],
    format: Annotated[ReportFormat, typer.Option("--format", "-f", help="table (terminal), csv, json, markdown or latex.")] = ReportFormat.table,
    unit: UnitOpt = "MiB",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
    plot: PlotOpt = None,
    detail: Annotated[bool, typer.Option(help="Markdown/LaTeX: add each record's breakdown (and top parameters).")] = False,
    top: Annotated[int, typer.Option(min=1, help="Parameters to list, largest state first.")] = 20,
) -> None:
    """Re-render saved runs without measuring anything.

    Example: memprof report gpt2.json --format latex --unit GiB -o gpt2.tex --plot gpt2.pdf
    """
    from memprof.errors import UsageError
    from memprof.record import RunRecord
    from memprof.report.export import to_csv, to_json, write_atomic
    from memprof.report.latex import to_latex
    from memprof.report.markdown import to_markdown
    from memprof.report.units import scale

    scale(unit)
    _check_plot(plot)
    records = []
    for path in runs:
        try:
            records.extend(RunRecord.load(path))
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        except (ValueError, TypeError, KeyError) as exc:
            raise UsageError(f"{path} is not a memprof run file (write one with --json): {type(exc).__name__}: {exc}") from None
    if format is ReportFormat.table:
        if output is not None:
            raise UsageError("--format table prints to the terminal; with -o choose csv, json, markdown or latex")
        from memprof.report.table import compare_table, print_tables, profile_tables

        tables = profile_tables(records[0], unit=unit, top=top) if len(records) == 1 else [compare_table(records, unit=unit)]
        print_tables(tables, out)
    else:
        text = {
            ReportFormat.csv: lambda: to_csv(records),
            ReportFormat.json: lambda: to_json(records),
            ReportFormat.markdown: lambda: to_markdown(records, unit=unit, detail=detail, top=top),
            ReportFormat.latex: lambda: to_latex(records, unit=unit, detail=detail),
        }[format]()
        if output is None:
            sys.stdout.write(text)
        else:
            write_atomic(output, text)
            err.print(f"wrote {output}", highlight=False)
    _write_exports(records, plot=plot, unit=unit)


@app.command()
@_handle_errors
def baseline(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="The baseline file: .csv (tidy rows) or .json (full records).", show_default=False)],
    model: ModelOpt = "gpt2",
    opt: Annotated[str, typer.Option("--opt", help="Comma-separated optimizer specs, as for compare.")] = "adam,adafactor",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    amp: AmpOpt = None,
    batch_size: BatchOpt = 2,
    seq_len: SeqOpt = 128,
    image_size: ImageOpt = 224,
    num_classes: ClassesOpt = None,
    steps: StepsOpt = 3,
    seed: SeedOpt = 0,
    unit: UnitOpt = "MiB",
    config: ConfigOpt = None,
) -> None:
    """Measure as compare does and record the result as the baseline for `memprof check`.

    Example: memprof baseline --model gpt2 --opt smmf,adam --device cpu -o memory-baseline.csv
    """
    from memprof.report.export import to_csv, to_json, write_atomic

    records = _measure_runs(ctx, config, unit=unit)
    write_atomic(output, to_json(records) if output.suffix.lower() == ".json" else to_csv(records))
    err.print(f"wrote {output}; gate later runs with: memprof check --baseline {output}", highlight=False)


@app.command()
@_handle_errors
def check(
    baseline: Annotated[Path, typer.Option(help="The baseline `memprof baseline` (or --csv/--json) wrote.", show_default=False)],
    current: Annotated[Optional[Path], typer.Option(help="A run file (.csv or .json) to check; default: re-measure the baseline's settings here.")] = None,
    tolerance: Annotated[Optional[list[str]], typer.Option(metavar="TOL", help="Allowed growth, repeatable: 2% or 1MiB for every gated category, CATEGORY=2% for one. Default: 0% for the exact persistent rows, 2% for the rest.")] = None,
    category: Annotated[Optional[list[str]], typer.Option(metavar="CATEGORY", help="Gate these categories (repeatable) instead of the device's default set (see docs/ci-gate.md); `peak` is the peak allocated.")] = None,
    csv: Annotated[Optional[Path], typer.Option(help="Also write the re-measured run's tidy CSV here.")] = None,
) -> None:
    """Fail (exit 1) when memory grew past the tolerance since the baseline; improvements are reported, never fail.

    Appends a Markdown summary to $GITHUB_STEP_SUMMARY when it is set.
    Example: memprof check --baseline memory-baseline.csv --tolerance 2% --tolerance optimizer_state=0%
    """
    from memprof.report import gate

    base = gate.load_runs(baseline, "baseline")
    gate.parse_tolerances(tolerance or [])  # bad input fails before measuring
    if current is not None:
        runs = gate.load_runs(current, "current run")
    else:
        records = []
        for group in gate.rerun_settings(base):
            kwargs = {k: v for k, v in group.items() if k != "optimizers"}
            records.extend(_run(opt=group["optimizers"], snapshot=None, **kwargs))
        _write_exports(records, csv=csv)
        runs = gate.runs_from_records(records)
    result = gate.check(base, runs, tolerances=tolerance or (), categories=category)
    out.print(result.text(), end="", markup=False, highlight=False)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(result.markdown())
    if not result.passed:
        raise typer.Exit(1)


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
@_handle_errors
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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
