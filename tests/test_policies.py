"""Classical dt policies and the simulation driver: FixedDt, FreeFall, StepController, oracle."""

from __future__ import annotations

import math

import pytest
import torch

from nbody_dt.physics import initial_conditions as ics
from nbody_dt.physics.gravity import Gravity
from nbody_dt.physics.integrator import kdk_step, step_error
from nbody_dt.physics.policies import FixedDt, FreeFall, Oracle, StepController, oracle_dt
from nbody_dt.physics.simulate import simulate
from nbody_dt.physics.state import State

F64 = torch.float64
G1 = Gravity()


def kepler(e: float = 0.9, start: str = "apocentre") -> tuple[State, float]:
    s, T = ics.kepler_orbits(torch.tensor(1.0), torch.tensor(e), torch.tensor(1.0), torch.tensor(1.0), start=start)
    return s, float(T[0])


def three_body() -> State:
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.5], [-0.7, 2.0]]], dtype=F64)
    v = torch.tensor([[[0.1, 0.0], [0.0, -0.3], [0.2, 0.2]]], dtype=F64)
    m = torch.tensor([[1.0, 0.3, 2.0]], dtype=F64)
    return State(x, v, m)


# ---------------------------------------------------------------- FixedDt / FreeFall


def test_fixed_dt_advance():
    s, _ = kepler(0.5)
    adv = FixedDt(0.01, G1).advance(s, 1.0)
    assert adv.dt == 0.01 and adv.force_evaluations == 1
    ref, err = step_error(s, torch.tensor([0.01], dtype=F64), G1)
    assert torch.equal(adv.state.position, ref.position) and adv.rel_dE == float(err[0])
    assert FixedDt(0.01, G1).advance(s, 0.004).dt == 0.004


@pytest.mark.parametrize("dt,t_end", [(0.03, 1.0), (0.1, 1.0), (0.125, 1.0), (0.07, 0.5), (0.2, 0.05),
                                      (0.1, 0.3), (0.1, 0.7), (0.3, 0.9)])
def test_fixed_dt_step_count_through_simulate(dt, t_end):
    s, _ = kepler(0.3)
    res = simulate(s, FixedDt(dt, G1), G1, t_end, threshold=1e-2)
    # ceil(t_end / dt), read with round-off in mind: 0.9 / 0.3 = 3.0000000000000004 is 3 steps.
    n = math.ceil(t_end / dt - 1e-9)
    assert res.accepted_steps == n and res.steps == n
    assert res.t_end == pytest.approx(t_end, abs=1e-12)
    assert len(res.dt) == n and len(res.time) == n and len(res.positions) == n + 1
    assert res.dt[0] == pytest.approx(min(dt, t_end), rel=1e-15)
    # The last step is shortened to land on t_end.
    assert res.dt[-1] == pytest.approx(t_end - (n - 1) * dt, abs=1e-12)
    assert res.time[-1] == pytest.approx(t_end, abs=1e-12)
    assert res.summary()["rejected_steps"] == 0


def test_simulate_rejects_batches_and_counts_violations():
    s, _ = kepler(0.9)
    with pytest.raises(ValueError):
        simulate(State.cat([s, s]), FixedDt(0.01, G1), G1, 1.0, 1e-4)
    # A deliberately coarse fixed step violates a tight threshold on some steps.
    res = simulate(s, FixedDt(0.05, G1), G1, 4.0, threshold=1e-6)
    assert res.violations == sum(e >= 1e-6 for e in res.step_rel_dE) and res.violations > 0
    assert res.max_step_rel_dE == pytest.approx(max(res.step_rel_dE))
    assert res.total_rel_dE[-1] == pytest.approx(res.final_rel_dE, rel=1e-12)


def test_free_fall_dt_formula():
    s = three_body()
    g = Gravity(G=2.0)
    eta = 0.03
    ref = math.inf
    for i in range(3):
        for j in range(i + 1, 3):
            r = float((s.position[0, j] - s.position[0, i]).norm())
            ref = min(ref, math.sqrt(r**3 / (g.G * float(s.mass[0, i] + s.mass[0, j]))))
    adv = FreeFall(eta, g).advance(s, 10.0)
    assert adv.dt == pytest.approx(eta * ref, rel=1e-14)
    assert adv.force_evaluations == 1
    after = kdk_step(s, torch.tensor([adv.dt], dtype=F64), g)
    assert torch.equal(adv.state.position, after.position)
    assert FreeFall(eta, g).advance(s, 1e-4).dt == 1e-4


# ---------------------------------------------------------------- StepController


def _reference_controller(s: State, dt: float, tol: float, safety: float = 0.9) -> tuple[int, float, float]:
    """The reject/retry rule written out: tries, accepted dt, accepted error."""
    tries = 0
    while True:
        _, err_t = step_error(s, torch.tensor([dt], dtype=F64), G1)
        err = float(err_t[0])
        tries += 1
        if err < tol:
            return tries, dt, err
        factor = 0.25 if not math.isfinite(err) else min(2.0, max(0.25, safety * (tol / err) ** (1 / 3)))
        dt *= factor


