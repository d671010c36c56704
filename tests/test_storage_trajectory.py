"""The Zarr trajectory: appends, crash safety, idempotent persist, and replay windows."""

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from storage_fixtures import make_rows, run_child, small_config

from nbody_dt.faults import PAUSE_ENV
from nbody_dt.model.trajectory import InMemoryTrajectory, Rows, link_previous
from nbody_dt.storage import Run, RunError

HISTORY = 4


def blocks_with_a_stalled_orbit() -> list[Rows]:
    """Four epochs of 2 steps (fewer than HISTORY, so histories cross several epochs); orbit 3 is
    absent from epochs 1 and 2, so its history reaches back to epoch 0; epoch 0 starts with warm-up."""
    return [
        make_rows(0, [0, 1, 2, 3], 3, warmup_steps=1),
        make_rows(1, [0, 1, 2], 2, first_step=3),
        make_rows(2, [0, 1, 2], 2, first_step=5),
        make_rows(3, [0, 1, 2, 3], 2, first_step=7),
    ]


def assert_rows_equal(a: Rows, b: Rows):
    for name, t in a.as_dict().items():
        u = getattr(b, name)
        assert t.dtype == u.dtype and torch.equal(t, u), name


def assert_minibatch_equal(a, b):
    for x, y in [(a.state.position, b.state.position), (a.state.velocity, b.state.velocity),
                 (a.state.mass, b.state.mass), (a.history.position, b.history.position),
                 (a.history.velocity, b.history.velocity), (a.history.valid, b.history.valid), (a.rows, b.rows)]:
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A run holding blocks_with_a_stalled_orbit(); tests must not change it."""
    blocks = blocks_with_a_stalled_orbit()
    run = Run.create(tmp_path_factory.mktemp("stored") / "run", small_config())
    for e, b in enumerate(blocks):
        run.trajectory.append(b, e)
    yield run, blocks
    run.close()


def test_append_and_read_back(stored):
    run, blocks = stored
    store = run.trajectory
    assert store.num_rows == sum(map(len, blocks))
    for e, b in enumerate(blocks):
        assert_rows_equal(store.epoch_rows(e), b)
    assert_rows_equal(store.rows(), Rows.cat(blocks))
    expected_prev, _ = link_previous(Rows.cat(blocks).orbit.numpy(), np.full(4, -1), 0)
    np.testing.assert_array_equal(store.columns(("prev",))["prev"], expected_prev)
    with Run.open(run.url, write=False) as reader:
        assert reader.trajectory.epochs() == store.epochs()
        assert_rows_equal(reader.trajectory.rows(), Rows.cat(blocks))


def test_compressed_chunks_without_sharding(stored):
    meta = json.loads((Path(stored[0].url) / "trajectory.zarr" / "position" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [5, 2, 2]
    names = [c["name"] for c in meta["codecs"]]
    assert "sharding_indexed" not in names and "blosc" in names
    blosc = next(c for c in meta["codecs"] if c["name"] == "blosc")
    assert blosc["configuration"]["cname"] == "zstd"


def test_append_is_idempotent_per_epoch(tmp_path):
    """A persist re-run after its commit (crash before the ledger) writes nothing."""
    blocks = blocks_with_a_stalled_orbit()[:2]
    with Run.create(tmp_path / "run", small_config()) as run:
        for e, b in enumerate(blocks):
            run.trajectory.append(b, e)
    with Run.open(tmp_path / "run") as run:
        n = run.trajectory.num_rows
        assert run.trajectory.append(blocks[1], 1) == n
        assert run.trajectory.append(blocks[0], 0) == n
        assert_rows_equal(run.trajectory.rows(), Rows.cat(blocks))


def test_append_validates_rows(tmp_path):
    with Run.create(tmp_path / "run", small_config("dtype='float32'")) as run:
        with pytest.raises(ValueError, match="float32"):
            run.trajectory.append(make_rows(0, [0], 2), 0)
        with pytest.raises(ValueError, match="appending epoch 1"):
            run.trajectory.append(make_rows(0, [0], 2, dtype=torch.float32), 1)
        assert run.trajectory.append(make_rows(0, [0], 2, dtype=torch.float32), 0) == 2
        with pytest.raises(ValueError, match="per-row shape"):
            run.trajectory.append(make_rows(1, [0], 2, bodies=3, dtype=torch.float32), 1)
        assert run.trajectory.append(make_rows(3, [0], 1, dtype=torch.float32), 3) == 3
        with pytest.raises(ValueError, match="increasing order"):
            run.trajectory.append(make_rows(2, [0], 1, dtype=torch.float32), 2)
        assert run.trajectory.num_rows == 3


def test_empty_epoch_is_committed(tmp_path):
    with Run.create(tmp_path / "run", small_config()) as run:
        assert len(run.trajectory.window("all", history_len=HISTORY)) == 0
        assert len(run.trajectory.rows()) == 0
        assert run.trajectory.append(make_rows(0, [0, 1], 0), 0) == 0
        assert run.trajectory.append(make_rows(1, [0, 1], 2), 1) == 4
        assert run.trajectory.epochs() == {0: (0, 0), 1: (0, 4)}
        assert len(run.trajectory.epoch_rows(0)) == 0
        assert len(run.trajectory.window("epoch", epoch=0)) == 0


@pytest.mark.parametrize("kind", ["all", "epoch", "last"])
@pytest.mark.parametrize("history_len", [0, 1, HISTORY])
def test_windows_equal_in_memory_trajectory(stored, kind, history_len):
    run, blocks = stored
    store = run.trajectory
    cases = {"all": [(len(blocks), 0, {})],
             "epoch": [(e + 1, store.epoch_range(e)[0], {"epoch": e}) for e in range(len(blocks))],
             "last": [(len(blocks), max(0, store.num_rows - k), {"last_rows": k}) for k in (1, 7, 10_000)]}[kind]
    for num_blocks, window_start, kwargs in cases:
        # rows after the window never change it, so an in-memory trajectory up to its end is the reference
        expected = InMemoryTrajectory.from_blocks(blocks[:num_blocks], 4, history_len, window_start)
        window = store.window(kind, history_len=history_len, **kwargs)
        assert len(window) == len(expected)
        everything = torch.arange(len(expected))
        shuffled = torch.randperm(len(expected), generator=torch.Generator().manual_seed(0))
        repeated = torch.zeros(3, dtype=torch.int64) if len(expected) else everything
        for positions in (everything, shuffled, repeated):
            assert_minibatch_equal(window.gather(positions), expected.gather(positions))


def test_history_crosses_epochs_and_skips_warmup(stored):
    run, blocks = stored
    window = run.trajectory.window("epoch", epoch=3, history_len=HISTORY)
    start = run.trajectory.epoch_range(3)[0]
    mb = window.gather(torch.arange(len(window)))
    stalled = (mb.rows - start == 3).nonzero().item()  # orbit 3's first row in epoch 3
    assert mb.history.valid[stalled].tolist() == [True, True, True, False]  # epoch 0's three rows
    assert torch.equal(mb.history.position[stalled, 0], blocks[0].position[11])
    assert window.gather(torch.tensor([0])).rows.item() == start
    assert len(run.trajectory.window("epoch", epoch=0)) == 12 - 4  # warm-up rows excluded


def test_window_rejects_bad_requests(stored):
    store = stored[0].trajectory
    for kwargs in ({"kind": "epoch"}, {"kind": "epoch", "epoch": 9}, {"kind": "last"}, {"kind": "recent"}):
        with pytest.raises(ValueError):
            store.window(**kwargs)


@pytest.mark.slow
def test_killed_between_resize_and_commit(tmp_path):
    """SIGKILL after the arrays grew and the new rows were written but before the commit."""
    url = str(tmp_path / "run")
    first = make_rows(0, [0, 1, 2, 3], 3, warmup_steps=1)
    with Run.create(url, small_config()) as run:
        run.trajectory.append(first, 0)
    marker = tmp_path / "paused"
    child = run_child(
        "from storage_fixtures import make_rows; from nbody_dt.storage import Run; "
        f"Run.open({url!r}).trajectory.append(make_rows(1, [0, 1, 2, 3], 4, first_step=3), 1)",
        **{PAUSE_ENV: f"before-commit:{marker}"})
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline, "child never reached the commit"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(10) == -signal.SIGKILL

    raw = zarr.open_group(str(tmp_path / "run" / "trajectory.zarr"), mode="r")
    assert raw["position"].shape[0] == 12 + 16  # the uncommitted rows are there ...
    with Run.open(url, write=False) as reader:  # ... but nobody sees them
        assert reader.trajectory.num_rows == 12
        assert_rows_equal(reader.trajectory.rows(), first)
        assert reader.trajectory.epochs() == {0: (0, 12)}

    with pytest.raises(RunError, match="stale"):
        Run.open(url)
    with Run.open(url, break_lock=True) as run:
        assert run.trajectory.num_rows == 12  # opening writes nothing; the next append overwrites the rest
        second = make_rows(1, [0, 1, 2, 3], 2, first_step=3)
        assert run.trajectory.append(second, 1) == 20
        assert_rows_equal(run.trajectory.rows(), Rows.cat([first, second]))
        expected = InMemoryTrajectory.from_blocks([first, second], 4, HISTORY)
        window = run.trajectory.window("all", history_len=HISTORY)
        assert_minibatch_equal(window.gather(torch.arange(len(window))), expected.gather(torch.arange(len(window))))
