"""Part 1, collection: accepted rows, per-system acceptance, retraining, warm-up and stalls."""

from __future__ import annotations

import copy

import pytest
import torch

from nbody_dt import config as C
from nbody_dt.model.evaluate import StepCriteria, evaluate_step
from nbody_dt.model.losses import select_loss
from nbody_dt.physics.gravity import total_energy
from nbody_dt.physics.integrator import kdk_step, step_error
from nbody_dt.physics.state import State
from nbody_dt.training.collect import CollectionStalled, LiveCollection, collect_trajectory
from nbody_dt.training.setup import start_training
from tests.conftest import PINNED

ORBITS, STEPS, K = 4, 6, 2
BASE = PINNED + ["model.hidden=[8, 8]", "optimizer.lr=0.01", "initial_conditions.e_range=[0.0, 0.9]",
                 "model.features=rich", "model.history_len=0"]


def cfg_for(*extra: str) -> C.Config:
    return C.load(overrides=BASE + list(extra))


def adam_steps(optimizer: torch.optim.Optimizer) -> int:
    steps = {int(optimizer.state[p]["step"]) for group in optimizer.param_groups for p in group["params"]
             if p in optimizer.state}
    assert len(steps) <= 1, steps
    return steps.pop() if steps else 0


@pytest.fixture(scope="module")
def collected():
    cfg = cfg_for(f"initial_conditions.num_orbits={ORBITS}", f"collect.steps_per_epoch={STEPS}",
                  f"model.history_len={K}", "model.features=delta_mag")
    tr = start_training(cfg)
    start = tr.live
    rows, live, metrics = collect_trajectory(tr.model, tr.optimizer, start, cfg, epoch=3)
    return {"cfg": cfg, "tr": tr, "start": start, "rows": rows, "live": live, "metrics": metrics}


def orbit_rows(rows, o: int) -> torch.Tensor:
    idx = torch.nonzero(rows.orbit == o)[:, 0]
    return idx[rows.step[idx].argsort()]


def test_steps_per_epoch_rows_per_system_all_in_band(collected):
    rows, cfg, m = collected["rows"], collected["cfg"], collected["metrics"]
    assert len(rows) == ORBITS * STEPS
    assert torch.bincount(rows.orbit, minlength=ORBITS).tolist() == [STEPS] * ORBITS
    lo, hi = cfg.collect.accept_lower, cfg.collect.energy_threshold
    assert bool(((rows.rel_dE >= lo) & (rows.rel_dE < hi)).all()), rows.rel_dE
    assert bool((rows.epoch == 3).all())
    assert rows.position.shape == (ORBITS * STEPS, 2, 2) and rows.dt.dtype == torch.float64
    assert m["collect_accepted"] == ORBITS * STEPS
    assert m["collect_tries"] >= ORBITS * STEPS
    assert m["collect_pass_rate"] == pytest.approx(ORBITS * STEPS / m["collect_tries"])
    assert m["collect_rel_dE_max"] == pytest.approx(float(rows.rel_dE.max()))
    assert m["collect_dt_min"] == pytest.approx(float(rows.dt.min())) and m["collect_dt_min"] > 0
    # The recorded error is the single-step error of the recorded state and dt.
    _, err = step_error(rows.state(), rows.dt, collected["tr"].model.gravity)
    torch.testing.assert_close(err, rows.rel_dE, rtol=1e-10, atol=0)
    torch.testing.assert_close(rows.energy, total_energy(rows.state(), collected["tr"].model.gravity), rtol=0, atol=0)