def test_step_controller_counts_rejected_tries():
    s, _ = kepler(0.9, start="pericentre")
    tol = 1e-6
    ctrl = StepController(tol, G1, next_dt=0.5)
    adv = ctrl.advance(s, 100.0)
    tries, dt, err = _reference_controller(s, 0.5, tol)
    assert tries > 2, "the test needs rejections"
    assert adv.force_evaluations == tries
    assert adv.dt == pytest.approx(dt, rel=1e-14) and adv.rel_dE == pytest.approx(err, rel=1e-10)
    assert adv.rel_dE < tol
    # The accepted step proposes the next trial dt from its own error.
    assert ctrl.next_dt == pytest.approx(dt * min(2.0, max(0.25, 0.9 * (tol / err) ** (1 / 3))), rel=1e-10)


def test_step_controller_rejects_an_error_equal_to_the_tolerance():
    s, _ = kepler(0.9, start="pericentre")
    _, err = step_error(s, torch.tensor([0.01], dtype=F64), G1)
    tol = float(err[0])  # the first try lands exactly on the tolerance: it must be rejected
    ctrl = StepController(tol, G1, next_dt=0.01)
    adv = ctrl.advance(s, 100.0)
    assert adv.force_evaluations >= 2
    assert adv.dt < 0.01 and adv.rel_dE < tol


def test_step_controller_initial_dt_and_landing_step():
    s, _ = kepler(0.5)
    ctrl = StepController(1e-3, G1, initial_eta=0.01)
    adv = ctrl.advance(s, 100.0)
    t_ff = math.sqrt(float((s.position[0, 1] - s.position[0, 0]).norm()) ** 3 / 2.0)
    assert adv.dt == pytest.approx(0.01 * t_ff, rel=1e-12)
    proposed = ctrl.next_dt
    # A step shortened by max_dt does not change the proposal.
    short = ctrl.advance(adv.state, 1e-5)
    assert short.dt == 1e-5 and ctrl.next_dt == proposed


def test_step_controller_never_accepts_at_or_over_the_tolerance():
    s, T = kepler(0.9)
    tol = 1e-4
    res = simulate(s, StepController(tol, G1), G1, T, threshold=tol)
    assert res.violations == 0
    assert max(res.step_rel_dE) < tol and res.max_step_rel_dE < tol
    assert res.steps >= res.accepted_steps and res.summary()["rejected_steps"] == res.steps - res.accepted_steps
    assert res.t_end == pytest.approx(T, abs=1e-12)
    # Adaptive: much smaller steps through pericentre than at apocentre.
    assert max(res.dt) / min(res.dt[:-1]) > 10


# ---------------------------------------------------------------- oracle


THRESHOLD = 2e-4


def _oracle_states() -> list[tuple[str, State]]:
    s, T = kepler(0.9)
    n = 400
    dt = torch.tensor([T / n], dtype=F64)
    samples = []
    for i in range(n):
        if i % 25 == 0:
            samples.append(s)
        s = kdk_step(s, dt, G1)
    return [("kepler e=0.9", State.cat(samples)), ("plummer N=8", ics.plummer_sphere(8, seed=3, batch=2))]


@pytest.fixture(scope="module")
def oracle_cases():
    return [(name, s, oracle_dt(s, G1, THRESHOLD)) for name, s in _oracle_states()]


def test_oracle_dt_passes_and_a_slightly_larger_step_fails(oracle_cases):
    for name, s, dt in oracle_cases:
        assert dt.shape == (s.batch_size,) and bool((dt > 0).all()), name
        _, err = step_error(s, dt, G1)
        _, err_big = step_error(s, 1.01 * dt, G1)
        assert bool((err < THRESHOLD).all()), (name, err)
        assert bool((err_big >= THRESHOLD).all()), (name, err_big)


def test_oracle_dt_is_the_first_admissible_interval(oracle_cases):
    for name, s, dt in oracle_cases:
        k = 200
        frac = torch.linspace(0, 1, k + 1, dtype=F64)[1:]
        trial = (dt[:, None] * frac[None, :]).reshape(-1)
        _, err = step_error(s.repeat_interleave(k), trial, G1)
        err = err.reshape(s.batch_size, k)
        assert bool((err < THRESHOLD).all()), (name, err.max(1).values)


def test_oracle_policy_advances_with_the_oracle_dt():
    s, _ = kepler(0.9, start="pericentre")
    dt = float(oracle_dt(s, G1, THRESHOLD)[0])
    adv = Oracle(THRESHOLD, G1).advance(s, 100.0)
    assert adv.dt == pytest.approx(dt, rel=1e-14) and adv.rel_dE < THRESHOLD and adv.force_evaluations == 1
    assert Oracle(THRESHOLD, G1).advance(s, dt / 3).dt == pytest.approx(dt / 3)
