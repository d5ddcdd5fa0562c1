"""`memprof papers`: the coverage arithmetic, the comparison and the rendering on a tiny reproduction, and the
plan of what to measure. Nothing is measured here."""

from __future__ import annotations

import pytest

from memprof.record import ParameterState, Peaks, Row, RunRecord
from memprof.report.papers.compare import PAPER_CELL, Reading, compare, coverage, unexplained, value_of
from memprof.report.papers.model import Estimate, Reproduction, Run, bucket, cell, quantities
from memprof.report.papers.render import page, read_csv_text, readme, to_csv_text
from memprof.settings import Settings

MiB = 2**20
ADAM, SMMF = Run("gpt2", "adam"), Run("gpt2", "smmf")


@pytest.mark.parametrize("paper, memprof, expected", [
    (100, 101.9, "within 2 %"), (100, 98.1, "within 2 %"), (100, 105, "within 10 %"), (100, 111, "off"),
    (0.8, 0.84, "within 2 %"),  # the paper's rounding: a printed 0.8 covers 0.75-0.85
    (0.8, 0.86, "within 10 %"), (3.9, 4.3, "off"), (5, None, "missing"),
])
def test_a_cell_lands_in_the_bucket_its_gap_and_the_papers_rounding_give(paper, memprof, expected):
    assert bucket(paper, memprof) == expected


def reading(kind: str, **values: int) -> Reading:
    return Reading(kind, kind.upper(), values)


def tiny() -> Reproduction:
    return Reproduction(
        name="tiny-table1", paper="Tiny", title="Tiny Table 1", source="a test", estimate=Estimate("h100", "V100"),
        cells=[cell("Tiny T1", "GPT-2", "Adam", ADAM, "state", 100, "MiB"),
               cell("Tiny T1", "GPT-2", "Adam", ADAM, "state_blocks", 100, "MiB", primary=False),
               cell("Tiny T1", "GPT-2", "SMMF", SMMF, "state", 10, "MiB",
                    reason="{paper} printed, {memprof} measured ({pct} %)"),
               cell("Tiny T1", "GPT-2", "Adam", ADAM, "peak", 300, "MiB"),
               cell("Tiny T1", "GPT-2", "SMMF", SMMF, "peak", 200, "MiB", reason="no GPU run for SMMF")],
        inconsistencies=["Adam reads 95 and 100 MiB in two tables."])


MEASURED = {ADAM.key: {"cpu": reading("cpu", state=100 * MiB, state_blocks=100 * MiB),
                       "gpu": reading("gpu", state=100 * MiB, peak=320 * MiB),
                       "estimate": reading("estimate", state=100 * MiB, peak=290 * MiB)},
            SMMF.key: {"cpu": reading("cpu", state=12 * MiB)}}


def test_the_coverage_counts_paper_cells_only_with_their_buckets():
    rows = compare(tiny().cells, MEASURED)
    (table,) = coverage(rows)
    assert (table.paper, table.table, table.cells, table.reproduced) == ("Tiny", "Tiny T1", 4, 3)
    assert table.counts == {"within 2 %": 1, "within 10 %": 1, "off": 1, "missing": 1}


def test_a_peak_comes_from_the_gpu_run_before_an_estimate_and_state_from_the_cpu_run():
    cells = tiny().cells
    assert value_of(cells[3], MEASURED) == (320.0, "GPU")
    assert value_of(cells[0], MEASURED) == (100.0, "CPU")
    without_gpu = {ADAM.key: {k: v for k, v in MEASURED[ADAM.key].items() if k != "gpu"}}
    assert value_of(cells[3], without_gpu) == (290.0, "ESTIMATE")


def test_reasons_are_filled_with_the_arithmetic_and_an_unexplained_off_cell_is_named():
    rows = compare(tiny().cells, MEASURED)
    smmf_state, adam_peak, smmf_peak = rows[2], rows[3], rows[4]
    assert smmf_state["reason"] == "10 printed, 12 measured (+20.0 %)"
    assert smmf_peak["reason"] == "no GPU run for SMMF" and smmf_peak["memprof"] == ""
    assert adam_peak["reason"] == "" and [r["optimizer"] for r in unexplained(rows)] == ["Adam"]


def test_a_failed_run_is_the_reason_of_its_missing_cells():
    rows = compare(tiny().cells[:1], {}, {ADAM.key: "adam oom: OOM in backward"})
    assert rows[0]["reason"] == "not measured: adam oom: OOM in backward"


def test_the_page_and_the_readme_render_the_table_the_coverage_and_the_contradictions():
    repro = tiny()
    rows = read_csv_text(to_csv_text(compare(repro.cells, MEASURED)))  # what a later partial run reads back
    assert [r["cell"] for r in rows] == [PAPER_CELL, "", PAPER_CELL, PAPER_CELL, PAPER_CELL]
    text = page(repro, rows, ["State on CPU: gpt2."])
    assert "| Tiny T1 | GPT-2 | Adam | optimizer state [MiB] | **100** | 100.000 |" in text
    assert "why: 10 printed, 12 measured (+20.0 %)" in text and "Adam reads 95 and 100 MiB" in text
    top = readme([repro], {repro.name: rows}, ["12 s in all"], ["`tiny.py`: a model."])
    assert "| Tiny | Tiny T1 | 4 | 3 | 1 | 1 | 1 | 1 |" in top
    assert "| **all** |  | **4** | **3** | **1** | **1** | **1** | **1** |" in top
    assert "**no reason recorded**" in top and "- Tiny ([tiny-table1](tiny-table1.md)): Adam reads 95" in top


