"""``--html``: one self-contained interactive report, checked as text and opened in headless Chromium.

The browser tests open each kind of page (a comparison, an estimate of ranks, a fit) offline, with every host
name unresolvable, and require no console message, every figure drawn by plotly and a screenshot written.
They are skipped where Chromium is not installed (.ci/run installs Debian's ``chromium``). Screenshots go to
``$MEMPROF_SCREENSHOTS`` when it is set (reports/screenshots/ for the note), else to the test's folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from cli_for_tests import invoke
from test_report_views import make_record

from memprof.fit import Fit
from memprof.record import Timeline
from memprof.report.formats import FORMATS, View
from memprof.report.html import to_html

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=8000", "--hide-scrollbars",
                  "--enable-logging=stderr", "--v=0")


def figures_of(page: str) -> dict:
    return json.loads(re.search(r'id="memprof-figures">(.*?)</script>', page, re.S)[1].replace("<\\/", "</"))


def chromium(page: Path, *args: str) -> tuple[str, list[str]]:
    """Open ``page`` in headless Chromium: (stdout, the console's messages)."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                              capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def check_in_browser(page: Path, name: str, tmp_path: Path) -> str:
    """The page's DOM once loaded, after checking it logs nothing, draws every figure and screenshots."""
    dom, console = chromium(page, "--dump-dom")
    assert console == [], console
    figures = figures_of(page.read_text())
    for key in figures:
        assert re.search(rf'<div class="plot js-plotly-plot" id="{key}"', dom), f"{key} not drawn"
    assert dom.count('class="main-svg"') >= 2 * len(figures)
    assert 'id="load-error"></div>' in dom  # the error banner stayed empty
    folder = Path(os.environ.get("MEMPROF_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    screenshot = folder / f"{name}.png"
    _, console = chromium(page, f"--screenshot={screenshot}", "--window-size=1400,2400")
    assert console == [], console
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
    return dom


# -- the page as text -----------------------------------------------------------------------------------------
def test_the_page_is_self_contained():
    page = to_html([make_record("adam", {"moment": 1 << 20})])
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page loads something from the network"
    assert "DecompressionStream" in page and 'id="plotly-gzip"' in page
    assert page.count("<script") == 3  # the figures, plotly.js (gzipped) and the page's own script


def test_every_view_of_a_comparison_is_on_the_page():
    records = [make_record("adam", {"moment": 16 << 20, "other": 8}),
               make_record("smmf", {"factor": 1 << 19, "sign": 1 << 18}), make_record("adam_100%", {}, status="oom")]
    records[0].parameters[0] = dataclasses.replace(records[0].parameters[0], by_key={"exp_avg": 6 << 20},
                                                   roles={"exp_avg": "moment"})
    page = to_html(records)
    figures = figures_of(page)
    assert set(figures) == {"plot-breakdown", "plot-peak", "plot-timeline-0", "plot-timeline-1"}
    bars = figures["plot-breakdown"]["data"]
    assert {t["name"] for t in bars} >= {"weights", "gradients", "state: moment", "state: factor", "state: sign"}
    moment = next(t for t in bars if t["name"] == "state: moment" and t["xaxis"] == "x1")
    assert moment["customdata"] == [16 << 20] and "B)" in moment["hovertemplate"]  # hover gives exact bytes
    timeline = figures["plot-timeline-0"]
    assert {t["name"] for t in timeline["data"]} >= {"weights", "gradients", "optimizer state", "total"}
    assert len(timeline["layout"]["shapes"]) == 6  # forward, backward, step of two steps
    assert "exp_avg · moment · 6.00 MiB" in page  # each state tensor with its role
    assert "OOM in backward (step 2)" in page
    assert 'class="kind-measured">measured' in page and "memprof compare --model" in page


def test_an_estimate_says_what_is_estimated_and_what_assumed():
    record = make_record("adam", {"moment": 1 << 20})
    record.settings = dataclasses.replace(record.settings, estimate=True)
    record.breakdown.append(dataclasses.replace(record.breakdown[0], category="context", component="driver",
                                                basis="gpu table"))
    record.timeline = Timeline()
    record.notes.append("extrapolated to 32 blocks from probes of 1, 2, 3 blocks; no timeline: --full-depth")
    page = to_html([record])
    assert 'class="kind-estimated">estimated' in page and 'class="kind-assumed">assumed' in page
    assert "No timeline for" in page and "extrapolated to 32 blocks" in page


def test_every_rank_and_the_imbalance():
    records = []
    for rank, state in ((0, 4 << 20), (1, 2 << 20)):
        record = make_record("adam", {"moment": state})
        record.settings = dataclasses.replace(record.settings, nproc=2, parallel="fsdp2", rank=rank)
        records.append(record)
    page = to_html(records)
    assert "plot-ranks" in figures_of(page)
    assert "+33.3%" in page  # state: max/mean − 1 = 4 / 3 − 1


def test_a_fit_draws_the_curve_and_the_budget():
    fits = [Fit(spec="adam", setting="batch_size", budget=40 << 20, value=4, record=make_record("adam", {}),
                probes=[(2, 30 << 20), (4, 38 << 20), (8, 50 << 20), (6, 44 << 20), (5, 41 << 20)])]
    page = FORMATS["html"].render([fits[0].record], View(fits=tuple(fits)))
    curve = figures_of(page)["plot-fit"]
    assert curve["data"][0]["x"] == [2, 4, 5, 6, 8]
    assert curve["layout"]["shapes"][0]["y0"] == 40.0  # the budget line, in MiB
    assert curve["data"][1]["x"] == [4]  # the largest value that fits, ringed


def test_six_optimizers_with_full_timelines_stay_under_5_mb():
    records = []
    for i in range(6):
        record = make_record(f"opt{i}", {"moment": 1 << 20})
        points = 4000  # what the runner keeps
        record.timeline = Timeline(time=list(range(points)), total=[i * 1000 + 7 for i in range(points)],
                                   categories={c: [i * 997 % 10**9 for i in range(points)] for c in
                                               ("weights", "gradients", "optimizer_state", "activations",
                                                "temporaries", "step_transient", "inputs", "buffers")},
                                   marks=record.timeline.marks)
        record.parameters = record.parameters * 80  # about GPT-2's 148 parameters
        records.append(record)
    assert len(to_html(records).encode()) < 5_000_000


def test_without_plotly_html_is_a_usage_error_before_measuring(tmp_path, monkeypatch):
    import importlib.util

    import memprof.cli_support

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "plotly" else find_spec(name, *a))
    monkeypatch.setattr(memprof.cli_support, "measure", lambda *args, **kwargs: pytest.fail("measured anyway"))
    result = invoke("compare", "--model", "gpt2", "--opt", "adam", "--device", "cpu", "--html", tmp_path / "r.html")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --html needs plotly: pip install 'memprof-optim[html]'"


# -- in a browser ---------------------------------------------------------------------------------------------
@needs_chromium
def test_a_comparison_opens_offline_in_chromium(tmp_path, gpt2_spec):
    page = tmp_path / "compare.html"
    result = invoke("compare", "--model", gpt2_spec, "--opt", "adam,smmf", "--device", "cpu", "--steps", "1",
                    "--seq-len", "16", "--html", page)
    assert result.exit_code == 0, result.output
    dom = check_in_browser(page, "compare", tmp_path)
    assert "transformer.h.0.mlp.c_fc.weight" in dom and "exp_avg · moment" in dom
    assert re.search(r'id="parameter-count"[^>]*>\d+ of \d+ rows', dom)  # the table's script ran


@needs_chromium
def test_an_estimate_of_ranks_opens_offline_in_chromium(tmp_path, gpt2_spec):
    page = tmp_path / "ranks.html"
    result = invoke("estimate", "--model", gpt2_spec, "--opt", "adam", "--world-size", "2", "--parallel", "fsdp2",
                    "--all-ranks", "--seq-len", "16", "--html", page)
    assert result.exit_code == 0, result.output
    dom = check_in_browser(page, "ranks", tmp_path)
    assert "peak imbalance" in dom and "adam · rank 1 of 2" in dom and ">estimated<" in dom


@needs_chromium
def test_a_fit_opens_offline_in_chromium(tmp_path, gpt2_spec):
    page = tmp_path / "fit.html"
    result = invoke("estimate", "--model", gpt2_spec, "--opt", "adam", "--target", "cpu", "--seq-len", "16",
                    "--fit", "batch-size", "--memory", "3MiB", "--unit", "MiB", "--html", page)
    assert result.exit_code == 0, result.output
    dom = check_in_browser(page, "fit", tmp_path)
    assert "largest batch size" in dom and "budget 3.00 MiB" in dom
