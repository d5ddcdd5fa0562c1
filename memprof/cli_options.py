"""The command line's options that are declared elsewhere, turned into Typer parameters: the run settings
(``memprof.settings``) and the export formats (``memprof.report.formats``), and the options several
commands share."""

from __future__ import annotations

import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from memprof.report.formats import FORMATS

UnitOpt = Annotated[str, typer.Option(help="Units: B, KiB, MiB, GiB, KB, MB or GB.")]
PlotOpt = Annotated[Optional[Path], typer.Option(help="Write figures (.png, .pdf or .svg): PATH is the breakdown; <stem>-timeline and <stem>-parameters go beside it.")]
ConfigOpt = Annotated[Optional[Path], typer.Option(help="A TOML run configuration (see reports/*.toml); command-line options win.")]
ReferenceOpt = Annotated[Optional[str], typer.Option("--reference", "--baseline", help="Spec or name the Δ columns compare against (default: the first).")]
TopOpt = Annotated[int, typer.Option(min=1, help="Parameters to list, largest state first.")]


def _collecting(command: Callable, name: str, added: list[inspect.Parameter], *, in_place: bool) -> Callable:
    """``command`` with the options ``added`` in its signature, where its parameter ``name`` was
    (``in_place``) or last; it receives their values as one dict, ``name``."""
    signature = inspect.signature(command)
    hints = typing.get_type_hints(command, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()]
    at = [p.name for p in own].index(name) if in_place else len(own)
    params = [p for p in (*own[:at], *added, *own[at:]) if p.name != name]
    names = [p.name for p in added]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return command(*args, **{name: {n: kwargs.pop(n) for n in names}}, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def run_options(*groups: str, **overrides: dict[str, Any]) -> Callable[[Callable], Callable]:
    """Give a command the declared settings' options of ``groups`` (``memprof.settings``), last; it
    receives their values as ``settings: dict`` (by field name). ``overrides`` change a field's ``default``,
    ``help`` or ``flags`` for this command (``spec={"default": "adam", "help": "One optimizer spec."}``)."""
    from memprof.settings import declaration, declared_fields

    def decorate(command: Callable) -> Callable:
        added = []
        for group in groups:
            for item in declared_fields(group):
                meta, change = declaration(item.name), overrides.get(item.name, {})
                base = {"int": int, "str": str, "bool": bool}[str(item.type).replace(" | None", "")]
                kind = Optional[base] if "None" in str(item.type) else base
                flags = change.get("flags", (meta.flag, meta.short))
                option = typer.Option(*filter(None, flags), help=change.get("help", meta.help),
                                      min=meta.minimum, metavar=meta.metavar)
                added.append(inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY,
                                               default=change.get("default", item.default),
                                               annotation=Annotated[kind, option]))
        return _collecting(command, "settings", added, in_place=False)

    return decorate


def export_options(command: Callable) -> Callable:
    """Give a command ``--NAME PATH`` for every export format (``memprof.report.formats``) and ``--plot``,
    where its parameter ``exports`` is; it receives their paths as ``exports: dict`` (by name)."""
    added = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation=Annotated[Optional[Path], typer.Option(help=f.help)])
             for f in FORMATS.values()]
    added.append(inspect.Parameter("plot", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=PlotOpt))
    return _collecting(command, "exports", added, in_place=True)


def filled(**fields: str) -> Callable[[Callable], Callable]:
    """Fill the ``{fields}`` of a command's docstring (its help) with values declared elsewhere."""
    def decorate(command: Callable) -> Callable:
        command.__doc__ = (command.__doc__ or "").format(**fields)
        return command

    return decorate