def test_quantities_of_a_record_round_each_state_tensor_to_512_byte_blocks_and_a_sign_to_its_bits():
    state = ParameterState(name="w", shape=(10, 10), dtype="float32", param_bytes=400, state_bytes=1013,
                           by_role={}, by_key={"factor": 1000, "sign": 13, "step": 4}, unfactored=False)
    record = RunRecord(settings=Settings(spec="smmf"), environment={},
                       breakdown=[Row("weights", "param", 400), Row("gradients", "grad", 400),
                                  Row("optimizer_state", "factor", 1013)],
                       peaks=Peaks(allocated=5000), parameters=[state])
    assert quantities(record) == {"state": 1013, "model_state": 1413, "model_grads_state": 1813,
                                  "state_blocks": 1024 + 512, "state_blocks_exact_sign": 1024 + 13, "peak": 5000}


def test_the_plan_measures_state_on_cpu_and_estimates_only_peaks_without_a_gpu_run(tmp_path):
    from memprof.papers import plan

    (tmp_path / "tiny-table1.toml").write_text('model = "gpt2"\nopt = "adam,smmf"\nbatch_size = 64\n')
    jobs = plan(tiny(), tmp_path, {})
    assert [(job.kind, specs) for job, specs, _ in jobs] == [("cpu", ["adam", "smmf"]), ("estimate", ["adam", "smmf"])]
    cpu, estimate = (dict(job.settings) for job, _, _ in jobs)
    assert (cpu["device"], cpu["batch_size"], estimate["batch_size"], estimate["target_gpu"]) == ("cpu", 1, 64, "h100")
    jobs = plan(tiny(), tmp_path, {ADAM.key: {"gpu": MEASURED[ADAM.key]["gpu"]}})
    assert [(job.kind, specs) for job, specs, _ in jobs] == [("cpu", ["adam", "smmf"]), ("estimate", ["smmf"])]


def test_an_unknown_reproduction_is_one_line_and_exit_code_2(capsys):
    from memprof.cli import main

    assert main(["papers", "smmf-table5"]) == 2
    assert "unknown reproduction 'smmf-table5'" in capsys.readouterr().err


# -- the checked-in reproductions ------------------------------------------------------------------------
def test_every_run_a_cell_reads_is_one_its_config_measures_or_estimates():
    from pathlib import Path

    from memprof.config import load_runs
    from memprof.optim.registry import parse_spec, registry, split_specs
    from memprof.report.papers.catalog import reproductions

    reports = Path(__file__).resolve().parents[1] / "reports"
    names = set(registry())
    for name, repro in reproductions().items():
        runs = load_runs(reports / f"{name}.toml")
        listed = {(run["model"], spec, run.get("num_classes"), run.get("lora")) for run in runs
                  for spec in split_specs(run["opt"])}
        assert all(parse_spec(spec).entry.name in names for _, spec, _, _ in listed)
        for run in repro.runs:  # an upper end of a range (rank_init=…) comes from estimating its listed spec
            lower = run.spec.replace(":rank_init=2147483647", "")
            assert (run.model, lower, run.num_classes, run.lora) in listed, (name, run)


@pytest.mark.parametrize("function, parameters", [
    ("vit_small.py:vit_small", 6_324_970),  # io-adam-digest §3.7
    ("yolov5.py:yolov5s", 7_235_389), ("yolov5.py:yolov5m", 21_190_557),  # Ultralytics' published counts
    ("wmt_transformer.py:transformer_base", 94_504_960),  # 8 B each = 0.70 GiB, SMMF Table 2's Adam
])
def test_the_model_files_have_the_papers_parameter_counts(function, parameters):
    from pathlib import Path

    from memprof.models import ModelOptions, build_model

    configs = Path(__file__).resolve().parents[1] / "reports" / "configs"
    built = build_model(f"{configs}/{function}", ModelOptions(batch_size=2, seq_len=8, image_size=32), "cpu")
    assert built.config["parameters"] == parameters
    assert built.loss(built.model, built.batch).ndim == 0


def test_a_paper_number_keeps_the_digits_it_was_printed_with():
    from memprof.report.papers.model import Printed

    assert bucket(Printed("0.70"), 0.68) == "within 10 %"  # printed to ±0.005: 2.9 % off
    assert bucket(0.70, 0.68) == "within 2 %"  # a plain 0.7 is printed to ±0.05
    row = compare([cell("Tiny T1", "GPT-2", "Adam", ADAM, "state", Printed("100.0"), "MiB")], MEASURED)[0]
    assert row["paper"] == "100.0" and row["note"].startswith("within ±2 %")
