"""Part 2, generalization replay: sampling, single-step evaluation, convergence, the cap,
read-only trajectories, skipping and full verification."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch

from nbody_dt import config as C
from nbody_dt.model.evaluate import StepCriteria, evaluate_step
from nbody_dt.model.trajectory import InMemoryTrajectory, Rows
from nbody_dt.training.collect import collect_trajectory
from nbody_dt.training.evaluators import LocalEvaluator
from nbody_dt.training.replay import (
    apply_gradients,
    evaluate_minibatch,
    generalize_on_trajectory,
    replay_steps,
    sample_minibatch,
    sample_positions,
)
from nbody_dt.training.setup import start_training
from tests.conftest import PINNED

ORBITS, STEPS, K = 4, 8, 1
BASE = PINNED + ["model.hidden=[8, 8]", f"initial_conditions.num_orbits={ORBITS}", f"collect.steps_per_epoch={STEPS}",
                 f"model.history_len={K}", "optimizer.lr=0.01", "initial_conditions.e_range=[0.0, 0.7]",
                 "model.features=rich"]
# Replay bands: one the collected network fails in part and learns quickly, one nothing can pass.
LEARNABLE = ["collect.accept_lower=1e-6", "collect.energy_threshold=2e-5", "loss.lower=3e-6", "loss.upper=8e-6"]
IMPOSSIBLE = ["collect.accept_lower=1.99999e-4", "collect.energy_threshold=2e-4"]


def cfg_for(*extra: str) -> C.Config:
    return C.load(overrides=BASE + list(extra))


@pytest.fixture(scope="module")
def collected():
    cfg = cfg_for()
    tr = start_training(cfg)
    rows, _, _ = collect_trajectory(tr.model, tr.optimizer, tr.live, cfg, 0)
    return tr.model, rows


@pytest.fixture
def setup(collected):
    """A fresh copy of the collected model, an optimizer, and the trajectory."""
    model, rows = collected
    model = copy.deepcopy(model)
    traj = InMemoryTrajectory.from_blocks([rows], ORBITS, K)
    return model, torch.optim.Adam(model.parameters(), lr=0.01), traj


def adam_steps(optimizer) -> int:
    return max((int(s["step"]) for s in optimizer.state.values()), default=0)


def all_rows_pass(model, traj, cfg) -> torch.Tensor:
    mb = traj.gather(torch.arange(len(traj)))
    with torch.no_grad():
        return evaluate_step(model, mb.state, mb.history, StepCriteria.from_config(cfg)).passed


def fingerprint(traj: InMemoryTrajectory) -> dict[str, str]:
    rows = traj.rows.as_dict()
    out = {name: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for name, t in rows.items()}
    out["prev"] = hashlib.sha256(traj.prev.tobytes()).hexdigest()
    out["replayable"] = hashlib.sha256(traj.replayable.tobytes()).hexdigest()
    return out


# ---------------------------------------------------------------- sampling


def chi2(counts: np.ndarray) -> tuple[float, float]:
    """The chi-square statistic against uniform counts, and a generous bound (df + 6 sqrt(2 df))."""
    expected = counts.sum() / len(counts)
    df = len(counts) - 1
    return float(((counts - expected) ** 2 / expected).sum()), df + 6 * (2 * df) ** 0.5


@pytest.mark.parametrize("n,k", [(10, 3), (10, 10), (5, 9), (1000, 10), (100_000, 64)])
def test_sample_positions_distinct_in_range_capped(n, k):
    gen = torch.Generator().manual_seed(0)
    pos = sample_positions(n, k, gen)
    assert pos.dtype == torch.int64 and len(pos) == min(n, k)
    assert len(set(pos.tolist())) == len(pos)
    assert int(pos.min()) >= 0 and int(pos.max()) < n
    if k >= n:
        assert sorted(pos.tolist()) == list(range(n))


@pytest.mark.parametrize("n,k", [(12, 4), (400, 8)])  # randperm branch, rejection branch
def test_sample_positions_seeded_and_uniform(n, k):
    a = sample_positions(n, k, torch.Generator().manual_seed(1))
    b = sample_positions(n, k, torch.Generator().manual_seed(1))
    c = sample_positions(n, k, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    gen = torch.Generator().manual_seed(3)
    draws = 2000
    counts = np.zeros(n)
    first = np.zeros(n)
    unsorted = 0
    for _ in range(draws):
        p = sample_positions(n, k, gen).numpy()
        assert len(np.unique(p)) == k
        counts[p] += 1
        first[p[0]] += 1
        unsorted += int(np.any(np.diff(p) < 0))
    stat, bound = chi2(counts)
    assert stat < bound, f"positions are not uniform: chi2 {stat:.1f} >= {bound:.1f}"
    stat, bound = chi2(first)
    assert stat < bound, f"the first draw is not uniform: chi2 {stat:.1f} >= {bound:.1f}"
    assert unsorted > draws // 2, "positions come in draw order, not sorted"


def test_sample_minibatch_gathers_replayable_rows_with_history(setup):
    _, _, traj = setup
    rows = traj.rows
    assert len(traj) == ORBITS * (STEPS - K)  # warm-up rows are not replayed
    mb = sample_minibatch(traj, 10, torch.Generator().manual_seed(0))
    assert len(mb) == 10 and len(set(mb.rows.tolist())) == 10
    assert not bool(rows.warmup[mb.rows].any())
    assert torch.equal(mb.state.position, rows.position[mb.rows])
    assert torch.equal(mb.state.velocity, rows.velocity[mb.rows])
    # History slot 0 is the previous accepted state of the same orbit.
    for j, r in enumerate(mb.rows.tolist()):
        p = int(traj.prev[r])
        assert p >= 0 and int(rows.orbit[p]) == int(rows.orbit[r]) and int(rows.step[p]) == int(rows.step[r]) - 1
        assert torch.equal(mb.history.position[j, 0], rows.position[p]) and bool(mb.history.valid[j, 0])
    # Capped at the trajectory length.
    assert len(sample_minibatch(traj, 10_000)) == len(traj)


# ---------------------------------------------------------------- single-step evaluation


@pytest.mark.parametrize("loss_on", ["all", "failures"])
def test_evaluate_minibatch_is_one_step_per_sample(setup, loss_on):
    model, _, traj = setup
    cfg = cfg_for(*LEARNABLE, f"loss.on={loss_on}")
    mb = sample_minibatch(traj, 12, torch.Generator().manual_seed(4))
    all_pass, loss, rel_dE, metrics = evaluate_minibatch(model, mb, cfg)
    ev = evaluate_step(model, mb.state, mb.history, StepCriteria.from_config(cfg))
    assert torch.equal(rel_dE, ev.rel_dE)
    assert all_pass == bool(ev.passed.all()) and not all_pass
    assert metrics["pass_count"] == int(ev.passed.sum()) and metrics["fail_count"] == 12 - int(ev.passed.sum())
    expected = ev.loss.mean() if loss_on == "all" else ev.loss[~ev.passed].mean()
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)
    # The evaluator's loss-sum gradients, divided by the count, are the gradients of that mean.
    model.zero_grad()
    loss.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    result = LocalEvaluator(1).evaluate(model, mb, StepCriteria.from_config(cfg), loss_on)
    assert result.loss_count == (12 if loss_on == "all" else metrics["fail_count"])
    assert torch.equal(result.passed, ev.passed) and torch.equal(result.rel_dE, ev.rel_dE)
    for g, e in zip(result.grads, expected_grads):
        torch.testing.assert_close(g / result.loss_count, e, rtol=1e-12, atol=1e-15)


def test_apply_gradients_steps_on_the_mean_loss(setup):
    model, opt, traj = setup
    cfg = cfg_for(*LEARNABLE)
    mb = sample_minibatch(traj, 12, torch.Generator().manual_seed(5))
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.01)
    apply_gradients(model, opt, LocalEvaluator(1).evaluate(model, mb, StepCriteria.from_config(cfg), "all"))
    _, loss, _, _ = evaluate_minibatch(twin, mb, cfg)
    twin_opt.zero_grad()
    loss.backward()
    twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    # Nothing to learn from a minibatch that passes: no gradients, no step.
    wide = StepCriteria.from_config(cfg_for("collect.accept_lower=0", "collect.energy_threshold=1.0"))
    result = LocalEvaluator(3).evaluate(model, mb, wide, "failures")
    assert result.grads is None and bool(result.passed.all())
    before = [p.detach().clone() for p in model.parameters()]
    apply_gradients(model, opt, result)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


# ---------------------------------------------------------------- the replay loop


def test_trains_until_every_sample_of_a_minibatch_passes(setup):
    model, opt, traj = setup
    cfg = cfg_for(*LEARNABLE, "replay.batch_size=8", "replay.steps=300")
    converged, iterations, m = generalize_on_trajectory(model, traj, opt, cfg,
                                                        generator=torch.Generator().manual_seed(0))
    assert converged and 1 < iterations < 300
    assert m["replay_converged"] == 1 and m["replay_iterations"] == iterations and m["replay_skipped"] == 0
    assert m["replay_first_pass_rate"] < 1.0 and m["replay_final_pass_rate"] == 1.0
    assert m["replay_samples"] == 8 * iterations and m["replay_window_rows"] == len(traj)
    assert adam_steps(opt) == iterations - 1  # a step after every failing minibatch, none after the last
    # Replaying the generator reproduces the minibatches: the last one passes with the final weights.
    gen = torch.Generator().manual_seed(0)
    for _ in range(iterations):
        last = sample_minibatch(traj, 8, gen)
    with torch.no_grad():
        ev = evaluate_step(model, last.state, last.history, StepCriteria.from_config(cfg))
    assert bool(ev.passed.all())


def test_a_passing_first_minibatch_stops_at_once(setup):
    model, opt, traj = setup
    cfg = cfg_for("collect.accept_lower=0", "collect.energy_threshold=1.0", "replay.batch_size=8")
    before = [p.detach().clone() for p in model.parameters()]
    assert generalize_on_trajectory(model, traj, opt, cfg)[:2] == (True, 1)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_iteration_cap_prevents_infinite_loops(setup):
    model, opt, traj = setup
    cfg = cfg_for(*IMPOSSIBLE, "replay.batch_size=8", "replay.steps=5")
    converged, iterations, m = generalize_on_trajectory(model, traj, opt, cfg)
    assert (converged, iterations) == (False, 5)
    assert m["replay_converged"] == 0 and m["replay_iterations"] == 5 and m["replay_final_pass_rate"] < 1.0
    assert adam_steps(opt) == 5 and m["replay_samples"] == 40
    cfg0 = cfg_for(*IMPOSSIBLE, "replay.steps=0")
    assert generalize_on_trajectory(model, traj, opt, cfg0)[:2] == (False, 0)


def test_trajectory_is_never_modified(setup):
    model, opt, traj = setup
    before = fingerprint(traj)
    snapshot = {k: v.clone() for k, v in traj.rows.as_dict().items()}
    generalize_on_trajectory(model, traj, opt, cfg_for(*LEARNABLE, "replay.batch_size=8", "replay.steps=50",
                                                       "replay.verify=full"))
    generalize_on_trajectory(model, traj, opt, cfg_for(*IMPOSSIBLE, "replay.batch_size=8", "replay.steps=3"))
    assert adam_steps(opt) > 0
    assert fingerprint(traj) == before
    for k, v in traj.rows.as_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_empty_or_short_trajectories_are_skipped(setup, collected):
    model, opt, _ = setup
    before = [p.detach().clone() for p in model.parameters()]
    empty = InMemoryTrajectory(Rows.empty(2, 2, torch.float64), np.zeros(0, dtype=np.int64), K)
    converged, iterations, m = generalize_on_trajectory(model, empty, opt, cfg_for(*IMPOSSIBLE))
    assert (converged, iterations) == (True, 0) and m["replay_skipped"] == 1 and m["replay_window_rows"] == 0
    # Shorter than replay.min_size.
    _, rows = collected
    short = InMemoryTrajectory.from_blocks([rows], ORBITS, K, window_start=len(rows) - 3)
    assert len(short) == 3
    converged, iterations, m = generalize_on_trajectory(model, short, opt, cfg_for(*IMPOSSIBLE, "replay.min_size=4"))
    assert (converged, iterations, m["replay_skipped"], m["replay_window_rows"]) == (True, 0, 1, 3)
    # Only warm-up rows: nothing replayable.
    warm = InMemoryTrajectory.from_blocks([rows], ORBITS, history_len=STEPS, window_start=0)
    warm_only = InMemoryTrajectory(warm.rows, warm.prev, K, window_start=0)
    warm_only.replayable = warm_only.replayable[:0]
    assert generalize_on_trajectory(model, warm_only, opt, cfg_for(*IMPOSSIBLE))[:2] == (True, 0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert adam_steps(opt) == 0


def test_verify_full_checks_every_row(setup):
    model, opt, traj = setup
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.01)
    common = [*LEARNABLE, "replay.batch_size=4", "replay.steps=300"]
    # The minibatch criterion stops with some rows still failing ...
    cfg_mb = cfg_for(*common)
    assert generalize_on_trajectory(twin, traj, twin_opt, cfg_mb, generator=torch.Generator().manual_seed(0))[0]
    assert not bool(all_rows_pass(twin, traj, cfg_mb).all()), "the test needs a minibatch-only convergence gap"
    # ... the full criterion only when every replayable row passes.
    cfg_full = cfg_for(*common, "replay.verify=full")
    converged, iterations, m = generalize_on_trajectory(model, traj, opt, cfg_full,
                                                        generator=torch.Generator().manual_seed(0))
    assert converged and iterations < 300 and m["replay_converged"] == 1
    assert bool(all_rows_pass(model, traj, cfg_full).all())


def test_window_start_limits_replay_but_not_history(collected):
    _, rows = collected
    full = InMemoryTrajectory.from_blocks([rows], ORBITS, K)
    start = len(rows) // 2
    part = InMemoryTrajectory.from_blocks([rows], ORBITS, K, window_start=start)
    assert len(part) == int((~rows.warmup[start:]).sum()) < len(full)
    mb = part.gather(torch.arange(len(part)))
    assert bool((mb.rows >= start).all())
    # History still reaches rows before the window.
    reaching = [j for j, r in enumerate(mb.rows.tolist()) if 0 <= part.prev[r] < start]
    assert reaching
    for j in reaching:
        p = int(part.prev[int(mb.rows[j])])
        assert bool(mb.history.valid[j, 0]) and torch.equal(mb.history.position[j, 0], rows.position[p])


def test_replay_steps_of_each_epoch():
    assert [replay_steps(cfg_for("epochs=4", "replay.steps=10", "replay.final_steps=50"), e) for e in range(4)] == [
        10, 10, 10, 50]
    assert replay_steps(cfg_for("epochs=4", "replay.steps=10", "replay.final_steps=50"), 9) == 50
    assert [replay_steps(cfg_for("epochs=2", "replay.steps=10"), e) for e in range(2)] == [10, 10]
