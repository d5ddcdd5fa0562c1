"""``memprof estimate --world-size N --parallel … --all-ranks``: every rank simulated, one record each, shown as one
request (the per-rank table, the HTML report's ranks view, one trace process per rank)."""

from __future__ import annotations

import json

import pytest

from cli_for_tests import invoke
from memprof import runfile
from memprof.api import estimate, measure
from memprof.settings import group_by_request, reproduce_command, request_fields

SIMULATED = dict(device="cpu", steps=1, batch_size=2, seq_len=16, nproc=2, parallel="fsdp2")


def _without_request(record) -> dict:
    """A record's data less what tells how it was asked for (the command, ``--all-ranks``)."""
    data = record.to_dict()
    data["environment"].pop("command")
    data["settings"].pop("all_ranks")
    return data


@pytest.fixture(scope="module")
def every_rank(gpt2_spec):
    return estimate(gpt2_spec, ["adam", "sgd"], all_ranks=True, **SIMULATED)


def test_each_ranks_record_is_what_that_rank_alone_gives(every_rank, gpt2_spec):
    assert [(r.settings.spec, r.settings.rank) for r in every_rank] == [("adam", 0), ("adam", 1), ("sgd", 0),
                                                                          ("sgd", 1)]
    for record in every_rank:
        assert record.status == "ok", record.failure
        assert record.settings.all_ranks
        (alone,) = estimate(gpt2_spec, [record.settings.spec], rank=record.settings.rank, **SIMULATED)
        assert _without_request(record) == _without_request(alone)


def test_every_rank_is_one_request_measured_again_with_all_ranks(every_rank):
    ((settings, specs),) = group_by_request(r.settings for r in every_rank)
    assert specs == ["adam", "sgd"]
    fields = request_fields(settings)
    assert fields["all_ranks"] and "rank" not in fields
    command = reproduce_command(settings, specs)
    assert "--all-ranks" in command and "--rank" not in command


def test_the_command_line_shows_every_rank_in_the_table_the_report_and_the_trace(mlp_spec, tmp_path):
    # ZeroRedundancyOptimizer gives the MLP's two ranks different state: the imbalance is not zero.
    paths = {kind: tmp_path / f"ranks.{suffix}" for kind, suffix in (("html", "html"), ("trace", "trace.json"),
                                                                      ("json", "json"))}
    result = invoke("estimate", "--model", mlp_spec, "--opt", "adam", "--world-size", "2", "--parallel", "zero1",
                    "--all-ranks", "--target", "cpu", "--steps", "1", "--unit", "B",
                    *(arg for kind, path in paths.items() for arg in (f"--{kind}", path)))
    assert result.exit_code == 0, result.output
    assert "zero1 × 2 ranks (simulated)" in result.stdout and "min–max" in result.stdout
    assert "adam · rank 0 of 2: ok" in result.stderr and "adam · rank 1 of 2: ok" in result.stderr
    records = runfile.read(paths["json"])
    assert [r.settings.rank for r in records] == [0, 1]
    assert records[0].total("optimizer_state") != records[1].total("optimizer_state")
    page = paths["html"].read_text()
    ranks = page[page.index('<section id="ranks">'):]
    ranks = ranks[:ranks.index("</section>")]
    assert '<td>adam</td><td>2 of 2</td>' in ranks and "needs two or more" not in ranks
    assert '"plot-ranks"' in page
    events = json.loads(paths["trace"].read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert sorted(names.values()) == ["adam · rank 0 of 2", "adam · rank 1 of 2"]
    for pid in names:  # each rank a process of its own with its counter tracks
        counters = [e for e in events if e["pid"] == pid and e["ph"] == "C"]
        assert counters and {"live bytes by category", "allocated"} <= {e["name"] for e in counters}


@pytest.mark.parametrize("args, message", [
    (["--world-size", "2", "--parallel", "fsdp2", "--rank", "1"], "--all-ranks simulates every rank of --world-size 2: "
                                                                 "drop --rank 1"),
    (["--parallel", "fsdp2"], "--all-ranks needs ranks to simulate: give --world-size N"),
    ([], "--all-ranks needs ranks to simulate"),
    (["--world-size", "2", "--parallel", "fsdp2", "--fit", "batch-size", "--memory", "1GiB"],
     "--fit searches one rank's figures: drop --all-ranks"),
    (["--world-size", "2", "--parallel", "fsdp2", "--snapshot", "{tmp}/s.pickle"],
     "--snapshot records one rank's allocations"),
])
def test_all_ranks_is_refused_where_it_cannot_take_effect(mlp_spec, tmp_path, args, message):
    result = invoke("estimate", "--model", mlp_spec, "--opt", "adam", "--all-ranks", "--target", "cpu",
                    *(a.format(tmp=tmp_path) for a in args))
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]  # --fit's spinner leaves a blank line
    assert message in line, result.stderr
    assert not list(tmp_path.iterdir())


def test_a_real_distributed_run_takes_no_all_ranks(mlp_spec):
    from memprof.errors import UsageError

    with pytest.raises(UsageError, match="--all-ranks simulates the ranks of an estimate"):
        measure(mlp_spec, ["adam"], device="cpu", nproc=2, parallel="ddp", all_ranks=True)
