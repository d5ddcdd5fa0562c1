"""Property-based tests (hypothesis): for any generated spec string, tolerance, config file or run
file, the command line succeeds or exits 2 with exactly one line on stderr, never a traceback.

Nothing is measured here: the runner is replaced by a stub that returns a record of the settings
it was given, so every check the command line and the API make before measuring runs for real.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import os
import string
import tempfile
from pathlib import Path

import pytest
from files_for_tests import FailingOs
from cli_for_tests import invoke
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from records_for_tests import run_record

from memprof.errors import UsageError
from memprof.optim.registry import registry
from memprof.record import ParameterState, Peaks, PhasePeak, Row, RunRecord, Timeline
from memprof.report import gate
from memprof.runfile import to_csv, to_json
from memprof.settings import Settings, config_keys
from memprof.units import UNITS, parse_size

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TESTS = Path(__file__).parent


def ok_or_one_line(result, *codes: int) -> None:
    """The contract: exit 0 (or ``codes``), or exit 2 with one line on stderr; never a traceback."""
    assert "Traceback" not in result.output, result.output
    event(f"exit {result.exit_code}")  # counted by --hypothesis-show-statistics
    if result.exit_code == 2:
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    else:
        assert result.exit_code in (0, *codes), result.output


def stub_record(settings: Settings) -> RunRecord:
    """What the runner would return, without measuring."""
    return run_record(settings=settings, rows=[("weights", "param", 64), ("optimizer_state", "moment", 128)],
                      peak=[("weights", "param", 64)], environment={})


@contextlib.contextmanager
def stubbed_runner():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("memprof.measure.runner.measure", stub_record)
        patch.syspath_prepend(str(TESTS))
        yield


# -- optimizer spec strings ------------------------------------------------------------------------
NAMES = sorted(name for name, entry in registry().items() if entry.requires is None)
DOTTED = ["torch.optim.RAdam", "torch.optim.Nope", "nonexistent_pkg_for_tests.Opt", "optim_for_tests.ExitingSGD",
          "optim_for_tests.Missing", "collections.OrderedDict", "torch.nn.Linear", "math.pi", "a..b", ".x", "x."]
KEYS = sorted({key for name in ("adam", "sgd", "smmf", "adafactor") for key in registry()[name].signature_defaults()})
VALUES = st.one_of(
    st.sampled_from(["1e-3", "0", "-1", "nan", "inf", "1e999", "true", "none", "(0.9,0.95)", "(0.9,", "[1,2]", "{}",
                     "'x'", "", "=", "0.9,0.95", "(", ")", "[]", "__import__('os')", "1" * 40]),
    st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=string.printable, max_size=8),
)
SPEC = st.one_of(
    st.builds(lambda name, pairs: ":".join([name, *(f"{k}={v}" for k, v in pairs)]),
              st.sampled_from(NAMES + DOTTED), st.lists(st.tuples(st.sampled_from(KEYS + ["lr", "nope"]), VALUES),
                                                       max_size=3)),
    st.text(alphabet=string.ascii_letters + string.digits + ":=,()[]{}'\" _-", max_size=20),
)
SPECS = st.lists(SPEC, min_size=0, max_size=3).map(",".join)


@FAST
@given(specs=SPECS)
def test_any_opt_string_is_measured_or_one_line(specs):
    with stubbed_runner():
        result = invoke("compare", "--model", "gpt2", "--opt", specs, "--device", "cpu")
    ok_or_one_line(result)


@FAST
@given(specs=SPECS)
def test_any_opt_string_validates_or_raises_a_usage_error(specs):
    from memprof.execute import validate_optimizers as _validate_optimizers

    with stubbed_runner():
        try:
            texts = _validate_optimizers(specs)
        except UsageError as exc:
            event("usage error")
            assert "\n" not in str(exc).strip()
            return
    event("valid")
    assert texts and len(set(texts)) == len(texts)


# -- tolerance strings -----------------------------------------------------------------------------
NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-10**30, 10**30).map(str),
                   st.sampled_from(["nan", "inf", "-inf", "1e999", "-0", ".5", "1_000", "", " "]))
TOLERANCE = st.one_of(
    st.builds(lambda n, unit: f"{n}{unit}", NUMBER, st.sampled_from(["%", *UNITS, "", "mb", "%%", " %"])),
    st.builds(lambda c, n: f"{c}={n}", st.sampled_from(["weights", "optimizer_state", "peak", "nope", ""]), NUMBER),
    st.text(max_size=10),
)


@FAST
@given(tolerance=TOLERANCE)
def test_any_tolerance_parses_to_a_finite_allowance_or_is_a_usage_error(tolerance):
    try:
        default, per_category = gate.parse_tolerances([tolerance])
    except UsageError:
        event("usage error")
        return
    event("valid")
    for parsed in [default, *per_category.values()]:
        if parsed is not None:
            assert math.isfinite(parsed.fraction) and parsed.fraction >= 0 and parsed.nbytes >= 0


@pytest.fixture(scope="module")
def gate_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gate")
    base, grown = folder / "base.csv", folder / "grown.csv"
    base.write_text(to_csv([stub_record(Settings(model="gpt2", optimizer="adam", spec="adam", device="cpu"))]))
    bigger = stub_record(Settings(model="gpt2", optimizer="adam", spec="adam", device="cpu"))
    bigger.breakdown = [Row(r.category, r.component, r.bytes * 1000) for r in bigger.breakdown]
    grown.write_text(to_csv([bigger]))
    return base, grown


@settings(FAST, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tolerance=TOLERANCE)
def test_any_tolerance_gates_honestly_or_is_one_line(gate_files, tolerance):
    base, grown = gate_files
    same = invoke("check", "--baseline", str(base), "--current", str(base), "--tolerance", tolerance)
    ok_or_one_line(same)  # a run never regresses against itself
    grew = invoke("check", "--baseline", str(base), "--current", str(grown), "--tolerance", tolerance)
    ok_or_one_line(grew, 1)
    assert same.exit_code == grew.exit_code == 2 or same.exit_code == 0
    if grew.exit_code != 2:  # 1000 times the bytes: a regression unless the tolerance allows it
        default, per_category = gate.parse_tolerances([tolerance])
        rows = stub_record(Settings(model="gpt2", optimizer="adam", spec="adam", device="cpu")).breakdown
        allowances = [(per_category.get(row.category) or default, row.bytes) for row in rows]
        every_row_allowed = all(t is not None and t.allowed(old) >= old * 999 for t, old in allowances)
        assert grew.exit_code == (0 if every_row_allowed else 1)


@FAST
@given(text=st.one_of(st.builds(lambda n, u: f"{n}{u}", NUMBER, st.sampled_from([*UNITS, ""])), st.text(max_size=8)))
def test_any_size_is_a_non_negative_count_of_bytes_or_a_usage_error(text):
    try:
        value = parse_size(text)
    except UsageError:
        event("usage error")
        return
    event("valid")
    assert isinstance(value, int) and value >= 0


# -- config files ----------------------------------------------------------------------------------
def toml_value(value) -> str:
    """TOML for a generated value (strings as JSON strings, which TOML reads alike)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, (int,)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


