"""Run files: the one place run records are read and written, as JSON (``--json``) or tidy CSV (``--csv``),
and the provenance every export carries (the settings, environment and commands that reproduce a number).

A run file is data: reading one builds records and never imports or runs anything it names.
A missing, empty, truncated or malformed file (a value of the wrong type, negative bytes, an
unknown status, a finished run without rows) raises a ``RunFileError`` naming the file and what
is wrong with it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

from memprof import settings as declared
from memprof.errors import UsageError
from memprof.limits import MAX_CSV_LINE, check_json, shorten
from memprof.record import STATUSES, Peaks, Row, RunRecord
from memprof.settings import Settings, declared_fields, group_by_request, reproduce_command

ID_COLUMNS = declared.csv_columns("id")
SETTINGS_COLUMNS = declared.csv_columns("extra")
"""With ``ID_COLUMNS``: every setting ``memprof check`` needs to measure a baseline again."""
ENV_COLUMNS = ("gpu", "driver", "torch", "cuda", "memprof")
CSV_COLUMNS = (*ID_COLUMNS, "status", "measure", "category", "component", "bytes", "basis",
               *SETTINGS_COLUMNS, *ENV_COLUMNS, "record_rows")
"""``measure`` is ``steady`` (after the last step; the breakdown) or ``peak`` (at the global peak).
``record_rows`` is how many rows the record has in the file, so a reader can tell a truncated file."""
REQUIRED_COLUMNS = (*ID_COLUMNS, "status", "measure", "category", "component", "bytes", "basis")


class RunFileError(UsageError):
    """A run file that cannot be read as memprof run records."""


class RunFileMissing(RunFileError):
    """The file does not exist or cannot be opened."""


class RunFileTruncated(RunFileError):
    """The file ends early: empty, cut off mid-line, or fewer rows than a record declares."""


class RunFileMalformed(RunFileError):
    """The file is complete but is not a memprof run file."""


# -- writing ----------------------------------------------------------------------------------------
def record_rows(record: RunRecord) -> list[dict[str, Any]]:
    """The tidy rows of one record (the CSV's rows): one per (measure, category, component)."""
    s = record.settings
    ids = {name: getattr(s, name) for name in (*ID_COLUMNS, *SETTINGS_COLUMNS)}
    env = {name: record.environment.get(name) for name in ENV_COLUMNS}
    rows = []
    for measure, items in (("steady", record.breakdown), ("peak", record.peak)):
        for row in items:
            rows.append({**ids, "status": record.status, "measure": measure, "category": row.category,
                         "component": row.component, "bytes": row.bytes, "basis": row.basis, **env})
    if not rows:  # a failed run still gets a row, so nothing silently disappears
        rows.append({**ids, "status": record.status, "measure": "steady", "category": "", "component": "",
                     "bytes": None, "basis": "", **env})
    for row in rows:
        row["record_rows"] = len(rows)
    return rows


def to_csv(records: Sequence[RunRecord]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in record_rows(record))
    return buffer.getvalue()


def to_json(records: Sequence[RunRecord]) -> str:
    header = {"memprof": joined(r.environment.get("memprof") for r in records), "reproduce": reproduce_commands(records)}
    return json.dumps({**header, "records": [r.to_dict() for r in records]}, indent=1, default=str)


def render(path: str | Path, records: Sequence[RunRecord]) -> str:
    """The file's text: JSON for a ``.json`` path, the tidy CSV otherwise."""
    return to_json(records) if Path(path).suffix.lower() == ".json" else to_csv(records)


def write(path: str | Path, records: Sequence[RunRecord]) -> None:
    from memprof.files import write_atomic

    write_atomic(path, render(path, records))


# -- provenance: what a reader needs to reproduce a number ------------------------------------------
def joined(values) -> str:
    """The distinct values, in first-seen order, as one string ("n/a" when none is known)."""
    seen = list(dict.fromkeys("" if v is None else str(v) for v in values))
    seen = [v for v in seen if v]
    return ", ".join(seen) if seen else "n/a"


def provenance_keys() -> tuple[str, ...]:
    """The settings a reader needs (those with a flag; ``optimizers`` for the specs), then the environment."""
    settings = [f.name for f in declared_fields("run") if f.name != "spec"]
    return (settings[0], "optimizers", *settings[1:], *ENV_COLUMNS, "python", "platform")


def provenance(records: Sequence[RunRecord]) -> dict[str, str]:
    """Settings and environment of the records, key by key; differing values are listed together."""
    def values(key: str):
        for r in records:
            if key == "optimizers":
                yield r.settings.spec
            elif hasattr(r.settings, key):
                yield getattr(r.settings, key)
            elif key == "gpu" and not r.settings.device.startswith("cuda"):
                yield "none (cpu run)"
            else:
                yield r.environment.get(key)

    return {key: joined(values(key)) for key in provenance_keys()}


def reproduce_commands(records: Sequence[RunRecord]) -> list[str]:
    """One ``memprof compare`` (or ``estimate``) command per group of records measured with the same settings; for
    the user's own loop (``memprof.track``: its model_config says ``tracked``), the command that ran it."""
    own = [r for r in records if "tracked" in r.model_config]
    ran = [r.environment.get("command") or "the user's own loop (memprof.track)" for r in own]
    return [*dict.fromkeys(ran), *(reproduce_command(settings, specs) for settings, specs in
                                   group_by_request(r.settings for r in records if "tracked" not in r.model_config))]


# -- reading ----------------------------------------------------------------------------------------
def read(path: str | Path, what: str = "run file") -> list[RunRecord]:
    """The records of a JSON or CSV run file (``what`` names the file's part in messages)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RunFileMissing(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise RunFileMalformed(f"{what} {path} is not a memprof run file (not UTF-8 text)") from None
    if not text.strip():
        raise _truncated(what, path, "the file is empty")
    records = _from_json(text, path, what) if path.suffix.lower() == ".json" else _from_csv(text, path, what)
    if not records:
        raise _malformed(what, path, "it holds no run records")
    for i, record in enumerate(records, start=1):
        problem = _implausible(record)
        if problem:
            raise _malformed(what, path, f"record {i} ({record.settings.spec} on {record.settings.model}): {problem}")
    return records


def _implausible(record: RunRecord) -> str | None:
    """What no measurement writes: an unknown status, negative bytes or more than a 64-bit count
    holds, a finished run without rows."""
    if record.status not in STATUSES:
        return f"status {record.status!r} is not one of {', '.join(STATUSES)}"
    for row in (*record.breakdown, *record.peak):
        if not 0 <= row.bytes <= declared.INT64_MAX:
            return f"{row.category}/{row.component} has {_count(row.bytes)} bytes"
    peaks = record.peaks
    for name in ("allocated", "max_allocated", "max_reserved", "reserved_end", "allocated_end", "nvml"):
        value = getattr(peaks, name)
        if value is not None and not 0 <= value <= declared.INT64_MAX:
            return f"peaks.{name} is {_count(value)} bytes"
    if record.status == "ok" and not record.breakdown:
        return "status ok but no rows"
    return None


def _count(value: int) -> str:
    return str(value) if value < 0 else f"more than {declared.INT64_MAX:,}"


def _truncated(what: str, path: Path, detail: str) -> RunFileTruncated:
    return RunFileTruncated(f"{what} {path} is truncated: {detail}; write it again with --json/--csv or "
                            "`memprof baseline`")


def _malformed(what: str, path: Path, detail: str) -> RunFileMalformed:
    return RunFileMalformed(f"{what} {path} is not a memprof run file: {detail}; write one with --json/--csv or "
                            "`memprof baseline`")


def _from_json(text: str, path: Path, what: str) -> list[RunRecord]:
    try:
        check_json(text, "the file")
    except UsageError as exc:
        raise _malformed(what, path, str(exc)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        error = _truncated if exc.pos >= len(text.rstrip()) - 1 else _malformed
        raise error(what, path, f"invalid JSON ({exc.msg}, line {exc.lineno})") from None
    items = data["records"] if isinstance(data, dict) and "records" in data else [data]
    if not isinstance(items, list):
        raise _malformed(what, path, "'records' is not a list")
    records = []
    for i, item in enumerate(items):
        try:
            records.append(RunRecord.from_dict(item))
        except UsageError as exc:
            raise _malformed(what, path, f"record {i + 1}: {exc}") from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise _malformed(what, path, f"record {i + 1} is not a memprof run record "
                                                    f"({type(exc).__name__}: {exc})") from None
    return records


def _from_csv(text: str, path: Path, what: str) -> list[RunRecord]:
    if not text.endswith("\n"):
        raise _truncated(what, path, "the last line is cut off (no final newline)")
    longest = max(text.splitlines(), key=len)
    if len(longest) > MAX_CSV_LINE:
        raise _malformed(what, path, f"a line has {len(longest):,} characters; a memprof CSV line has at most "
                                     f"{MAX_CSV_LINE:,}")
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise _malformed(what, path, f"not a memprof CSV (missing column(s) {', '.join(missing)})")
        groups: dict[tuple, list[dict[str, str]]] = {}
        for line, cells in enumerate(reader, start=2):
            if len(cells) != len(header):
                raise _truncated(what, path, f"line {line} has {len(cells)} fields, the header {len(header)}")
            row = dict(zip(header, cells))
            groups.setdefault(tuple(row.get(k, "") for k in (*ID_COLUMNS, *SETTINGS_COLUMNS)), []).append(row)
    except csv.Error as exc:  # a quoted field over csv's limit, a NUL byte
        raise _malformed(what, path, f"line {reader.line_num}: {exc}") from None
    if not groups:
        raise _truncated(what, path, "the file has a header and no rows")
    return [_record_from_rows(rows, path, what) for rows in groups.values()]


def _record_from_rows(rows: list[dict[str, str]], path: Path, what: str) -> RunRecord:
    first = rows[0]
    declared_rows = first.get("record_rows", "")
    if declared_rows.isdigit() and int(declared_rows) != len(rows):
        raise _truncated(what, path, f"{first['spec']} on {first['model']} has {len(rows)} of its "
                                                f"{declared_rows} rows")
    try:
        settings = Settings(**declared.from_text(first))
    except UsageError as exc:
        raise _malformed(what, path, f"{first['spec']} on {first['model']}: {exc}") from None
    breakdown, peak = [], []
    for row in rows:
        if not row["category"]:
            continue  # the placeholder row of a failed run
        try:
            nbytes = int(row["bytes"])
        except ValueError:
            raise _malformed(what, path, f"{row['spec']} on {row['model']}: bytes {shorten(row['bytes'])} is "
                                                    "not an integer") from None
        item = Row(row["category"], row["component"], nbytes, row["basis"])
        if row["measure"] == "steady":
            breakdown.append(item)
        elif row["measure"] == "peak":
            peak.append(item)
        else:
            raise _malformed(what, path, f"measure {row['measure']!r} is neither steady nor peak")
    environment = {k: first[k] for k in ENV_COLUMNS if first.get(k)}
    cuda = settings.device.startswith("cuda")
    return RunRecord(settings=settings, environment=environment, status=first["status"],
                     failure=None if first["status"] == "ok" else first["status"], breakdown=breakdown, peak=peak,
                     peaks=Peaks(allocated=sum(r.bytes for r in peak) if peak else None, simulated=not cuda))
