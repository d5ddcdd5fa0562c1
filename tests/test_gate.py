"""The CI gate: `memprof baseline` / `memprof check` and the budget check the pytest plugin uses."""

from __future__ import annotations

import pytest
from cli_for_tests import invoke
from records_for_tests import run_record

from memprof import runfile
from memprof.errors import UsageError
from memprof.record import RunRecord
from memprof.report import gate
from memprof.runfile import to_csv, to_json

MOMENT = 160_000


def record(spec: str = "adam", *, moment: int = MOMENT, device: str = "cpu", peak_extra: int = 0,
           status: str = "ok", batch_size: int = 2) -> RunRecord:
    rows = [("weights", "param", 80_000), ("gradients", "grad", 80_000), ("optimizer_state", "moment", moment),
            ("optimizer_state", "other", 20), ("inputs", "batch", 288), ("activations", "saved", 5_000),
            ("step_transient", "step", 60_000 + peak_extra, "allocator")]
    peak = [("weights", "param", 80_000), ("optimizer_state", "moment", moment),
            ("step_transient", "step", 140_000 + peak_extra)]
    return run_record(spec, rows=rows, peak=peak, status=status, environment={"torch": "2.14.1", "memprof": "0.1.0"},
                      model="tiny_mlp.py:build", device=device, batch_size=batch_size, steps=2)


def write(path, *records: RunRecord):
    path.write_text(to_csv(records))
    return path


def check(*args: str):
    return invoke("check", *args)


def test_a_run_checked_against_itself_passes(tmp_path):
    base = write(tmp_path / "base.csv", record("adam"), record("adafactor", moment=2_000))
    result = check("--baseline", str(base), "--current", str(base))
    assert result.exit_code == 0, result.output
    assert "0 regression(s), 0 improvement(s), 10 row(s) within tolerance" in result.stdout
    assert "cpu: weights, buffers, gradients, optimizer_state, inputs" in result.stdout


