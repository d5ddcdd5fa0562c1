"""Views of synthetic run records: CSV/JSON provenance, Markdown, LaTeX, figures, `memprof report`."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import shutil
import subprocess

import pytest
from cli_for_tests import invoke
from records_for_tests import run_record

from memprof import runfile
from memprof.record import ParameterState, RunRecord, Timeline
from memprof.report import latex, markdown, plot
from memprof.runfile import CSV_COLUMNS, provenance, to_csv, to_json

ENV = {"memprof": "0.1.0", "torch": "2.14.1", "cuda": "13.0", "python": "3.11.7", "platform": "Linux",
       "gpu": "NVIDIA H100 80GB HBM3", "driver": "580.65"}
MIB = 2**20


def make_record(spec: str, state: dict[str, int], *, model: str = "tiny_net&co", status: str = "ok",
                device: str = "cuda") -> RunRecord:
    """A record shaped like the runner's: breakdown, peak composition, per-parameter state, timeline."""
    persistent = [("weights", "param", 8 * MIB), ("buffers", "buffer", 0), ("gradients", "grad", 8 * MIB),
                  *(("optimizer_state", k, v) for k, v in state.items()), ("inputs", "batch", MIB // 4)]
    record = run_record(spec, rows=[*persistent, ("activations", "saved", 3 * MIB),
                                    ("temporaries", "forward", MIB, "allocator"),
                                    ("step_transient", "step", 2 * MIB, "allocator")],
                        peak=[*(row for row in persistent if row[2]), ("step_transient", "step", 2 * MIB)],
                        status=status, failure="OOM in backward (step 2)", environment=ENV, model=model, device=device,
                        batch_size=4, steps=2)
    if status != "ok":
        return record
    total_state = sum(state.values())
    record.parameters = [
        ParameterState("transformer.h.0.mlp.c_fc.weight", (512, 2048), "float32", 4 * MIB, total_state * 3 // 4,
                       {k: v * 3 // 4 for k, v in state.items()}, {}, False),
        ParameterState("lm_head.weight", (2048, 512), "float32", 4 * MIB, total_state // 4,
                       {k: v // 4 for k, v in state.items()}, {}, False),
    ]
    marks = [(0, "setup", 0), (10, "forward", 1), (20, "backward", 1), (30, "step", 1), (40, "forward", 2),
             (50, "backward", 2), (60, "step", 2), (70, "end", 2)]
    times = list(range(0, 71, 5))
    record.timeline = Timeline(
        time=[t * 1000 for t in times],
        total=[],
        categories={
            "weights": [8 * MIB] * len(times),
            "gradients": [0 if t < 25 else 8 * MIB for t in times],
            "optimizer_state": [0 if t < 35 else total_state for t in times],
            "activations": [3 * MIB if t % 30 in (15, 20) else 0 for t in times],
            "step_transient": [2 * MIB if t in (35, 65) else 0 for t in times],
        },
        marks=[{"time": t * 1000, "phase": p, "step": s} for t, p, s in marks],
    )
    record.timeline.total = [sum(v[i] for v in record.timeline.categories.values()) for i in range(len(times))]
    return record


@pytest.fixture
def records() -> list[RunRecord]:
    return [
        make_record("adam", {"moment": 16 * MIB, "other": 8}),
        make_record("smmf_8bit:beta1=0.9", {"factor": MIB // 2, "sign": MIB // 4, "other": 8}),
        make_record("adam_100%", {}, status="oom"),
    ]


# -- CSV and JSON ------------------------------------------------------------------------------
def test_csv_keeps_tidy_columns_and_adds_settings_and_environment(records):
    rows = list(csv.DictReader(io.StringIO(to_csv(records))))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert CSV_COLUMNS[:17] == ("model", "optimizer", "spec", "device", "dtype", "amp", "lora", "batch_size",
                                "seq_len", "image_size", "steps", "status", "measure", "category", "component", "bytes",
                                "basis")
    adam = [r for r in rows if r["spec"] == "adam"]
    assert {r["gpu"] for r in adam} == {"NVIDIA H100 80GB HBM3"} and {r["driver"] for r in adam} == {"580.65"}
    assert {r["torch"] for r in adam} == {"2.14.1"} and {r["seed"] for r in adam} == {"0"}
    assert {int(r["record_rows"]) for r in adam} == {len(adam)}
    failed = [r for r in rows if r["spec"] == "adam_100%"]
    assert len(failed) == 1 and failed[0]["status"] == "oom" and failed[0]["bytes"] == ""
    # A failed run (or a default setting) in the file must not turn integers into floats.
    assert all(re.fullmatch(r"\d+", r["bytes"]) for r in rows if r["status"] == "ok")
    vision = make_record("sgd", {"moment": 8})
    vision.settings = dataclasses.replace(vision.settings, num_classes=10)
    assert {r["num_classes"] for r in csv.DictReader(io.StringIO(to_csv([records[0], vision])))} == {"", "10"}


def test_json_round_trips_and_carries_the_reproduce_command(records, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(to_json(records))
    loaded = runfile.read(path)
    assert [r.to_dict() for r in loaded] == [r.to_dict() for r in records]
    (command,) = json.loads(path.read_text())["reproduce"]
    assert command.startswith("memprof compare --model 'tiny_net&co' --opt adam,smmf_8bit:beta1=0.9,adam_100% "
                              "--device cuda --dtype float32 --batch-size 4")


def test_provenance_lists_what_reproduces_a_number(records):
    info = provenance(records)
    assert info["model"] == "tiny_net&co" and info["batch_size"] == "4" and info["steps"] == "2"
    assert info["gpu"] == "NVIDIA H100 80GB HBM3" and info["driver"] == "580.65" and info["cuda"] == "13.0"
    assert info["optimizers"] == "adam, smmf_8bit:beta1=0.9, adam_100%"
    cpu = make_record("adam", {"moment": 8}, device="cpu")
    assert provenance([cpu])["gpu"] == "none (cpu run)"


# -- Markdown ---------------------------------------------------------------------------------
def test_markdown_table_is_well_formed_and_labelled(records):
    text = markdown.to_markdown(records, unit="GiB")
    comment, body = text.split("-->\n", 1)
    assert comment.startswith("<!--") and "torch: 2.14.1" in comment and "driver: 580.65" in comment
    assert "memprof compare --model" in comment
    table = [line for line in body.splitlines() if line.startswith("|")]
    widths = {len(re.split(r"(?<!\\)\|", line)) for line in table}
    assert len(widths) == 1, table  # header, rule and every row have the same number of cells
    assert "Optimizer state (GiB)" in table[0] and "State: sign (GiB)" in table[0] and "Peak (GiB)" in table[0]
    adam = next(line for line in table if line.startswith("| adam |"))
    assert "| 0.02 |" in adam  # 16 MiB of moments in GiB, two decimals
    assert "OOM in backward (step 2)" in text


def test_markdown_escapes_pipes():
    assert markdown.escape("a|b") == "a\\|b"


def test_markdown_detail_adds_breakdown_and_parameters(records):
    text = markdown.to_markdown(records[:1], unit="MiB", detail=True)
    assert "### adam on tiny_net&co: bytes by category" in text
    assert "| optimizer_state | moment | 16.00 | 16.00 |" in text
    assert "transformer.h.0.mlp.c_fc.weight" in text


# -- LaTeX ------------------------------------------------------------------------------------
def _balanced(text: str) -> bool:
    depth = 0
    for match in re.finditer(r"\\[{}]|[{}]", text):
        token = match.group()
        if token in ("\\{", "\\}"):
            continue
        depth += 1 if token == "{" else -1
        if depth < 0:
            return False
    return depth == 0


def test_latex_is_a_booktabs_table_with_escaped_names(records):
    text = latex.to_latex(records, unit="MiB")
    body = [line for line in text.splitlines() if not line.startswith("%")]
    joined = "\n".join(body)
    assert [joined.count(rule) for rule in (r"\toprule", r"\midrule", r"\bottomrule")] == [1, 1, 1]
    assert joined.index(r"\toprule") < joined.index(r"\midrule") < joined.index(r"\bottomrule")
    assert _balanced(joined)
    assert r"tiny\_net\&co" in joined and r"smmf\_8bit:beta1=0.9" in joined and r"adam\_100\%" in joined
    assert "Memory (MiB)" in joined and "Values in MiB (1 MiB = 1,048,576 bytes)" in joined
    columns = len(re.search(r"\\begin\{tabular\}\{([lr]+)\}", joined).group(1))
    rows = [line for line in body if line.strip().endswith(r"\\") and "multicolumn" not in line]
    assert rows and all(line.count("&") - line.count(r"\&") == columns - 1 for line in rows), rows
    failed = next(line for line in body if "adam" in line and "OOM" in line)
    assert rf"\multicolumn{{{columns - 1}}}{{l}}{{OOM in backward (step 2)}}" in failed
    comments = [line for line in text.splitlines() if line.startswith("%")]
    assert any("driver: 580.65" in c for c in comments) and any("memprof compare" in c for c in comments)


def test_latex_escape_covers_every_special_character():
    assert latex.escape(r"a_b%c&d$e#f{g}h~i^j\k") == (r"a\_b\%c\&d\$e\#f\{g\}h\textasciitilde{}i"
                                                      r"\textasciicircum{}j\textbackslash{}k")


def test_latex_decimal_units_are_labelled(records):
    text = latex.to_latex(records[:1], unit="MB")
    assert "Memory (MB)" in text and "16.78" in text  # 16 MiB = 16.78 MB


def test_latex_compiles_when_pdflatex_is_available(records, tmp_path):
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed")
    body = latex.to_latex(records, unit="MiB", detail=True)
    (tmp_path / "t.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n"
                                    "\\usepackage[landscape,margin=1cm]{geometry}\n\\begin{document}\n"
                                    + body + "\\end{document}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (tmp_path / "t.pdf").stat().st_size > 0


# -- figures ----------------------------------------------------------------------------------
MAGIC = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}


def test_plot_path_writes_every_figure_beside_it(records, tmp_path):
    written = plot.save_figures(records, tmp_path / "mem.png", unit="MiB")
    assert [p.name for p in written] == ["mem.png", "mem-timeline.png", "mem-parameters.png"]
    assert all(path.read_bytes().startswith(MAGIC["png"]) for path in written)


@pytest.mark.parametrize("fmt", ["pdf", "svg"])
def test_figures_render_as_pdf_and_svg(records, fmt):
    assert plot.render(plot.plot_parameters(records), fmt).startswith(MAGIC[fmt])


def test_breakdown_bars_use_one_colour_per_component(records):
    from matplotlib.colors import to_hex

    fig = plot.plot_breakdown(records, unit="MiB")
    persistent, at_peak = fig.axes[:2]
    colours = {to_hex(p.get_facecolor()) for p in persistent.patches}
    assert plot.COMPONENT_STYLES["moment"][0].lower() in colours
    assert plot.COMPONENT_STYLES["sign"][0].lower() in colours
    assert plot.CATEGORY_COLORS["weights"].lower() in colours
    # Two ok records: the persistent panel stacks weights, gradients, state parts, inputs for each.
    heights = sorted(round(p.get_height() + p.get_y(), 3) for p in persistent.patches)
    assert heights[-1] == round((8 + 8 + 16 + 0.25) + 8 / MIB, 3)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"state: moment", "state: factor", "state: sign", "weights", "step transient"} <= set(legend)
    assert any("OOM" in t.get_text() for t in persistent.texts)
    assert persistent.get_ylabel() == "Memory (MiB)"
    assert [t.get_text() for t in at_peak.get_xticklabels()] == ["adam", "smmf_8bit:beta1=0.9", "adam_100%"]


def test_timeline_marks_phases_and_annotates_the_peak(records):
    fig = plot.plot_timeline(records, unit="MiB")
    assert len(fig.axes) == 2  # the failed run has no timeline
    ax = fig.axes[0]
    *phases, peak = [t.get_text() for t in ax.texts]
    assert phases == ["fwd 1", "bwd 1", "step 1", "fwd 2", "bwd 2", "step 2"]
    assert len(ax.lines) >= 1 + 6  # the outline and one line per phase boundary
    assert peak.startswith("peak 34.3 MiB\n(step, step 1)") and "state: moment: 16.0" in peak
    assert ax.get_xlabel() == "time (ms)" and ax.get_ylabel() == "Allocated (MiB)"


def test_parameter_view_lists_the_largest_parameters_first(records):
    fig = plot.plot_parameters(records, unit="KiB", top=5)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[-1] == "transformer.h.0.mlp.c_fc.weight (512×2048)"  # the top row
    assert fig.axes[0].get_xlabel().startswith("Optimizer state (KiB)")


def test_a_bad_figure_extension_is_a_usage_error(records, tmp_path):
    from memprof.errors import UsageError

    with pytest.raises(UsageError, match="use .png, .pdf or .svg"):
        plot.save_figures(records, tmp_path / "mem.jpg")


# -- the command line -------------------------------------------------------------------------


def test_report_rerenders_saved_runs(records, tmp_path):
    run = tmp_path / "run.json"
    run.write_text(to_json(records))
    out = tmp_path / "table.tex"
    result = invoke(*["report", str(run), "--format", "latex", "--unit", "GiB", "-o", str(out),
                                 "--plot", str(tmp_path / "fig.svg")])
    assert result.exit_code == 0, result.output
    assert out.read_text() == latex.to_latex(runfile.read(run), unit="GiB")
    assert (tmp_path / "fig.svg").exists() and (tmp_path / "fig-timeline.svg").exists()
    result = invoke(*["report", str(run), "-f", "markdown"])
    assert result.exit_code == 0 and result.stdout == markdown.to_markdown(runfile.read(run))


@pytest.mark.parametrize("content, message", [(None, "cannot read"), ("model,spec\n", "not a memprof run file")])
def test_report_rejects_what_is_not_a_run_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    result = invoke(*["report", str(path)])
    assert result.exit_code == 2 and message in result.stderr


def test_compare_writes_every_export(records, tmp_path, monkeypatch):
    import memprof.cli_support

    monkeypatch.setattr(memprof.cli_support, "measure", lambda *args, **kwargs: records)
    paths = {name: tmp_path / f"r.{ext}" for name, ext in (("csv", "csv"), ("json", "json"), ("markdown", "md"),
                                                          ("latex", "tex"), ("plot", "svg"))}
    args = [item for name, path in paths.items() for item in (f"--{name}", str(path))]
    result = invoke(*["compare", "--model", "gpt2", "--opt", "adam", *args])
    assert result.exit_code == 3, result.output  # one record is an OOM: every output is written, then exit 3
    assert "1 of 3 measurement(s) failed: adam_100%: OOM in backward (step 2)" in result.stderr
    assert paths["latex"].read_text() == latex.to_latex(records)
    assert paths["markdown"].read_text() == markdown.to_markdown(records)
    assert (tmp_path / "r-parameters.svg").exists()


def test_a_bad_plot_extension_fails_before_measuring(tmp_path, monkeypatch):
    import memprof.cli_support

    monkeypatch.setattr(memprof.cli_support, "measure", lambda *args, **kwargs: pytest.fail("measured anyway"))
    result = invoke(*["compare", "--model", "gpt2", "--opt", "adam", "--plot", str(tmp_path / "m.jpg")])
    assert result.exit_code == 2 and "use .png, .pdf or .svg" in result.stderr


def test_a_plot_path_that_cannot_be_written_fails_before_measuring(tmp_path, monkeypatch):
    import memprof.cli_support

    monkeypatch.setattr(memprof.cli_support, "measure", lambda *args, **kwargs: pytest.fail("measured anyway"))
    (tmp_path / "file").write_text("")
    figure = tmp_path / "file" / "m.png"
    result = invoke(*["compare", "--model", "gpt2", "--opt", "adam", "--plot", str(figure)])
    assert result.exit_code == 2 and f"--plot {figure}: {tmp_path / 'file'} is not a folder" in result.stderr


def test_a_fit_that_needs_more_than_the_budget_until_the_cache_is_freed_is_marked():
    from rich.console import Console

    from memprof.fit import Fit
    from memprof.report.table import fit_table

    gib = 2**30
    freeing = Fit("adam", "batch_size", budget=10 * gib, value=6, record=None, probes=[(6, 11 * gib), (7, 12 * gib)])
    within = Fit("smmf", "batch_size", budget=10 * gib, value=6, record=None, probes=[(6, 9 * gib), (7, 12 * gib)])
    console = Console(width=200, record=True)
    console.print(fit_table([freeing, within]))
    text = console.export_text()
    assert "-1.00*" in text and " 1.00 " in text and "1.00*" not in text.replace("-1.00*", "")
    assert "* needs more than the budget" in text
    console = Console(width=200, record=True)
    console.print(fit_table([within]))
    assert "*" not in console.export_text()
