"""``--trace``: the timeline as Trace Event Format JSON (ui.perfetto.dev, chrome://tracing)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from cli_for_tests import invoke
from test_report_views import make_record

from memprof.record import Timeline
from memprof.report.formats import FORMATS, View
from memprof.report.trace import to_trace

PHASES = ("ph", "name", "pid", "tid")


def check_trace_events(text: str) -> dict:
    """The parsed trace after checking every event against the Trace Event Format's rules for its phase."""
    trace = json.loads(text)
    assert isinstance(trace["traceEvents"], list) and trace["displayTimeUnit"] in ("ms", "ns")
    for event in trace["traceEvents"]:
        assert all(key in event for key in PHASES), event
        assert event["ph"] in ("M", "C", "X", "i"), event
        assert isinstance(event["pid"], int) and isinstance(event["tid"], int)
        if event["ph"] != "M":
            assert isinstance(event["ts"], (int, float)) and event["ts"] >= 0, event
        if event["ph"] == "X":
            assert event["dur"] >= 0, event
        if event["ph"] == "C":
            assert event["args"] and all(isinstance(v, int) and v >= 0 for v in event["args"].values()), event
        if event["ph"] == "i":
            assert event["s"] in ("g", "p", "t")
    return trace


def processes(trace: dict) -> dict[int, str]:
    return {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"}


def test_each_record_is_a_process_with_counters_slices_and_its_peak():
    records = [make_record("adam", {"moment": 2 << 20}), make_record("sgd", {"moment": 1 << 20})]
    trace = check_trace_events(to_trace(records))
    assert processes(trace) == {1: "adam", 2: "sgd"}
    events = [e for e in trace["traceEvents"] if e["pid"] == 1]
    counters = [e for e in events if e["name"] == "live bytes by category"]
    assert len(counters) == len(records[0].timeline.time)
    assert set(counters[0]["args"]) == set(records[0].timeline.categories)
    totals = [e["args"]["bytes"] for e in events if e["name"] == "allocated"]
    assert totals == records[0].timeline.total
    slices = [(e["name"], e["ts"], e["ts"] + e["dur"]) for e in events if e["ph"] == "X"]
    assert [name for name, *_ in slices if name.startswith("step ")] == ["step 1", "step 2"]
    assert [name for name, *_ in slices if not name.startswith("step ")][1:] == ["forward", "backward", "step"] * 2
    phases = sorted((start, end) for name, start, end in slices if not name.startswith("step "))
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(phases, phases[1:]))  # one phase at a time
    (peak,) = [e for e in events if e["name"] == "global peak"]
    assert peak["args"]["bytes"] == records[0].peaks.allocated and peak["args"]["phase"] == "step"


def test_a_record_without_a_timeline_says_why():
    extrapolated = make_record("adam", {"moment": 1 << 20})
    extrapolated.timeline = Timeline()
    extrapolated.notes.append("extrapolated to 32 blocks from probes of 1, 2, 3 blocks; no timeline: --full-depth")
    failed = make_record("adam_100%", {}, status="oom")
    trace = check_trace_events(to_trace([extrapolated, failed]))
    assert processes(trace) == {1: "adam (no timeline)", 2: "adam_100% (no timeline)"}
    why = {e["pid"]: e["args"]["why"] for e in trace["traceEvents"] if e["name"] == "no timeline"}
    assert "extrapolated" in why[1] and why[2] == "OOM in backward (step 2)"


def test_ranks_are_processes_of_their_own():
    records = []
    for rank in (0, 1):
        record = make_record("adam", {"moment": 1 << 20})
        record.settings = dataclasses.replace(record.settings, nproc=2, parallel="ddp", rank=rank)
        records.append(record)
    assert processes(check_trace_events(to_trace(records))) == {1: "adam · rank 0 of 2", 2: "adam · rank 1 of 2"}


def test_trace_is_a_format_row():
    assert FORMATS["trace"].render([make_record("adam", {"moment": 8})], View()) == to_trace(
        [make_record("adam", {"moment": 8})])


def test_compare_writes_a_trace_of_the_measured_steps(tmp_path, gpt2_spec):
    path = tmp_path / "run.trace.json"
    result = invoke("compare", "--model", gpt2_spec, "--opt", "adam,sgd", "--device", "cpu", "--steps", "2",
                    "--seq-len", "16", "--trace", path)
    assert result.exit_code == 0, result.output
    trace = check_trace_events(path.read_text())
    assert processes(trace) == {1: "adam", 2: "sgd"}
    steps = [e["name"] for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == 1 and e["tid"] == 1]
    assert steps == ["step 1", "step 2"]


@pytest.mark.parametrize("option", ["--trace", "--html"])
def test_an_output_in_an_unwritable_folder_fails_before_measuring(option, tmp_path, monkeypatch):
    import memprof.cli_support

    monkeypatch.setattr(memprof.cli_support, "measure", lambda *args, **kwargs: pytest.fail("measured anyway"))
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "out.x"
    result = invoke("compare", "--model", "gpt2", "--opt", "adam", "--device", "cpu", option, path)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {option} {path}: {tmp_path / 'file'} is not a folder"
