"""The memprof command line: parse, call the API, render. Heavy imports happen inside commands."""

from __future__ import annotations

import functools
import os
import sys
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
SnapshotOpt = Annotated[Optional[Path], typer.Option(help="CUDA: write a torch memory snapshot (open at pytorch.org/memory_viz).")]


def _handle_errors(command: Callable) -> Callable:
    """Turn memprof's own errors into one line on stderr and their exit code; no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MemprofError as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False)
            if os.environ.get("MEMPROF_DEBUG"):
                raise
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def _run(model, opt, device, dtype, amp, batch_size, seq_len, image_size, num_classes, steps, seed, snapshot):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from memprof import api

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=True) as progress:
        task = progress.add_task("preparing…", total=None)

        def on_start(settings):
            progress.update(task, description=f"measuring {settings.spec} on {settings.model} ({settings.device})")

        def on_result(record):
            status = "ok" if record.status == "ok" else record.failure
            progress.console.print(f"[dim]{record.settings.spec}: {status}[/dim]", highlight=False)

        return api.measure(
            model, opt, device=device, dtype=dtype, amp=amp, batch_size=batch_size, seq_len=seq_len,
            image_size=image_size, num_classes=num_classes, steps=steps, seed=seed,
            snapshot=str(snapshot) if snapshot else None, on_start=on_start, on_result=on_result,
        )


def _write_exports(records, csv: Path | None, json: Path | None) -> None:
    from memprof.report.export import to_csv, to_json, write_atomic

    for path, render in ((csv, to_csv), (json, to_json)):
        if path is not None:
            write_atomic(path, render(records))
            err.print(f"wrote {path}", highlight=False)


@app.command()
@_handle_errors
def compare(
    ctx: typer.Context,
    model: ModelOpt = "gpt2",
    opt: OptOpt = "adam,adafactor",
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
    snapshot: SnapshotOpt = None,
    config: Annotated[Optional[Path], typer.Option(help="A TOML run configuration (see reports/*.toml); command-line options win.")] = None,
) -> None:
    """Measure several optimizers on one model, side by side.

    Example: memprof compare --model gpt2 --opt smmf,adam --csv gpt2.csv
    """
    from click.core import ParameterSource

    from memprof.config import KEYS, load_runs
    from memprof.errors import UsageError
    from memprof.report.table import compare_table
    from memprof.report.units import scale

    scale(unit)
    given = {k: v for k, v in ctx.params.items() if k in KEYS}
    explicit = {k for k in given if ctx.get_parameter_source(k) is ParameterSource.COMMANDLINE}
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
    _write_exports(records, csv, json)


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
    snapshot: SnapshotOpt = None,
) -> None:
    """One optimizer in depth: every category, the composition at the peak, state per parameter.

    Example: memprof profile --model resnet50 --opt smmf --top 10
    """
    from memprof.errors import UsageError
    from memprof.optim.registry import split_specs
    from memprof.report.table import breakdown_table, parameter_table, print_tables
    from memprof.report.units import scale

    scale(unit)
    if len(split_specs(opt)) != 1:
        raise UsageError("profile takes one optimizer; use `memprof compare` for several")
    records = _run(model, opt, device, dtype, amp, batch_size, seq_len, image_size, num_classes, steps, seed, snapshot)
    record = records[0]
    if record.status != "ok":
        err.print(f"[red]{record.settings.spec}: {record.failure}[/red]", highlight=False)
    print_tables([breakdown_table(record, unit=unit), breakdown_table(record, unit=unit, at_peak=True),
                  parameter_table(record, unit=unit, top=top)], out)
    _write_exports(records, csv, json)


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
