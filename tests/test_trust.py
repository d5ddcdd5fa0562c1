"""`memprof check` never loads code a baseline names unless the user trusts it, and checks every run
before the first is measured (memprof.trust)."""

from __future__ import annotations

import sys

import pytest
from cli_for_tests import invoke

from memprof import api
from memprof.errors import UsageError
from memprof.record import Peaks, Row, RunRecord
from memprof.runfile import to_csv, to_json
from memprof.settings import Settings

EVIL = """\
import pathlib
pathlib.Path({marker!r}).write_text("imported")
Opt = None
"""


def record(model: str, spec: str, batch_size: int = 2) -> RunRecord:
    settings = Settings(model=model, optimizer=spec, spec=spec, device="cpu", batch_size=batch_size, steps=1)
    return RunRecord(settings=settings, environment={}, breakdown=[Row("weights", "param", 64)],
                     peak=[Row("weights", "param", 64, "allocator")], peaks=Peaks(allocated=64))


def baseline(folder, suffix: str, *records: RunRecord):
    path = folder / f"b.{suffix}"
    path.write_text(to_json(records) if suffix == "json" else to_csv(records))
    return path


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """An importable module ``evilopt`` whose import writes a marker file (returned)."""
    marker = tmp_path / "imported.txt"
    (tmp_path / "evilopt.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.delitem(sys.modules, "evilopt", raising=False)
    yield marker
    sys.modules.pop("evilopt", None)


def refused(result, *names: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stderr.count("\n") == 1, result.output
    for name in names:
        assert repr(name) in result.stderr and "--trust" in result.stderr, result.stderr


@pytest.mark.parametrize("suffix", ["csv", "json"])
@pytest.mark.parametrize("model", ["gpt2", "trusted file"])
def test_a_dotted_path_after_a_comma_inside_one_spec_is_refused_unimported(tmp_path, evil, mlp_spec, suffix, model):
    model = mlp_spec if model == "trusted file" else model
    path = baseline(tmp_path, suffix, record(model, "sgd:lr=0.01,evilopt.Opt"))
    result = invoke("check", "--baseline", path, "--trust", mlp_spec)
    assert not evil.exists() and "evilopt" not in sys.modules
    refused(result, "evilopt.Opt")


def test_quotes_that_pair_up_across_two_specs_are_read_as_measure_reads_them(tmp_path, evil, mlp_spec):
    """Alone, each spec names a registered optimizer; joined as measure() joins them, the quotes pair up
    and leave ``evilopt.Opt`` a spec of its own."""
    path = baseline(tmp_path, "csv", record(mlp_spec, "sgd:foreach='"), record(mlp_spec, "adam:lr=0.1',evilopt.Opt"))
    result = invoke("check", "--baseline", path, "--trust", mlp_spec)
    assert not evil.exists() and "evilopt" not in sys.modules
    refused(result, "evilopt.Opt")


def test_a_stdlib_module_with_import_side_effects_is_not_imported(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "this", raising=False)  # importing `this` prints the Zen of Python
    path = baseline(tmp_path, "csv", record("gpt2", "adam:lr=0.001,this.Zen"))
    result = invoke("check", "--baseline", path)
    assert "Beautiful is better than ugly" not in result.output and "this" not in sys.modules
    refused(result, "this.Zen")


def test_every_run_is_checked_before_the_first_is_measured(tmp_path, evil, mlp_spec):
    path = baseline(tmp_path, "csv", record(mlp_spec, "sgd"), record(mlp_spec, "evilopt.Opt", batch_size=4))
    started = []
    with pytest.raises(UsageError, match="evilopt.Opt") as error:
        api.check(path, trust=[mlp_spec], on_start=started.append)
    assert started == [] and "\n" not in str(error.value)
    assert not evil.exists()


def test_every_untrusted_name_is_named_at_once(tmp_path, evil, mlp_spec):
    other = f"{mlp_spec[:-len(':mlp')]}:tiny_gpt2"
    path = baseline(tmp_path, "json", record(mlp_spec, "sgd"), record(other, "evilopt.Opt", batch_size=4),
                    record(other, "adam:lr=0.001,this.Zen", batch_size=4))
    result = invoke("check", "--baseline", path)
    assert not evil.exists()
    refused(result, mlp_spec, other, "evilopt.Opt", "this.Zen")
    assert "--trust evilopt.Opt" in result.stderr
    trusted = invoke("check", "--baseline", path, "--trust", mlp_spec, "--trust", other, "--trust", "this.Zen")
    refused(trusted, "evilopt.Opt")
    assert mlp_spec not in trusted.stderr and not evil.exists()