KEY = st.one_of(st.sampled_from(sorted(config_keys())), st.sampled_from(["description", "optimizer", "lr", "runs"]))
SCALAR = st.one_of(st.integers(-2**70, 2**70), st.floats(), st.booleans(), st.text(max_size=12),
                   st.sampled_from(["gpt2", "adam", "sgd,adam", "cpu", "cuda", "auto", "float32", "bf16", "x.py:f",
                                    "adam,adam", str(TESTS / "zoo_for_tests.py") + ":mlp"]))
VALUE = st.one_of(SCALAR, st.lists(SCALAR, max_size=3), st.dictionaries(st.sampled_from(["model", "x"]), SCALAR,
                                                                          max_size=2))
TABLE = st.dictionaries(KEY, VALUE, max_size=5)
CONFIG = st.one_of(
    st.builds(lambda top, runs: "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in top.items() if k != "runs")
              + "\n" + "".join("\n[[runs]]\n" + "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in run.items()
                                                           if k != "runs") for run in runs) + "\n",
              TABLE, st.lists(TABLE, max_size=3)),
    st.text(max_size=40),
)


@settings(FAST, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=CONFIG)
def test_any_config_file_is_measured_or_one_line(tmp_path, text):
    config = tmp_path / "run.toml"
    config.write_text(text)
    with stubbed_runner():
        result = invoke("compare", "--config", str(config), "--device", "cpu")
    ok_or_one_line(result)
    if result.exit_code == 2:
        assert str(config) in result.stderr or "unknown" in result.stderr or "optimizer" in result.stderr


