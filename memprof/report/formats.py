"""The export formats, one row each. Every exporting command's ``--NAME PATH`` options, ``memprof
report --format NAME`` and the writing of exports are derived from ``FORMATS``: adding a format is
its renderer and a row here.

Kept free of heavy imports (``memprof --help`` reads it); each renderer imports its view when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from memprof.record import RunRecord


@dataclass(frozen=True)
class View:
    """How the tables of an export are drawn."""

    unit: str = "MiB"
    detail: bool = False  # each record's breakdown (and top parameters) after the summary
    top: int = 20  # parameters listed by the detail, largest state first
    fits: Sequence[Any] = ()  # the searches of ``memprof estimate --fit`` (``memprof.fit.Fit``), for views that draw them


@dataclass(frozen=True)
class Format:
    """One export format: the option ``--NAME PATH`` and ``memprof report --format NAME``."""

    name: str
    help: str  # the option's help
    render: Callable[[Sequence[RunRecord], View], str]
    requires: str | None = None  # a module the renderer imports that memprof does not depend on

    def check(self) -> None:
        """Raise ``UsageError`` (before anything is measured) when the renderer cannot run here."""
        from importlib.util import find_spec

        from memprof.errors import UsageError

        if self.requires is not None and find_spec(self.requires) is None:
            raise UsageError(f"--{self.name} needs {self.requires}: pip install 'memprof-optim[{self.name}]'")


def _csv(records: Sequence[RunRecord], view: View) -> str:
    from memprof.runfile import to_csv

    return to_csv(records)


def _json(records: Sequence[RunRecord], view: View) -> str:
    from memprof.runfile import to_json

    return to_json(records)


def _markdown(records: Sequence[RunRecord], view: View) -> str:
    from memprof.report.markdown import to_markdown

    return to_markdown(records, unit=view.unit, detail=view.detail, top=view.top)


def _latex(records: Sequence[RunRecord], view: View) -> str:
    from memprof.report.latex import to_latex

    return to_latex(records, unit=view.unit, detail=view.detail)


def _html(records: Sequence[RunRecord], view: View) -> str:
    from memprof.report.html import to_html

    return to_html(records, unit=view.unit, fits=view.fits)


def _trace(records: Sequence[RunRecord], view: View) -> str:
    from memprof.report.trace import to_trace

    return to_trace(records)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("csv", "Write the tidy long table (one row per category/component) to this CSV.", _csv),
    Format("json", "Write the run records with environment metadata to this JSON.", _json),
    Format("markdown", "Write a Markdown table (GitHub-flavoured; settings and environment in a comment).",
           _markdown),
    Format("latex", "Write a booktabs LaTeX table, ready to paste (settings and environment in % comments).",
           _latex),
    Format("html", "Write one interactive HTML report that works offline (plotly.js inlined): breakdown, timeline, "
           "peak, per-parameter table, ranks, fit, how each figure was obtained.", _html, requires="plotly"),
    Format("trace", "Write the memory timeline as a Chrome/Perfetto trace (JSON: open it in ui.perfetto.dev or "
           "chrome://tracing).", _trace),
)}


def listed(names: Sequence[str]) -> str:
    """The names as prose: ``csv, json, markdown or latex``."""
    names = list(names)
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)