def test_an_inflated_category_fails_and_is_named(tmp_path):
    base = write(tmp_path / "base.csv", record("adam"), record("adafactor", moment=2_000))
    current = write(tmp_path / "now.csv", record("adam", moment=MOMENT * 103 // 100), record("adafactor", moment=2_000))
    result = check("--baseline", str(base), "--current", str(current), "--tolerance", "2%")
    assert result.exit_code == 1, result.output
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("REGRESSION")]
    assert line == ("REGRESSION  tiny_mlp.py:build · adam · optimizer_state/moment: "
                    "156.25 KiB → 160.94 KiB (+3.00%, tolerance 2%)")
    assert check("--baseline", str(base), "--current", str(current), "--tolerance", "5%").exit_code == 0
    strict = check("--baseline", str(base), "--current", str(current), "--tolerance", "5%", "--tolerance", "optimizer_state=0%")
    assert strict.exit_code == 1


def test_the_tolerance_boundary_is_exact(tmp_path):
    base = write(tmp_path / "base.csv", record(moment=10_000))
    at_limit = write(tmp_path / "at.csv", record(moment=10_100))
    over = write(tmp_path / "over.csv", record(moment=10_101))
    assert check("--baseline", str(base), "--current", str(at_limit), "--tolerance", "1%").exit_code == 0
    assert check("--baseline", str(base), "--current", str(over), "--tolerance", "1%").exit_code == 1
    assert check("--baseline", str(base), "--current", str(over), "--tolerance", "101B").exit_code == 0


def test_exact_rows_default_to_zero_tolerance_and_improvements_never_fail(tmp_path):
    base = write(tmp_path / "base.csv", record(moment=10_000))
    assert check("--baseline", str(base), "--current", str(write(tmp_path / "a.csv", record(moment=10_001)))).exit_code == 1
    result = check("--baseline", str(base), "--current", str(write(tmp_path / "b.csv", record(moment=5_000))))
    assert result.exit_code == 0
    assert "IMPROVEMENT tiny_mlp.py:build · adam · optimizer_state/moment" in result.stdout and "-50.00%" in result.stdout


def test_peak_is_gated_on_cuda_but_not_on_cpu(tmp_path):
    grown = 20_000  # +8% of the peak, allocator rows only
    cpu = check("--baseline", str(write(tmp_path / "c0.csv", record())),
                "--current", str(write(tmp_path / "c1.csv", record(peak_extra=grown))))
    assert cpu.exit_code == 0, cpu.output
    cuda = check("--baseline", str(write(tmp_path / "g0.csv", record(device="cuda"))),
                 "--current", str(write(tmp_path / "g1.csv", record(device="cuda", peak_extra=grown))))
    assert cuda.exit_code == 1
    assert "peak/allocated" in cuda.stdout and "step_transient/step" in cuda.stdout and "tolerance 2%" in cuda.stdout
    opted_in = check("--baseline", str(tmp_path / "c0.csv"), "--current", str(tmp_path / "c1.csv"), "--category", "peak")
    assert opted_in.exit_code == 1


def test_a_run_that_now_fails_is_a_regression(tmp_path):
    base = write(tmp_path / "base.csv", record())
    result = check("--baseline", str(base), "--current", str(write(tmp_path / "oom.csv", record(status="oom"))))
    assert result.exit_code == 1 and "status ok → oom" in result.stdout


def test_json_runs_are_read_like_csv(tmp_path):
    (tmp_path / "base.json").write_text(to_json([record()]))
    current = write(tmp_path / "now.csv", record(moment=MOMENT + 1))
    assert check("--baseline", str(tmp_path / "base.json"), "--current", str(current)).exit_code == 1


def _one_error_line(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_a_truncated_baseline_is_a_usage_error(tmp_path):
    full = to_csv([record("adam"), record("adafactor")])
    cut = tmp_path / "cut.csv"
    cut.write_text(full[: full.rindex(",", 0, len(full) * 2 // 3)])  # mid-line (just before a comma)
    _one_error_line(check("--baseline", str(cut), "--current", str(cut)), "truncated", "last line is cut off")
    lines = full.splitlines(keepends=True)
    cut.write_text("".join(lines[:-2]))  # at a line boundary: rows are missing
    _one_error_line(check("--baseline", str(cut), "--current", str(cut)), "adafactor on tiny_mlp.py:build has 8 of its 10 rows")
    cut.write_text("")
    _one_error_line(check("--baseline", str(cut)), "the file is empty")
    cut.write_text("a,b\n1,2\n")
    _one_error_line(check("--baseline", str(cut)), "missing column(s) model")
    _one_error_line(check("--baseline", str(tmp_path / "missing.csv")), "cannot read baseline")


@pytest.mark.parametrize("args, message", [
    (["--tolerance", "lots"], "cannot read size 'lots'"),
    (["--tolerance", "weights=-1%"], "is negative"),
    (["--tolerance", "optimiser_state=0%"], "unknown category 'optimiser_state'"),
    (["--category", "peaks"], "unknown category 'peaks'"),
])
def test_bad_gate_options_are_usage_errors(tmp_path, args, message):
    base = write(tmp_path / "base.csv", record())
    _one_error_line(check("--baseline", str(base), "--current", str(base), *args), message)


def test_different_settings_or_missing_runs_are_usage_errors(tmp_path):
    base = write(tmp_path / "base.csv", record(), record("adafactor"))
    other = write(tmp_path / "b4.csv", record(batch_size=4), record("adafactor", batch_size=4))
    _one_error_line(check("--baseline", str(base), "--current", str(other)), "batch_size '2' vs '4'")
    _one_error_line(check("--baseline", str(base), "--current", str(write(tmp_path / "one.csv", record()))),
                    "the current run has no adafactor")


def test_runs_of_one_model_at_several_settings_are_told_apart(tmp_path):
    base = write(tmp_path / "base.csv", record(batch_size=2), record(batch_size=4))
    current = write(tmp_path / "now.csv", record(batch_size=2), record(batch_size=4, moment=MOMENT + 4))
    result = check("--baseline", str(base), "--current", str(current))
    assert result.exit_code == 1
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("REGRESSION")]
    assert line.startswith("REGRESSION  tiny_mlp.py:build [batch_size=4] · adam · optimizer_state/moment")


def test_github_step_summary_gets_a_markdown_section(tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    base = write(tmp_path / "base.csv", record())
    check("--baseline", str(base), "--current", str(write(tmp_path / "now.csv", record(moment=MOMENT * 2))))
    text = summary.read_text()
    assert text.startswith("earlier step\n### memprof check failed: 1 regression(s)")
    assert "| regression | tiny_mlp.py:build | adam | optimizer_state | moment | 156.25 KiB | 312.50 KiB | +100.00% | 0% |" in text


def test_baseline_then_check_remeasures_deterministically_on_cpu(mlp_spec, tmp_path):
    base = tmp_path / "memory-baseline.csv"
    made = invoke(*["baseline", "--model", mlp_spec, "--opt", "adam,sgd", "--device", "cpu",
                               "--steps", "1", "-o", str(base)])
    assert made.exit_code == 0, made.output
    again = tmp_path / "again.csv"
    refused = check("--baseline", str(base))
    assert refused.exit_code == 2 and "not a built-in model" in refused.output and "--trust" in refused.output
    result = check("--baseline", str(base), "--csv", str(again), "--trust", mlp_spec)
    assert result.exit_code == 0, result.output
    assert "0 regression(s), 0 improvement(s)" in result.stdout
    first, second = ([r for r in runfile.read(path) if r.settings.spec == "adam"] for path in (base, again))
    exact = [row for row in first[0].breakdown if row.category in gate.GATED_CPU]
    assert len(first) == len(second) == 1 and [r for r in second[0].breakdown if r in exact] == exact


# -- budgets ------------------------------------------------------------------------------------
def test_budgets_hold_at_the_limit_and_fail_one_byte_below():
    rec = record()
    assert gate.check_budgets([rec], {"max_optimizer_state": MOMENT + 20}) == []
    (failure,) = gate.check_budgets([rec], {"max_optimizer_state": MOMENT + 19, "max_weights": "1MiB"})
    assert failure.category == "optimizer_state" and failure.used == MOMENT + 20
    assert failure.long_repr == "adam on tiny_mlp.py:build: optimizer_state limited to 156.27 KiB but used 156.27 KiB (+0.0%)"
    assert "moment: 156.25 KiB" in failure.section
    (peak,) = gate.check_budgets([rec], {"max_peak": "300KB"})
    assert peak.category == "peak" and peak.used == rec.peaks.allocated


def test_budget_names_are_checked():
    with pytest.raises(UsageError, match="unknown memprof budget 'max_state'"):
        gate.check_budgets([record()], {"max_state": "1MiB"})
    (failure,) = gate.check_budgets([record(status="oom")], {"max_weights": "1GiB"})
    assert "OOM in step" in failure.long_repr
