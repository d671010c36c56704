"""Epochs as library code: bitwise reproducibility and snapshot/restore resumption on CPU."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

from nbody_dt import config as C
from nbody_dt.model.trajectory import Rows, window_bounds
from nbody_dt.training.epoch import MemoryRun, train_epoch
from nbody_dt.training.setup import restore, snapshot, start_training
from tests.conftest import PINNED

ORBITS, K = 3, 1
OVERRIDES = PINNED + ["model.hidden=[8, 8]", f"initial_conditions.num_orbits={ORBITS}", "collect.steps_per_epoch=4",
                      f"model.history_len={K}", "model.features=delta_mag", "replay.batch_size=4", "replay.steps=5",
                      "optimizer.lr=0.01", "seed=5", "initial_conditions.e_range=[0.0, 0.9]"]


@pytest.fixture(scope="module")
def cfg() -> C.Config:
    return C.load(overrides=OVERRIDES)


def weights(training) -> list[torch.Tensor]:
    return [p.detach().clone() for p in training.model.parameters()]


def assert_same_weights(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def run(cfg: C.Config, epochs: int):
    tr = start_training(cfg)
    memory = MemoryRun(ORBITS, K)
    metrics = [train_epoch(tr, memory, cfg, e) for e in range(epochs)]
    return tr, memory, metrics


def test_train_epoch_is_bitwise_reproducible(cfg):
    a, run_a, ma = run(cfg, 2)
    b, run_b, mb = run(cfg, 2)
    assert_same_weights(weights(a), weights(b))
    assert torch.equal(a.live.state.position, b.live.state.position)
    assert torch.equal(Rows.cat(run_a.blocks).position, Rows.cat(run_b.blocks).position)

    def drop_timing(m: dict) -> dict:
        return {k: v for k, v in m.items() if "wall" not in k and "per_s" not in k}

    assert [drop_timing(m) for m in ma] == [drop_timing(m) for m in mb]
    # The epochs did train: the weights moved from their initialization, and rows were stored.
    fresh = start_training(cfg)
    assert any(not torch.equal(x, y) for x, y in zip(weights(a), weights(fresh)))
    assert run_a.num_rows == 2 * ORBITS * 4 and run_a.epoch_start == {0: 0, 1: ORBITS * 4}
    assert ma[1]["epoch"] == 1 and ma[1]["collect_accepted"] == ORBITS * 4
    assert ma[1]["replay_window_rows"] == 2 * ORBITS * 4 - ORBITS * K  # window 'all', warm-up excluded


def test_the_default_margin_loss_trains_reproducibly():
    """The shipped loss (probe step per sample) and the below-band fallback through whole epochs."""
    margin = C.load(overrides=OVERRIDES + ["loss.kind=margin", "collect.accept_safe_after=50"])
    a, run_a, ma = run(margin, 2)
    b, _, mb = run(margin, 2)
    assert_same_weights(weights(a), weights(b))
    assert ma[1]["collect_accepted"] == ORBITS * 4 and run_a.num_rows == 2 * ORBITS * 4
    assert [m["replay_iterations"] for m in ma] == [m["replay_iterations"] for m in mb]
    fresh = start_training(margin)
    assert any(not torch.equal(x, y) for x, y in zip(weights(a), weights(fresh)))


def test_a_different_seed_gives_different_weights(cfg):
    other = C.load(overrides=OVERRIDES + ["seed=6"])
    a, _, _ = run(cfg, 1)
    b, _, _ = run(other, 1)
    assert any(not torch.equal(x, y) for x, y in zip(weights(a), weights(b)))


def _resume_matches_uninterrupted(cfg: C.Config, through_disk: bool) -> None:
    tr, memory, _ = run(cfg, 1)
    payload = snapshot(tr, cfg)
    if through_disk:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        buffer.seek(0)
        payload = torch.load(buffer, weights_only=True)
    saved_memory = copy.deepcopy(memory)
    # The uninterrupted run goes on.
    train_epoch(tr, memory, cfg, 1)
    train_epoch(tr, memory, cfg, 2)
    # The resumed run starts from the snapshot, after other work has disturbed every RNG.
    torch.rand(7)
    np.random.rand(3)
    resumed = restore(payload, cfg)
    train_epoch(resumed, saved_memory, cfg, 1)
    train_epoch(resumed, saved_memory, cfg, 2)
    assert_same_weights(weights(tr), weights(resumed))
    for a, b in zip(tr.optimizer.state.values(), resumed.optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert torch.equal(tr.live.state.position, resumed.live.state.position)
    assert torch.equal(tr.live.history.position, resumed.live.history.position)
    assert torch.equal(tr.live.step, resumed.live.step) and torch.equal(tr.live.time, resumed.live.time)


def test_snapshot_restore_through_torch_save_and_weights_only_load(cfg):
    _resume_matches_uninterrupted(cfg, through_disk=True)


def test_snapshot_restore_in_memory(cfg):
    """The payload is a snapshot: training on after taking it must not change it."""
    _resume_matches_uninterrupted(cfg, through_disk=False)


def test_snapshot_is_not_aliased_to_the_live_training_objects(cfg):
    tr, memory, _ = run(cfg, 1)
    payload = snapshot(tr, cfg)
    frozen = {k: v.clone() for k, v in payload["model"].items()}
    train_epoch(tr, memory, cfg, 1)
    for k, v in payload["model"].items():
        assert torch.equal(v, frozen[k]), f"snapshot['model'][{k!r}] changed when training went on"


def test_restore_rebuilds_the_run(cfg):
    tr, _, _ = run(cfg, 1)
    payload = snapshot(tr, cfg)
    assert payload["config"] == cfg.to_dict()
    back = restore(payload, cfg)
    assert_same_weights(weights(tr), weights(back))
    assert torch.equal(back.model.scales, tr.model.scales)
    assert torch.equal(back.live.history.valid, tr.live.history.valid)
    assert back.model is not tr.model and back.optimizer.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize("kind,expected", [("epoch", (40, 60)), ("all", (0, 100)), ("last", (70, 100))])
def test_window_bounds(kind, expected):
    assert window_bounds(kind, (40, 60), total_rows=100, last_rows=30) == expected
    assert window_bounds("last", (0, 20), 20, 30) == (0, 20)
    with pytest.raises(ValueError, match="unknown window"):
        window_bounds("recent", (0, 0), 10, 3)


def test_one_payload_restores_twice_to_the_same_run(cfg):
    """Restoring must not let the restored optimizer write into the payload (a retried task
    restores the same loaded checkpoint again)."""
    tr, memory, _ = run(cfg, 1)
    buffer = io.BytesIO()
    torch.save(snapshot(tr, cfg), buffer)
    buffer.seek(0)
    payload = torch.load(buffer, weights_only=True)
    results = []
    for _ in range(2):
        resumed = restore(payload, cfg)
        train_epoch(resumed, copy.deepcopy(memory), cfg, 1)
        results.append(weights(resumed))
    assert_same_weights(results[0], results[1])


def test_the_last_epoch_replays_up_to_final_steps():
    """replay.steps = 0 skips every replay but the last epoch's, which runs up to replay.final_steps."""
    cfg = C.load(overrides=OVERRIDES + ["epochs=2", "replay.steps=0", "replay.final_steps=3"])
    _, _, metrics = run(cfg, 2)
    assert metrics[0]["replay_iterations"] == 0 and metrics[0]["replay_samples"] == 0
    assert 1 <= metrics[1]["replay_iterations"] <= 3 and metrics[1]["replay_samples"] > 0
