"""reports/paper_tables.py arithmetic on a tiny synthetic run, and the checked-in run configurations."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from memprof.config import load_runs
from memprof.models import model_names
from memprof.optim.registry import parse_specs, registry

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"
CONFIGS = sorted(REPORTS.glob("*.toml"))
MiB = 2**20


def _load_script():
    spec = importlib.util.spec_from_file_location("paper_tables", REPORTS / "paper_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_tables"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


pt = _load_script()

HEADER = ("model", "optimizer", "spec", "device", "status", "measure", "category", "component", "bytes", "num_classes")


def _rows(model, spec, device="cpu", classes="", *, weights, grads, state, peak=None, status="ok"):
    base = {"model": model, "optimizer": spec.split(":")[0], "spec": spec, "device": device, "status": status,
            "num_classes": classes}
    rows = [{**base, "measure": "steady", "category": "weights", "component": "param", "bytes": weights},
            {**base, "measure": "steady", "category": "buffers", "component": "buffer", "bytes": 1000},
            {**base, "measure": "steady", "category": "gradients", "component": "grad", "bytes": grads}]
    rows += [{**base, "measure": "steady", "category": "optimizer_state", "component": role, "bytes": n}
             for role, n in state.items()]
    if peak is not None:
        rows += [{**base, "measure": "peak", "category": "weights", "component": "param", "bytes": peak - 500},
                 {**base, "measure": "peak", "category": "step_transient", "component": "step", "bytes": 500},
                 {**base, "measure": "peak", "category": "allocator", "component": "reserved", "bytes": 10**9}]
    return rows


@pytest.fixture()
def run_csv(tmp_path):
    rows = (_rows("m", "adam", weights=100 * MiB, grads=100 * MiB, state={"moment": 200 * MiB, "other": 4})
            + _rows("m", "smmf", weights=100 * MiB, grads=100 * MiB, state={"factor": MiB, "sign": MiB // 2})
            + _rows("m", "sgd", classes="10", weights=10 * MiB, grads=10 * MiB, state={"moment": 10 * MiB})
            + _rows("g", "adam", device="cuda", weights=MiB, grads=MiB, state={"moment": 2 * MiB}, peak=5 * MiB)
            + _rows("g", "sgd", device="cuda", weights=MiB, grads=MiB, state={"moment": MiB}, peak=3 * MiB)
            + _rows("m", "bad", status="failed", weights=1, grads=1, state={}))
    path = tmp_path / "run.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_quantities_are_sums_of_the_right_rows(run_csv):
    measured = pt.read_csv(run_csv)
    adam = measured[("m", "adam", None)]
    assert adam["state"] == 200 * MiB + 4
    assert adam["model_state"] == 100 * MiB + 1000 + 200 * MiB + 4
    assert adam["model_grads_state"] == 200 * MiB + 1000 + 200 * MiB + 4
    assert adam["peak"] is None  # no peak rows
    assert measured[("m", "sgd", 10)]["state"] == 10 * MiB  # the class count is part of the key
    assert measured[("g", "adam", None)]["peak"] == 5 * MiB  # allocator (reserved) rows are not allocated bytes


def test_compare_diff_percent_and_verdict(run_csv):
    measured = pt.read_csv(run_csv)
    adam, smmf = pt.Run("m", "adam"), pt.Run("m", "smmf")
    cells = [
        pt.cell("T", "m", "Adam", adam, "state", 202.0, "MiB"),  # 200.000004 vs 202: -0.99 %
        pt.cell("T", "m", "SMMF", smmf, "state", 1.7, "MiB"),  # 1.5 vs 1.7: -11.8 %
        pt.cell("T", "m", "SMMF", smmf, "state", 2.0, "MiB"),  # printed "2": 1.5 is just inside ±0.5
        pt.cell("T", "m", "Adam", adam, "state", 200.2, "MiB", tolerance=("abs", 0.1)),
        pt.cell("T", "m", "SMMF 8", smmf, "state", None, "MiB"),
        pt.difference("T", "m", "Adam − SMMF", adam, smmf, "state", 198.5, "MiB"),
        pt.Cell("T", "m", "Adam ÷ SMMF", "state", ((1, adam), (1, smmf)), 133.0, "×", ratio=True),
        pt.cell("T", "m", "gone", pt.Run("m", "bad"), "state", 1.0, "MiB"),
        pt.cell("T", "m", "never", pt.Run("m", "lion"), "state", 1.0, "MiB"),
    ]
    rows = pt.compare(cells, measured)
    assert [list(r) for r in rows] == [list(pt.COLUMNS)] * len(rows)
    first, second, rounded, absolute, alone, diff, ratio, failed, missing = rows
    assert (first["memprof"], first["diff"], first["diff_pct"]) == ("200.000", "-2.000", "-1.0")
    assert first["note"].startswith("within ±2 %")
    assert (second["memprof"], second["diff"], second["diff_pct"]) == ("1.500", "-0.200", "-11.8")
    assert second["note"].startswith("OUTSIDE")
    assert rounded["note"].startswith("within") and "rounding ±0.5" in rounded["note"]
    assert absolute["note"].startswith("OUTSIDE ±0.1 MiB")
    assert (alone["paper"], alone["memprof"], alone["diff"], alone["note"]) == ("", "1.500", "", "")
    assert (diff["memprof"], diff["note"][:6]) == ("198.500", "within")
    assert ratio["memprof"] == f"{(200 * MiB + 4) / (1.5 * MiB):.3f}" and ratio["quantity"].endswith("[×]")
    assert failed["memprof"] == missing["memprof"] == "" and missing["note"].startswith("not measured")


def test_peak_is_pending_on_cpu_and_filled_from_cuda(run_csv):
    measured = pt.read_csv(run_csv)
    rows = pt.compare([pt.cell("T", "m", "Adam", pt.Run("m", "adam"), "peak", 3.0, "GiB"),
                       pt.cell("T", "g", "Adam", pt.Run("g", "adam"), "peak", 5.0, "MiB"),
                       pt.difference("T", "g", "Adam − SGD", pt.Run("g", "adam"), pt.Run("g", "sgd"), "peak",
                                     2.0, "MiB")], measured)
    assert (rows[0]["memprof"], rows[0]["diff"]) == (pt.PENDING, "")
    assert (rows[1]["memprof"], rows[1]["diff_pct"]) == ("5.000", "+0.0")
    assert rows[2]["memprof"] == "2.000"
    lines = pt.summary(rows)
    assert "1 peak cells are pending GPU run" in lines[0]


def test_a_cell_names_a_known_quantity_and_unit():
    with pytest.raises(ValueError, match="Invalid cell"):
        pt.cell("T", "m", "Adam", pt.Run("m", "adam"), "activations", 1.0, "MiB")
    with pytest.raises(ValueError, match="Invalid cell"):
        pt.cell("T", "m", "Adam", pt.Run("m", "adam"), "state", 1.0, "furlongs")


def test_printed_rounding_allowance():
    assert pt.printed_half_unit(9) == 0.5
    assert pt.printed_half_unit(3.7) == pytest.approx(0.05)
    assert pt.printed_half_unit(2409.89) == pytest.approx(0.005)
    assert pt.printed_half_unit(1000.0) == 0.5


def test_block_rounding_from_the_json(tmp_path, run_csv):
    measured = pt.read_csv(run_csv)
    record = {"settings": {"model": "m", "spec": "smmf", "num_classes": None},
              "parameters": [{"by_key": {"row_m": 24, "col_m": 513, "sign": 100, "step": 4}},
                             {"by_key": {"row_m": 0, "sign": 1024}}]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"records": [record]}))
    pt.add_block_rounded_state(measured, path)
    smmf = measured[("m", "smmf", None)]
    assert smmf["state_blocks"] == 512 + 1024 + 512 + 1024  # "step" is a host tensor; 0 bytes take no block
    assert smmf["state_blocks_exact_sign"] == 512 + 1024 + 100 + 1024
    assert pt.block_rounded([1, 512, 513]) == 512 + 512 + 1024


def test_main_writes_the_table_and_the_page(tmp_path, run_csv, monkeypatch):
    repro = pt.Reproduction("toy", "Toy table", "A paper.", "memprof compare --config reports/toy.toml",
                            "memprof compare --config reports/toy.toml --device cuda",
                            [pt.cell("T", "m", "Adam", pt.Run("m", "adam"), "state", 202.0, "MiB"),
                             pt.cell("T", "m", "SMMF", pt.Run("m", "smmf"), "state_blocks", 1.5, "MiB")],
                            ["Why it matches."])
    monkeypatch.setitem(pt.REPRODUCTIONS, "toy", repro)
    assert pt.main(["toy", str(run_csv), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "toy.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == pt.COLUMNS
    assert len(rows) == 1  # without --json the 512-B-block rows are left out
    page = (tmp_path / "toy.md").read_text()
    assert "memprof compare --config reports/toy.toml" in page and "paper_tables.py toy" in page
    assert "| T | m | Adam | optimizer state [MiB] | 202 | 200.000 | -2.000 | -1.0 |" in page
    assert "Why it matches." in page


# -- the checked-in configurations ---------------------------------------------------------
def _known_model(name: str) -> bool:
    if name in {entry[0] for entry in model_names()}:
        return True
    if name.endswith(".json"):
        return (ROOT / name).is_file() and "model_type" in json.loads((ROOT / name).read_text())
    path, _, function = name.rpartition(":")
    return path.endswith(".py") and (ROOT / path).is_file() and f"def {function}(" in (ROOT / path).read_text()


def test_there_is_a_config_for_every_reproduction():
    assert {path.stem for path in CONFIGS} == set(pt.REPRODUCTIONS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_names_registry_optimizers_and_known_models(path):
    runs = load_runs(path)
    assert runs
    names = set(registry())
    for run in runs:
        assert _known_model(run["model"]), run["model"]
        assert all(spec.entry.name in names for spec in parse_specs(run["opt"]))
    measured = {(run["model"], spec, run.get("num_classes")) for run in runs for spec in
                (s.text for s in parse_specs(run["opt"]))}
    assert pt.run_specs(path.stem) <= measured  # every record the script reads is one the config measures


def test_vit_small_has_the_papers_parameter_count():
    from memprof.models import ModelOptions, build_model

    built = build_model("reports/configs/vit_small.py:vit_small", ModelOptions(batch_size=2), "cpu")
    assert built.config["parameters"] == 6_324_970  # io-adam-digest §3.7
    assert built.loss(built.model, built.batch).ndim == 0