# -- run files -------------------------------------------------------------------------------------
def base_records() -> list[RunRecord]:
    """A finished run with every part a view reads (phases, parameters, timeline, timings), and an OOM."""
    ok = stub_record(Settings(model="gpt2", optimizer="adam", spec="adam", device="cpu", steps=2))
    ok.notes = ["loss became nan at step 1"]
    ok.n_params, ok.timings_ms = 16, {"forward": 1.5, "backward": 2.0, "step": 0.5}
    ok.peaks = Peaks(allocated=192, phase="step", step=2)
    ok.phase_peaks = [PhasePeak(1, "forward", 64, 128, 96), PhasePeak(1, "step", 96, 192, 192)]
    ok.parameters = [ParameterState("0.weight", (4, 4), "float32", 64, 128, {"moment": 128}, {"exp_avg": 64,
                                                                                           "exp_avg_sq": 64}, False)]
    ok.timeline = Timeline(time=[0.0, 1.0, 2.0], total=[64, 192, 128],
                           categories={"weights": [64, 64, 64], "optimizer_state": [0, 128, 64]},
                           marks=[{"time": 0.0, "phase": "forward", "step": 1}, {"time": 1.0, "phase": "step", "step": 1}])
    ok.telemetry = [{"rank/0.weight": 2.0}]
    failed = run_record("sgd", status="oom", steps=2)
    return [ok, failed]


JSON_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=6)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children,
                                                                               max_size=3)),
    max_leaves=6,
)


def paths(data, prefix=()):
    """Every (path, value) inside plain JSON data."""
    yield prefix, data
    if isinstance(data, dict):
        for key, value in data.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from paths(value, (*prefix, i))


CONFUSING = st.one_of(st.sampled_from([None, True, -1, -(2**70), 0.5, float("nan"), "", "x", [], {}, [1], {"a": 1}]),
                      JSON_VALUE)


@st.composite
def mutated_json(draw) -> str:
    data = json.loads(to_json(base_records()[:draw(st.integers(1, 2))]))
    for _ in range(draw(st.integers(1, 3))):
        inside = [p for p, _ in paths(data) if p and p[0] == "records"]
        if not inside:
            break
        where = draw(st.sampled_from(inside))
        parent = data
        for key in where[:-1]:
            parent = parent[key]
        if draw(st.integers(0, 4)) == 0 and isinstance(parent, dict):
            del parent[where[-1]]
        else:
            # A copy: CONFUSING's lists and dicts are shared by every example, and a later mutation of
            # this one would change what the next example draws (hypothesis: FlakyStrategyDefinition).
            parent[where[-1]] = copy.deepcopy(draw(CONFUSING))
    return json.dumps(data)


@st.composite
def mutated_csv(draw) -> str:
    lines = to_csv(base_records()).splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        cells = lines[i].rstrip("\n").split(",")
        j = draw(st.integers(0, len(cells) - 1))
        cells[j] = draw(st.one_of(st.text(alphabet=string.printable.replace("\n", "").replace(",", ""), max_size=6),
                                  st.integers(-2**70, 2**70).map(str), st.sampled_from(["nan", "inf", "-1", "", "ok"])))
        lines[i] = ",".join(cells) + "\n"
        if draw(st.booleans()) and len(lines) > 2:
            del lines[draw(st.integers(1, len(lines) - 1))]
    return "".join(lines)


@settings(FAST, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(mutated_json(), mutated_csv()),
       fmt=st.sampled_from(["table", "csv", "json", "markdown", "latex"]))
def test_any_run_file_reports_and_checks_or_is_one_line(tmp_path, text, fmt):
    path = tmp_path / ("run.json" if text.startswith("{") else "run.csv")
    path.write_text(text)
    ok_or_one_line(invoke("report", str(path), "--format", fmt))
    ok_or_one_line(invoke("check", "--baseline", str(path), "--current", str(path)))


@FAST
@given(values=st.dictionaries(st.sampled_from([f for f in Settings.__dataclass_fields__]), SCALAR, max_size=4))
def test_any_settings_are_valid_or_a_usage_error(values):
    try:
        Settings(**values)
    except UsageError as exc:
        event("usage error")
        assert "\n" not in str(exc)
        return
    event("valid")


