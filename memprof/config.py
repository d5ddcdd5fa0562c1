"""Run configuration files: a checked-in TOML that says what `memprof compare` measures.

Top-level keys are the command's options (``model``, ``opt``, ``batch_size``…); each
``[[runs]]`` table repeats the measurement with some of them changed::

    opt = "adam,adafactor:beta1=0.9,smmf"
    device = "auto"
    [[runs]]
    model = "resnet50"
    [[runs]]
    model = "mobilenet_v2"
    num_classes = 100

Options given on the command line win over the file (``requests``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memprof.errors import UsageError
from memprof.limits import check_toml
from memprof.settings import Settings, config_keys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def load_runs(path: str | Path) -> list[dict[str, Any]]:
    """The measurements a config file asks for, each as a dict keyed by config keys
    (``memprof.settings.config_keys``)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        check_toml(text, f"config {path}")  # before the parser, which recurses per level
        data = tomllib.loads(text)
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"config {path} is not TOML: {str(exc).splitlines()[0]}") from None
    keys = tuple(config_keys())
    runs = data.pop("runs", [{}])
    if not isinstance(runs, list) or not runs or not all(isinstance(run, dict) for run in runs):
        raise UsageError(f"config {path}: runs must be one or more [[runs]] tables, got {runs!r}")
    description = data.pop("description", None)
    out = []
    for run in runs:
        merged = {**data, **run}
        unknown = sorted(set(merged) - set(keys) - {"description"})
        if unknown:
            raise UsageError(f"config {path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(keys)}")
        merged.setdefault("description", run.get("description", description))
        out.append(merged)
    return out


@dataclass(frozen=True)
class Request:
    """One ``measure`` call: a model, its optimizer specs and the other settings."""

    model: str
    optimizers: str
    settings: dict[str, Any] = field(default_factory=dict)
    description: str | None = None


def requests(given: dict[str, Any], *, config: str | Path | None = None,
             explicit: set[str] = frozenset()) -> list[Request]:
    """What to measure: ``given`` settings (by field name, ``spec`` holding the comma-separated
    specs), or one request per run of a config file, where the settings in ``explicit`` (typed on
    the command line) win over the file."""
    if config is None:
        runs = [dict(given)]
    else:
        keys = config_keys()
        runs = []
        for run in load_runs(config):
            from_file = {keys[k]: v for k, v in run.items() if k in keys}
            merged = {**given, **{k: v for k, v in from_file.items() if k not in explicit}}
            runs.append({**merged, "description": run.get("description")})
    out = []
    for run in runs:
        description = run.pop("description", None)
        if config is not None:  # what the file says is checked here, so that errors name the file
            try:
                Settings(**run)
            except UsageError as exc:
                raise UsageError(f"config {config}: {exc}") from None
            if description is not None and not isinstance(description, str):
                raise UsageError(f"config {config}: description must be text, got {description!r}")
        model, specs = run.pop("model"), run.pop("spec")
        out.append(Request(model=model, optimizers=specs, settings=run, description=description))
    return out
