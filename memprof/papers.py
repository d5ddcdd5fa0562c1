"""``memprof papers``: regenerate every reproduction of the papers' memory tables from reports/NAME.toml.

The measuring half (the rendering is ``memprof.report.papers``): for each reproduction, the runs its
cells read, measured once each across all reproductions:

* the exact bytes (state, weights, gradients) on CPU at the reproduction's small CPU settings, one step;
* for a model too large for that (``Reproduction.estimated``), and for a peak that no committed CUDA run
  under reports/gpu/ holds, ``memprof estimate`` at the paper's settings for the paper's GPU;
* committed CUDA runs (``Reproduction.gpu_runs``), read, never measured here; a record whose status is
  not ok is left out and named.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from memprof.errors import UsageError, closest

REPORTS = Path("reports")


@dataclass(frozen=True)
class Job:
    """One ``api.measure`` (kind "cpu") or ``api.estimate`` (kind "estimate") call."""

    kind: str
    model: str
    settings: tuple[tuple[str, Any], ...]


@dataclass
class Outcome:
    """What one regeneration measured and wrote, with the time each part took."""

    written: list[Path] = field(default_factory=list)
    timing: list[str] = field(default_factory=list)
    unexplained: list[str] = field(default_factory=list)


def choose(names: Sequence[str]) -> list:
    """The reproductions ``names`` asks for (all when empty), in catalog order; an unknown name is a usage error."""
    from memprof.report.papers.catalog import reproductions

    every = reproductions()
    unknown = [n for n in names if n not in every]
    if unknown:
        raise UsageError(f"unknown reproduction {unknown[0]!r} (closest: {closest(unknown[0], list(every))}); "
                         f"choose from {', '.join(every)}")
    return [r for name, r in every.items() if not names or name in names]


def regenerate(names: Sequence[str], out: Path = REPORTS, configs: Path = REPORTS,
               say: Callable[[str], None] = lambda line: None) -> Outcome:
    """Measure what the chosen reproductions read, then write NAME.csv and NAME.md for each and the
    README (coverage of every reproduction: the others from their CSV files in ``out``)."""
    from memprof.report.papers.catalog import MODEL_FILES, reproductions
    from memprof.report.papers.compare import compare, unexplained
    from memprof.report.papers.render import page, read_csv_text, readme, to_csv_text

    chosen = choose(names)
    if not (configs / "gpu").is_dir():
        raise UsageError(f"memprof papers reads {configs}/NAME.toml and {configs}/gpu/ of a memprof checkout: "
                         f"none in {Path.cwd()}; run it from the checkout's root")
    from memprof.files import check_writable

    check_writable([("--out", out / f"{repro.name}.csv") for repro in chosen] + [("--out", out / "README.md")])
    started = time.perf_counter()
    measured, missing, provenance, timing = measure(chosen, configs, say)
    outputs, rows_by_name = [], {}
    for repro in chosen:
        rows = compare(repro.cells, measured, missing)
        rows_by_name[repro.name] = rows
        outputs += [(out / f"{repro.name}.csv", to_csv_text(rows)),
                    (out / f"{repro.name}.md", page(repro, rows, provenance[repro.name]))]
    every = reproductions()
    for name, repro in every.items():
        if name not in rows_by_name:
            existing = out / f"{name}.csv"
            rows = read_csv_text(existing.read_text()) if existing.exists() else []
            rows_by_name[name] = rows if rows and "cell" in rows[0] else compare(repro.cells, {}, {})
    total = time.perf_counter() - started
    timing.append(f"{total:.0f} s in all for {', '.join(r.name for r in chosen)}, on {_cores()} CPU cores")
    outputs.append((out / "README.md", readme(list(every.values()), rows_by_name, timing, MODEL_FILES)))
    from memprof.files import write_all

    write_all(outputs)
    outcome = Outcome(written=[path for path, _ in outputs], timing=timing)
    outcome.unexplained = [f"{r['table']}, {r['model']}, {r['optimizer']}, {r['quantity']}"
                           for repro in chosen for r in unexplained(rows_by_name[repro.name])]
    return outcome


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# -- measuring -----------------------------------------------------------------------------------------
def measure(chosen: Sequence, configs: Path, say: Callable[[str], None]):
    """Readings by record key, failures by key, provenance lines by reproduction, and timing lines."""
    from memprof.report.papers.compare import Reading

    measured: dict[tuple, dict[str, Reading]] = {}
    missing: dict[tuple, str] = {}
    provenance: dict[str, list[str]] = {}
    for repro in chosen:
        provenance[repro.name] = _read_gpu_runs(repro, measured, missing)
    jobs: dict[Job, list[str]] = {}
    labels: dict[Job, str] = {}
    for repro in chosen:
        for job, specs, line in plan(repro, configs, measured):
            jobs.setdefault(job, [])
            jobs[job] += [s for s in specs if s not in jobs[job]]
            labels[job] = _estimate_label(repro) if job.kind == "estimate" else "CPU"
            provenance[repro.name].append(line)
    spent = {"cpu": 0.0, "estimate": 0.0}
    counts = {"cpu": 0, "estimate": 0}
    for job, specs in jobs.items():
        started = time.perf_counter()
        for record in _run(job, specs):
            key = (record.settings.model, record.settings.spec, record.settings.num_classes, record.settings.lora)
            if record.status != "ok":
                missing[key] = f"{record.settings.spec} {record.status}: {record.failure}"
                continue
            from memprof.report.papers.model import quantities

            measured.setdefault(key, {})[job.kind] = Reading(job.kind, labels[job], quantities(record))
            counts[job.kind] += 1
        elapsed = time.perf_counter() - started
        spent[job.kind] += elapsed
        say(f"{job.kind}: {job.model} × {', '.join(specs)}: {elapsed:.0f} s")
    timing = [f"{counts['cpu']} CPU runs (state, weights, gradients; one step, small batch): {spent['cpu']:.0f} s",
              f"{counts['estimate']} estimates (peaks without a GPU run, and the state of models too large for a CPU "
              f"run): {spent['estimate']:.0f} s"]
    return measured, missing, provenance, timing


def _estimate_label(repro) -> str:
    from memprof.gpus import gpu

    return f"estimate for {gpu(repro.estimate.gpu).label} (paper: {repro.estimate.paper_gpu})"


def _read_gpu_runs(repro, measured: dict, missing: dict) -> list[str]:
    """Add the committed CUDA runs of ``repro`` to ``measured``; the provenance lines that say so."""
    from memprof import runfile
    from memprof.report.papers.compare import Reading
    from memprof.report.papers.model import quantities

    lines = []
    for name in repro.gpu_runs:
        path = REPORTS / "gpu" / name
        records = runfile.read(path)
        used = [r for r in records if r.status == "ok" and str(r.settings.device).startswith("cuda")
                and not r.settings.estimate]
        for record in used:
            s = record.settings
            gpu = record.environment.get("gpu") or "CUDA"
            measured.setdefault((s.model, s.spec, s.num_classes, s.lora), {})["gpu"] = Reading(
                "gpu", f"GPU run ({gpu})", quantities(record))
        left = [f"{r.settings.spec} on {r.settings.model}: {r.status}" for r in records if r not in used]
        gpus = ", ".join(sorted({r.environment.get("gpu") or "CUDA" for r in used}))
        lines.append(f"Peaks from the committed CUDA run `gpu/{name}` ({len(used)} records, {gpus}; batch "
                     f"{_distinct(r.settings.batch_size for r in used)}, seq_len "
                     f"{_distinct(r.settings.seq_len for r in used)})"
                     + (f"; left out (status not ok): {'; '.join(left)}" if left else "") + ".")
    return lines


def _distinct(values: Iterable[Any]) -> str:
    return ", ".join(str(v) for v in dict.fromkeys(values)) or "n/a"


def plan(repro, configs: Path, measured: dict) -> list[tuple[Job, list[str], str]]:
    """The jobs ``repro`` needs beyond what ``measured`` holds: (job, specs, provenance line) each."""
    from memprof.config import requests
    from memprof.optim.registry import split_specs
    from memprof.report.papers.model import PERSISTENT

    todo = requests({}, config=configs / f"{repro.name}.toml")
    out = []
    for request in todo:
        listed = split_specs(request.optimizers)
        runs = [run for run in repro.runs if (run.model, run.num_classes, run.lora)
                == (request.model, request.settings.get("num_classes"), request.settings.get("lora"))]
        cells = [c for c in repro.cells if any(run in runs for run in c.runs)]
        estimated = [run for run in runs if _estimated(repro, run)]
        cpu = [run.spec for run in runs if run not in estimated and run.spec in listed
               and any(c.quantity in PERSISTENT for c in cells if run in c.runs)]
        peaks = [run.spec for run in runs if run.spec in listed and "gpu" not in measured.get(run.key, {})
                 and any(c.quantity == "peak" for c in cells if run in c.runs)]
        estimate = list(dict.fromkeys([run.spec for run in estimated if run.spec in listed] + peaks))
        if cpu:
            settings = {**request.settings, **repro.cpu, "device": "cpu", "timeline": False}
            out.append((Job("cpu", request.model, _frozen(settings)), cpu, _line("State on CPU", request, settings)))
        if estimate:
            settings = {**request.settings, "device": "cuda", "steps": 2, "target_gpu": repro.estimate.gpu,
                        "timeline": False}
            out.append((Job("estimate", request.model, _frozen(settings)), estimate,
                        _line(_capitalized(_estimate_label(repro)), request, settings)))
    return out


def _estimated(repro, run) -> bool:
    return run.model in repro.estimated or run.spec.split(":")[0] in repro.estimated


def _frozen(settings: dict) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(settings.items()))


def _line(what: str, request, settings: dict) -> str:
    shown = ", ".join(f"{k} {v}" for k, v in settings.items() if k not in ("device", "timeline", "target_gpu"))
    return f"{what}: `{request.model}`, {shown}."


def _run(job: Job, specs: Sequence[str]) -> list:
    from memprof import api

    settings = dict(job.settings)
    call = api.estimate if job.kind == "estimate" else api.measure
    if job.kind == "estimate":
        settings.pop("estimate", None)
    return call(job.model, list(specs), **settings)


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]
