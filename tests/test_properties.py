"""Property-based tests (hypothesis): for any generated spec string, tolerance, config file or run
file, the command line succeeds or exits 2 with exactly one line on stderr, never a traceback.

Nothing is measured here: the runner is replaced by a stub that returns a record of the settings
it was given, so every check the command line and the API make before measuring runs for real.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import string
from pathlib import Path

import pytest
from cli_for_tests import invoke
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from records_for_tests import run_record

from memprof.errors import UsageError
from memprof.optim.registry import registry
from memprof.record import ParameterState, Peaks, PhasePeak, Row, RunRecord, Timeline
from memprof.report import gate
from memprof.report.units import UNITS, parse_size
from memprof.runfile import to_csv, to_json
from memprof.settings import Settings, config_keys

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
    from memprof.api import _validate_optimizers

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
        allowance = default or per_category.get("optimizer_state") or per_category.get("weights")
        assert grew.exit_code == (0 if allowance and allowance.allowed(64) >= 64 * 999 else 1)


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