def test_the_stub_is_what_the_cli_measures():
    """The properties above rest on the stub: a valid command really reaches it."""
    with stubbed_runner():
        result = invoke("compare", "--model", "gpt2", "--opt", "adam,sgd", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "adam" in result.stdout and "sgd" in result.stdout


# -- parser bombs: input that would exhaust a parser is refused first, in one line -----------------
def refused(result) -> None:
    """Exit 2, one line on stderr, no traceback."""
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr


def one_line_usage_error(call) -> str:
    with pytest.raises(UsageError) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


BOMB = settings(FAST, max_examples=15)
NESTED_VALUE = st.one_of(
    st.builds(lambda op, n: op * n + "1", st.sampled_from(["-", "+", "~", "not "]), st.integers(200, 100_000)),
    st.builds(lambda brackets, n: brackets[0] * n + brackets[1] * n, st.sampled_from(["()", "[]", "{}"]),
              st.integers(9, 100_000)),
    st.integers(201, 10_000).map(lambda n: "1" * n),
)


@BOMB
@given(value=NESTED_VALUE, key=st.sampled_from(["lr", "betas", "eps"]))
def test_a_hyperparameter_value_that_would_exhaust_the_parser_is_one_line(value, key):
    from memprof.execute import validate_optimizers

    spec = f"adam:{key}={value}"
    assert "adam:" in one_line_usage_error(lambda: validate_optimizers(spec))
    with stubbed_runner():
        refused(invoke("compare", "--model", "gpt2", "--opt", f"sgd,{spec}", "--device", "cpu"))


@BOMB
@given(name=st.one_of(st.integers(4097, 100_000).map(lambda n: "m" * n),  # longer than a path may be
                      st.builds(lambda n, end: "m" * n + end, st.integers(256, 4000),  # a file name too long
                                st.sampled_from([".json", "/config.json", ".py:build", "/m.py:build"]))))
def test_a_model_name_the_file_system_cannot_hold_is_one_line(name):
    from memprof.models import ModelOptions, build_model, check_model_name

    one_line_usage_error(lambda: (check_model_name(name), build_model(name, ModelOptions(), "cpu")))
    refused(invoke("compare", "--model", name, "--opt", "adam", "--device", "cpu", "--steps", "1"))


def deep_json(kind: str, depth: int) -> str:
    return ("[" * depth + "]" * depth) if kind == "array" else ('{"a":' * depth + "1" + "}" * depth)


RUN_FILE_BOMB = st.one_of(
    st.builds(lambda kind, n, inside: (json.dumps({"records": [{"settings": "X"}]}).replace('"X"', deep_json(kind, n))
                                       if inside else deep_json(kind, n)),
              st.sampled_from(["array", "object"]), st.integers(65, 100_000), st.booleans()).map(lambda t: ("json", t)),
    st.builds(lambda n, field: to_json(base_records()).replace(f'"{field}": 2', f'"{field}": ' + "1" * n, 1),
              st.integers(101, 10_000), st.sampled_from(["batch_size", "steps"])).map(lambda t: ("json", t)),
    st.builds(lambda n, column: csv_cell(column, "1" * n), st.integers(41, 10_000),
              st.sampled_from(["batch_size", "seq_len", "bytes"])).map(lambda t: ("csv", t)),
    st.builds(lambda n, column: csv_cell(column, "x" * n), st.integers(20_001, 300_000),
              st.sampled_from(["model", "spec", "component"])).map(lambda t: ("csv", t)),
    st.integers(140_000, 300_000).map(lambda n: ("csv", csv_cell("model", '"' + ("x" * 10_000 + "\n") * (n // 10_000)
                                                                  + '"'))),
)


def csv_cell(column: str, value: str) -> str:
    """The tidy CSV of ``base_records()`` with ``column`` set to ``value`` on every row."""
    header, *rows = to_csv(base_records()).splitlines()
    at = header.split(",").index(column)
    changed = [",".join(value if i == at else cell for i, cell in enumerate(row.split(","))) for row in rows]
    return "\n".join([header, *changed]) + "\n"


@settings(BOMB, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bomb=RUN_FILE_BOMB)
def test_a_run_file_that_would_exhaust_the_parser_is_one_line(tmp_path, bomb):
    from memprof import runfile

    suffix, text = bomb
    path = tmp_path / f"run.{suffix}"
    path.write_text(text)
    assert str(path) in one_line_usage_error(lambda: runfile.read(path))
    refused(invoke("check", "--baseline", path, "--current", path))
    refused(invoke("report", path))


CONFIG_BOMB = st.one_of(
    st.builds(lambda open_, close, n: "x = " + open_ * n + "1" + close * n,
              st.sampled_from(["[", "{a="]), st.sampled_from(["]", "}"]), st.integers(65, 100_000)),
    st.builds(lambda key, part, n: f"{key}." + ".".join([part] * n) + " = 1",
              st.sampled_from(["runs", "description", "model"]), st.sampled_from(["a", '"a"', "'a'", "a . a"]),
              st.integers(64, 100_000)),
    st.builds(lambda part, n: "[runs." + ".".join([part] * n) + "]\nx = 1", st.sampled_from(["a", '"a"']),
              st.integers(64, 100_000)),
    st.builds(lambda key, prefix, n: f"{key} = {prefix}" + "1" * n, st.sampled_from(["batch_size", "seed", "steps"]),
              st.sampled_from(["", "-", "0x", "0o", "1.", "1e"]), st.integers(101, 10_000)),
)


@settings(BOMB, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bomb=CONFIG_BOMB)
def test_a_config_file_that_would_exhaust_the_parser_is_one_line(tmp_path, bomb):
    from memprof.api import requests

    config = tmp_path / "run.toml"
    config.write_text(f'model = "gpt2"\nopt = "adam"\n{bomb}\n')
    assert str(config) in one_line_usage_error(lambda: requests({}, config=config))
    with stubbed_runner():
        refused(invoke("compare", "--config", config, "--device", "cpu"))


@FAST
@given(text=st.one_of(st.integers(41, 10_000).map(lambda n: "1" * n), st.text(min_size=41, max_size=60)),
       name=st.sampled_from(["batch_size", "seq_len", "steps", "seed"]))
def test_an_integer_cell_of_any_length_is_an_int_or_one_line(text, name):
    from memprof.settings import from_text

    assert name in one_line_usage_error(lambda: from_text({name: text}))


# -- failures at write time: all outputs written, or no file changed ----------------------------------
OUTPUT_FILES = {"--csv": "out.csv", "--json": "out.json", "--markdown": "out.md", "--latex": "out.tex",
                "--plot": "fig.png"}
FIGURES = ("fig.png", "fig-timeline.png", "fig-parameters.png")
STAGED_CALLS = ("open", "write", "fsync", "link", "replace")
"""The calls memprof.files makes to stage and place a file (``link``: the old file kept to put back)."""
WRITE_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EFBIG, errno.EDQUOT, errno.EIO, errno.EPERM, errno.EACCES)



@settings(FAST, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.lists(st.sampled_from(sorted(OUTPUT_FILES)), min_size=1, max_size=5, unique=True),
       existing=st.sets(st.sampled_from(sorted({*OUTPUT_FILES.values(), *FIGURES}))),
       call=st.sampled_from(STAGED_CALLS), nth=st.integers(1, 6), code=st.sampled_from(WRITE_ERRORS))
def test_a_write_that_fails_anywhere_is_one_line_and_changes_no_file(tmp_path, options, existing, call, nth, code):
    from memprof import files
    from memprof.cli import EXIT_CODES
    from memprof.errors import OutputsNotWritten

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    for name in existing:
        (folder / name).write_text(f"the old {name}\n")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    failing = FailingOs(call, nth, code)

    def measured(settings):  # a record every figure can be drawn from; the failure is armed after it
        record = copy.deepcopy(base_records()[0])
        record.settings, failing.armed = settings, True
        return record

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("memprof.measure.runner.measure", measured)
        patch.setattr(files, "os", failing)
        result = invoke("compare", "--model", "gpt2", "--opt", "adam", "--device", "cpu",
                        *(arg for option in options for arg in (option, folder / OUTPUT_FILES[option])))
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert "Traceback" not in result.output, result.output
    if result.exit_code == 0:  # the failing call was never made, or was one the write does without
        event("written")
        assert not failing.fired or call == "link"
        written = {OUTPUT_FILES[o] for o in options} | (set(FIGURES) if "--plot" in options else set())
        assert set(after) == written | existing and all(after[n] != before.get(n) for n in written)
        return
    event(f"failed at {call}")
    assert failing.fired and result.exit_code == dict(EXIT_CODES)[OutputsNotWritten], result.output
    errors = [line for line in result.stderr.splitlines() if line != "adam: ok"]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write ") and os.strerror(code) in errors[0]
    assert after == before  # byte for byte, and no temporary left


@BOMB
@given(digits=st.integers(30, 20_000), name=st.sampled_from(["batch_size", "seq_len", "steps", "seed"]))
def test_an_integer_setting_of_any_length_is_one_line(digits, name):
    from memprof.settings import Settings

    message = one_line_usage_error(lambda: Settings(model="gpt2", spec="adam", **{name: 10 ** digits}))
    assert len(message) < 300
