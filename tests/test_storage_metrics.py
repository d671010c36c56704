"""Metrics records, the ledger of completed stages, and the run report."""

import json

import numpy as np
import pytest
from storage_fixtures import make_rows, small_config

from nbody_dt.storage import Run, completed, is_done, mark_done, read_metrics, save_checkpoint, write_metrics
from nbody_dt.storage.report import report_dict, report_table, write_plots


@pytest.fixture
def run(tmp_path):
    with Run.create(tmp_path / "run", small_config()) as r:
        yield r


def test_metrics_records_round_trip_in_stage_order(run):
    write_metrics(run, 1, "replay", {"replay_iterations": 7, "replay_final_pass_rate": 1.0})
    write_metrics(run, 1, "collect", {"collect_pass_rate": 0.5, "seconds": np.float64(1.5), "note": "ok"})
    write_metrics(run, 0, "epoch", {"seconds": 3})
    write_metrics(run, 1, "replay", {"replay_iterations": 8, "replay_final_pass_rate": 1.0})  # replaced
    assert read_metrics(run) == [
        {"epoch": 0, "stage": "epoch", "seconds": 3},
        {"epoch": 1, "stage": "collect", "collect_pass_rate": 0.5, "seconds": 1.5, "note": "ok"},
        {"epoch": 1, "stage": "replay", "replay_iterations": 8, "replay_final_pass_rate": 1.0},
    ]


@pytest.mark.parametrize("record, error", [({"x": [1]}, TypeError), ({"epoch": 1}, ValueError), ({1: 2}, ValueError)])
def test_metrics_records_are_flat(run, record, error):
    with pytest.raises(error):
        write_metrics(run, 0, "collect", record)
    assert read_metrics(run) == []


def test_ledger_survives_reopen(run):
    for epoch, stage in [(0, "collect"), (0, "persist"), (0, "replay"), (0, "epoch"), (1, "collect")]:
        mark_done(run, epoch, stage)
    mark_done(run, 1, "collect")
    run.close()
    with Run.open(run.url) as again:
        assert completed(again) == [(0, "collect"), (0, "persist"), (0, "replay"), (0, "epoch"), (1, "collect")]
        assert is_done(again, 1, "collect") and not is_done(again, 1, "persist")


def filled(run):
    for epoch in range(3):
        run.trajectory.append(make_rows(epoch, [0, 1, 2, 3], 5, first_step=5 * epoch, warmup_steps=1), epoch)
        write_metrics(run, epoch, "collect", {"collect_pass_rate": 0.5 + 0.1 * epoch, "seconds": 2.0})
        write_metrics(run, epoch, "replay", {"replay_iterations": 10 - epoch, "replay_final_pass_rate": 1.0,
                                             "seconds": 4.0, "status": "converged"})
        merged = {"collect_pass_rate": 0.5 + 0.1 * epoch, "replay_iterations": 10 - epoch, "seconds": 6.0}
        write_metrics(run, epoch, "epoch", merged)  # like the flow: copies of the stages' figures
        write_metrics(run, epoch, "persist", {"persist_rows": 20})
        for stage in ("collect", "persist", "replay", "epoch"):
            if stage in ("collect", "replay"):
                save_checkpoint(run, epoch, stage, {"x": epoch})  # a consistent run: report checks it
            mark_done(run, epoch, stage)
    return run.url


def test_report_dict_is_json_ready(run):
    rep = report_dict(filled(run))
    json.dumps(rep)
    assert [row["epoch"] for row in rep["epochs"]] == [0, 1, 2]
    first = rep["epochs"][0]
    assert first["rows"] == 20 and first["collect_pass_rate"] == 0.5 and first["replay_iterations"] == 10
    assert first["collect.seconds"] == 2.0 and first["replay.seconds"] == 4.0 and first["epoch.seconds"] == 6.0
    assert first["status"] == "converged" and "seconds" not in first and "epoch.replay_iterations" not in first
    assert rep["totals"]["rows"] == 60 and rep["totals"]["sum"]["replay_iterations"] == 27
    assert rep["totals"]["mean"]["collect_pass_rate"] == pytest.approx(0.6)
    assert rep["config"]["storage"]["chunk_rows"] == 5


def test_report_table_lists_epochs_and_totals(run):
    lines = report_table(filled(run)).splitlines()
    assert "3 epochs, 60 trajectory rows" in lines[0]
    header = lines[1].split()
    assert header[:2] == ["epoch", "rows"] and "replay_iterations" in header and "status" not in header
    assert [line.split()[0] for line in lines[3:6]] == ["0", "1", "2"]
    assert lines[7].split()[0] == "sum" and lines[8].split()[0] == "mean"
    assert lines[7].split()[header.index("replay_iterations")] == "27"
    narrow = report_table(run.url, keys=["replay_iterations", "missing"]).splitlines()
    assert narrow[1].split() == ["epoch", "replay_iterations", "missing"] and narrow[3].split() == ["0", "10", "-"]


def test_write_plots(run, tmp_path):
    paths = write_plots(filled(run), tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["dt_over_time.png", "energy_error.png", "pass_rate.png",
                                            "replay_iterations.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_an_empty_run(run, tmp_path):
    assert report_dict(run.url)["epochs"] == []
    assert "0 epochs" in report_table(run.url)
    assert write_plots(run.url, tmp_path / "plots") == []
