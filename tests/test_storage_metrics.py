"""Metrics records, their per-epoch rows, and the ledger of completed stages."""

import numpy as np
import pytest
from storage_fixtures import small_config

from nbody_dt.storage import Run, completed, epoch_rows, is_done, mark_done, read_metrics, write_metrics


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


def test_epoch_rows_merge_stages_and_keep_conflicting_values_apart(run):
    write_metrics(run, 0, "collect", {"collect_pass_rate": 0.5, "seconds": 2.0, "same": 1})
    write_metrics(run, 0, "replay", {"replay_iterations": 3, "seconds": 4.0, "same": 1})
    write_metrics(run, 1, "collect", {"collect_pass_rate": 0.7, "seconds": 2.0})
    assert epoch_rows(read_metrics(run)) == {
        0: {"epoch": 0, "collect_pass_rate": 0.5, "collect.seconds": 2.0, "same": 1, "replay_iterations": 3,
            "replay.seconds": 4.0},
        1: {"epoch": 1, "collect_pass_rate": 0.7, "collect.seconds": 2.0},  # the same columns in every row
    }
