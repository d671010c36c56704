"""A run on s3:// against a real S3-protocol server (moto on loopback, s3fs client)."""

import uuid

import fsspec.config
import pytest
import torch
from storage_fixtures import make_rows, s3_options, small_config  # noqa: F401  (s3_options is a fixture)

from nbody_dt.model.trajectory import InMemoryTrajectory
from nbody_dt.report import report_dict
from nbody_dt.storage import (
    Run,
    RunError,
    completed,
    load_latest_checkpoint,
    mark_done,
    read_metrics,
    save_checkpoint,
    write_metrics,
)

pytestmark = pytest.mark.slow


def test_s3_round_trip(s3_options):  # noqa: F811
    url = f"s3://runs/{uuid.uuid4().hex}/run"
    blocks = [make_rows(0, [0, 1, 2], 3, warmup_steps=1), make_rows(1, [0, 1, 2], 2, first_step=3)]
    with Run.create(url, small_config(), storage_options=s3_options) as run:
        for e, b in enumerate(blocks):
            assert run.trajectory.append(b, e) == sum(map(len, blocks[:e + 1]))
        save_checkpoint(run, 0, "epoch", {"w": torch.arange(4.0), "note": "first"})
        save_checkpoint(run, 1, "collect", {"w": torch.arange(5.0)})
        write_metrics(run, 1, "replay", {"replay_iterations": 3, "replay_final_pass_rate": 1.0})
        mark_done(run, 1, "collect")
        with pytest.raises(RunError, match="locked"):
            Run.open(url, storage_options=s3_options)

    with Run.open(url, small_config("epochs=30"), storage_options=s3_options) as run:
        assert run.config.epochs == 30
        assert run.trajectory.num_rows == 15
        for e, b in enumerate(blocks):
            assert all(torch.equal(getattr(b, k), v) for k, v in run.trajectory.epoch_rows(e).as_dict().items())
        window = run.trajectory.window("epoch", epoch=1, history_len=3)
        expected = InMemoryTrajectory.from_blocks(blocks, 3, 3, window_start=9)
        got, want = window.gather(torch.arange(len(window))), expected.gather(torch.arange(len(expected)))
        assert torch.equal(got.history.position, want.history.position) and torch.equal(got.rows, want.rows)
        assert run.trajectory.append(blocks[1], 1) == 15  # idempotent persist

        key = f"{url}/checkpoints/e0000001-0-collect.pt"
        run._fs.pipe_file(key.removeprefix("s3://"), b"garbage")
        with pytest.raises(RunError, match="damaged checkpoint .*e0000001-0-collect.pt: sha256"):
            load_latest_checkpoint(run)
        assert read_metrics(run) == [{"epoch": 1, "stage": "replay", "replay_iterations": 3,
                                      "replay_final_pass_rate": 1.0}]
        assert completed(run) == [(1, "collect")]
    # This hand-made run marks (1, collect) done without epoch 0: a report refuses the gap.
    with Run.open(url, write=False, storage_options=s3_options) as run:
        with pytest.raises(RunError, match="ledger/e0000000-0-collect is missing"):
            report_dict(run)


def test_s3_bad_urls(s3_options):  # noqa: F811
    with pytest.raises(RunError, match="no run at"):
        Run.open("s3://runs/nothing-here", storage_options=s3_options)
    with pytest.raises(RunError, match="no run at"):
        Run.open("s3://no-such-bucket/run", storage_options=s3_options)
    with pytest.raises(RunError, match="cannot create a run"):
        Run.create("s3://no-such-bucket/run", small_config(), storage_options=s3_options)
    url = f"s3://runs/{uuid.uuid4().hex}"
    Run.create(url, small_config(), storage_options=s3_options).close()
    with pytest.raises(RunError, match="already exists.*resume"):
        Run.create(url, small_config(), storage_options=s3_options)


def test_s3_endpoint_from_environment(s3_options, monkeypatch):  # noqa: F811
    """The CLI passes no storage_options: fsspec reads FSSPEC_S3_* variables at import into its config
    (replayed here with fsspec's own parser, so no second interpreter is needed)."""
    url = f"s3://runs/{uuid.uuid4().hex}"
    with Run.create(url, small_config(), storage_options=s3_options) as run:
        run.trajectory.append(make_rows(0, [0, 1], 3), 0)
    conf: dict = {}
    fsspec.config.set_conf_env(conf, {"FSSPEC_S3_ENDPOINT_URL": s3_options["endpoint_url"], "FSSPEC_S3_KEY": "test",
                                      "FSSPEC_S3_SECRET": "test"})
    monkeypatch.setattr(fsspec.config, "conf", conf)
    with Run.open(url, write=False) as run:
        assert (report_dict(run)["totals"]["epochs"], run.trajectory.num_rows) == (1, 6)