def test_each_system_advances_through_its_own_accepted_steps(collected):
    rows, start, live = collected["rows"], collected["start"], collected["live"]
    g = collected["tr"].model.gravity
    for o in range(ORBITS):
        idx = orbit_rows(rows, o)
        assert rows.step[idx].tolist() == list(range(STEPS))
        # The first row is the initial state: a failing try never moved the system.
        assert torch.equal(rows.position[idx[0]], start.state.position[o])
        assert torch.equal(rows.velocity[idx[0]], start.state.velocity[o])
        assert float(rows.time[idx[0]]) == 0.0
        # Each next row is one KDK step of the recorded dt from the previous one.
        prev = State(rows.position[idx[:-1]], rows.velocity[idx[:-1]], rows.mass[idx[:-1]])
        after = kdk_step(prev, rows.dt[idx[:-1]], g)
        torch.testing.assert_close(rows.position[idx[1:]], after.position, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(rows.velocity[idx[1:]], after.velocity, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(rows.time[idx[1:]], rows.time[idx[:-1]] + rows.dt[idx[:-1]], rtol=1e-14, atol=0)
        # The live state is one step past the last row.
        last = idx[-1:]
        end = kdk_step(State(rows.position[last], rows.velocity[last], rows.mass[last]), rows.dt[last], g)
        torch.testing.assert_close(live.state.position[o], end.position[0], rtol=1e-13, atol=1e-14)
        assert float(live.time[o]) == pytest.approx(float(rows.time[last] + rows.dt[last]), rel=1e-14)
        # Its history window holds the last K states, most recent first.
        for slot in range(K):
            assert torch.equal(live.history.position[o, slot], rows.position[idx[-1 - slot]])
        assert bool(live.history.valid[o].all())
    assert live.step.tolist() == [STEPS] * ORBITS


def test_acceptance_is_per_system(collected):
    """Systems are not held in lockstep: rows arrive in acceptance order, and at some point one
    system is two or more accepted steps ahead of another."""
    orbit = collected["rows"].orbit
    counts = torch.zeros(ORBITS, dtype=torch.int64)
    widest = 0
    for o in orbit.tolist():
        counts[o] += 1
        widest = max(widest, int(counts.max() - counts.min()))
    assert widest >= 2, orbit.tolist()
    assert collected["metrics"]["collect_retrain_iterations"] > 0


def test_retrain_iterations_are_counted(collected):
    m, tr = collected["metrics"], collected["tr"]
    assert m["collect_retrain_iterations"] == adam_steps(tr.optimizer) > 0
    # Each retrain step follows at least one failed try.
    assert m["collect_tries"] - m["collect_accepted"] >= m["collect_retrain_iterations"]


def test_warmup_rows_and_a_second_epoch_continue(collected):
    rows, cfg, tr = collected["rows"], collected["cfg"], collected["tr"]
    assert torch.equal(rows.warmup, rows.step < K)
    assert int(rows.warmup.sum()) == ORBITS * K
    before = collected["live"]
    model, optimizer = copy.deepcopy((tr.model, tr.optimizer))  # leave the shared fixture untouched
    rows2, live2, _ = collect_trajectory(model, optimizer, before, cfg, epoch=4)
    assert not bool(rows2.warmup.any())
    for o in range(ORBITS):
        idx = orbit_rows(rows2, o)
        assert rows2.step[idx].tolist() == list(range(STEPS, 2 * STEPS))
        assert torch.equal(rows2.position[idx[0]], before.state.position[o])
        assert float(rows2.time[idx[0]]) == float(before.time[o])
    assert live2.step.tolist() == [2 * STEPS] * ORBITS


@pytest.mark.parametrize("loss_on", ["all", "failures"])
def test_loss_selection(loss_on):
    loss = torch.tensor([1.0, 2.0, 3.0])
    passed = torch.tensor([True, False, True])
    assert select_loss(loss, passed, loss_on).tolist() == ([1.0, 2.0, 3.0] if loss_on == "all" else [2.0])
    cfg = cfg_for("initial_conditions.num_orbits=2", "collect.steps_per_epoch=3", f"loss.on={loss_on}")
    tr = start_training(cfg)
    rows, _, m = collect_trajectory(tr.model, tr.optimizer, tr.live, cfg, 0)
    assert len(rows) == 6 and m["collect_retrain_iterations"] == adam_steps(tr.optimizer)


def test_max_retrain_steps_raises_collection_stalled():
    cfg = cfg_for("initial_conditions.num_orbits=3", "collect.steps_per_epoch=4",
                  "collect.accept_lower=1.99999e-4", "collect.energy_threshold=2e-4", "collect.max_retrain_steps=3")
    tr = start_training(cfg)
    start = tr.live
    with pytest.raises(CollectionStalled) as info:
        collect_trajectory(tr.model, tr.optimizer, start, cfg, 0)
    e = info.value
    assert f"system {e.orbit}" in str(e) and f"at step {e.step}" in str(e)
    assert f"{e.rel_dE:.3e}" in str(e) and "4 consecutive tries" in str(e)
    assert e.step == 0 and 0 <= e.orbit < 3
    assert not (cfg.collect.accept_lower <= e.rel_dE < cfg.collect.energy_threshold)
    # Exactly max_retrain_steps optimizer steps were taken before giving up.
    assert adam_steps(tr.optimizer) == 3
    # Nothing was accepted: empty rows of the right shape, and the live collection as it started.
    assert len(e.rows) == 0 and e.rows.position.shape == (0, 2, 2)
    assert isinstance(e.live, LiveCollection) and torch.equal(e.live.state.position, start.state.position)
    assert e.live.step.tolist() == [0, 0, 0]


def test_stall_carries_the_rows_accepted_so_far():
    """With a frozen network (lr ~ 0), systems whose error is inside the band advance while
    the others fail until the cap: the exception carries both the rows and the live state."""
    probe_cfg = cfg_for("initial_conditions.num_orbits=6", "optimizer.lr=1e-12")
    probe = start_training(probe_cfg)
    err = evaluate_step(probe.model, probe.live.state, probe.live.history,
                        StepCriteria.from_config(probe_cfg)).rel_dE.sort().values
    # A band that the three largest initial errors lie in and the three smallest lie below.
    lo, hi = float((err[2] * err[3]).sqrt()), float(err[5]) * 100
    assert lo < hi < 1.0
    cfg = cfg_for("initial_conditions.num_orbits=6", "collect.steps_per_epoch=50", "optimizer.lr=1e-12",
                  f"collect.accept_lower={lo!r}", f"collect.energy_threshold={hi!r}", f"loss.lower={lo * 2!r}",
                  f"loss.upper={lo * 4!r}", "collect.max_retrain_steps=3")
    tr = start_training(cfg)
    with pytest.raises(CollectionStalled) as info:
        collect_trajectory(tr.model, tr.optimizer, tr.live, cfg, 0)
    e = info.value
    assert len(e.rows) >= 3, "the systems inside the band advanced before the stall"
    counts = torch.bincount(e.rows.orbit, minlength=6)
    assert torch.equal(counts, e.live.step), "rows and live collection must agree"
    assert int(e.live.step[e.orbit]) == e.step == 0
    # The stalled system's last error is what the network gives on its live state now.
    sel = torch.tensor([e.orbit])
    ev = evaluate_step(tr.model, e.live.state.select(sel), e.live.history.select(sel), StepCriteria.from_config(cfg))
    assert float(ev.rel_dE[0]) == pytest.approx(e.rel_dE, rel=1e-12)
    assert not bool(ev.passed[0]) and e.rel_dE < lo
    assert bool(((e.rows.rel_dE >= lo) & (e.rows.rel_dE < hi)).all())


def test_accept_safe_after_advances_a_system_stuck_below_the_band():
    """The frozen-network setup of the stall test: with accept_safe_after = 2 the systems below the
    band advance on every third try instead of stalling, and their rows are marked by their error."""
    probe_cfg = cfg_for("initial_conditions.num_orbits=6", "optimizer.lr=1e-12")
    probe = start_training(probe_cfg)
    err = evaluate_step(probe.model, probe.live.state, probe.live.history,
                        StepCriteria.from_config(probe_cfg)).rel_dE.sort().values
    lo, hi = float((err[2] * err[3]).sqrt()), float(err[5]) * 100
    band = ["initial_conditions.num_orbits=6", "optimizer.lr=1e-12", f"collect.accept_lower={lo!r}",
            f"collect.energy_threshold={hi!r}", f"loss.lower={lo * 2!r}", f"loss.upper={lo * 4!r}",
            "collect.steps_per_epoch=1", "collect.max_retrain_steps=3"]
    strict = start_training(cfg_for(*band))
    with pytest.raises(CollectionStalled):
        collect_trajectory(strict.model, strict.optimizer, strict.live, cfg_for(*band), 0)

    cfg = cfg_for(*band, "collect.accept_safe_after=2")
    tr = start_training(cfg)
    rows, live, m = collect_trajectory(tr.model, tr.optimizer, tr.live, cfg, 0)
    assert live.step.tolist() == [1] * 6 and len(rows) == 6
    below = rows.rel_dE < lo
    assert int(below.sum()) == m["collect_accepted_below_band"] == 3
    assert bool((rows.rel_dE < hi).all())
    # three systems passed at once, three after two failed tries each: 6 + 2 * 3 tries
    assert m["collect_tries"] == 12 and m["collect_retrain_iterations"] == 2


def _frozen_band(steps: int, *extra: str):
    """The frozen-network setup of the stall tests: the three largest initial errors lie inside the
    band and pass at every try, the three smallest below it (they fail until they stall)."""
    probe_cfg = cfg_for("initial_conditions.num_orbits=6", "optimizer.lr=1e-12")
    probe = start_training(probe_cfg)
    err = evaluate_step(probe.model, probe.live.state, probe.live.history, StepCriteria.from_config(probe_cfg)).rel_dE
    lo, hi = float((err.sort().values[2] * err.sort().values[3]).sqrt()), float(err.max()) * 100
    cfg = cfg_for("initial_conditions.num_orbits=6", "optimizer.lr=1e-12", f"collect.accept_lower={lo!r}",
                  f"collect.energy_threshold={hi!r}", f"loss.lower={lo * 2!r}", f"loss.upper={lo * 4!r}",
                  f"collect.steps_per_epoch={steps}", "collect.max_retrain_steps=3", "collect.accept_safe_after=0",
                  *extra)
    return cfg, err


def test_on_stall_restart_starts_a_stalled_system_over_once_per_epoch():
    """Stalled systems start over from what `restart` draws (here: the start of the best system, which
    passes) with time and step 0, and collect their rows; the restart is counted."""
    cfg, err = _frozen_band(1, "collect.on_stall=restart")
    tr = start_training(cfg)
    start, best = tr.live, int(torch.argmax(err))
    keys = []

    def restart(orbits, key):
        keys.append(key)
        return start.state.select(torch.full_like(orbits, best))

    rows, live, m = collect_trajectory(tr.model, tr.optimizer, start, cfg, 2, restart)
    stalled = sorted(torch.argsort(err)[:3].tolist())
    assert m["collect_restarts"] == 3 and keys == [f"epoch 2 orbits {stalled} steps [0, 0, 0]"]
    assert len(rows) == 6 and live.step.tolist() == [1] * 6
    again = torch.isin(rows.orbit, torch.tensor(stalled))
    assert bool((rows.time[again] == 0).all()) and bool((rows.step[again] == 0).all())
    assert bool((rows.position[again] == start.state.position[best]).all())
    # Without a restart to draw from, or with on_stall = 'raise' (the default), the same run stalls.
    with pytest.raises(CollectionStalled):
        collect_trajectory(tr.model, tr.optimizer, start, cfg, 2)
    with pytest.raises(CollectionStalled):
        collect_trajectory(tr.model, tr.optimizer, start, _frozen_band(1)[0], 2, restart)


def test_a_second_stall_in_the_epoch_raises():
    cfg, err = _frozen_band(1, "collect.on_stall=restart")
    tr = start_training(cfg)
    worst, draws = int(torch.argmin(err)), []

    def restart(orbits, key):  # the start of a system that never passes: it stalls again
        draws.append(key)
        return tr.live.state.select(torch.full_like(orbits, worst))

    with pytest.raises(CollectionStalled):
        collect_trajectory(tr.model, tr.optimizer, tr.live, cfg, 0, restart)
    assert len(draws) == 1, "one restart, then the second stall raises"
