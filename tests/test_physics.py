"""Physics layer: state, gravity, energy, the KDK integrator and initial conditions.

References are written independently of the vectorized code (per-pair Python loops,
closed-form Kepler quantities), never mocked.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nbody_dt.physics import initial_conditions as ics
from nbody_dt.physics.gravity import (
    Gravity,
    accelerations,
    kinetic_energy,
    min_freefall_time,
    pair_freefall_times,
    potential_energy,
    total_energy,
)
from nbody_dt.physics.integrator import kdk_step, relative_energy_error, step_error
from nbody_dt.physics.state import State

F64 = torch.float64


def random_state(batch: int, n: int, dim: int = 3, seed: int = 0) -> State:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, dim, generator=gen, dtype=F64)
    v = 0.5 * torch.randn(batch, n, dim, generator=gen, dtype=F64)
    m = 0.5 + torch.rand(batch, n, generator=gen, dtype=F64)
    return State(x, v, m)


def reference_accelerations(x: torch.Tensor, m: torch.Tensor, G: float, eps: float) -> list[list[list[float]]]:
    """Per-pair Python loop over one system: x (N, D), m (N,)."""
    n, d = x.shape
    out = [[0.0] * d for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            dx = [float(x[j, k] - x[i, k]) for k in range(d)]
            r2 = sum(c * c for c in dx) + eps * eps
            w = G * float(m[j]) / r2**1.5
            for k in range(d):
                out[i][k] += w * dx[k]
    return out


def reference_energy(x: torch.Tensor, v: torch.Tensor, m: torch.Tensor, G: float, eps: float) -> float:
    n, d = x.shape
    kin = sum(0.5 * float(m[i]) * sum(float(v[i, k]) ** 2 for k in range(d)) for i in range(n))
    pot = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            r2 = sum(float(x[j, k] - x[i, k]) ** 2 for k in range(d)) + eps * eps
            pot -= G * float(m[i]) * float(m[j]) / math.sqrt(r2)
    return kin + pot


# ---------------------------------------------------------------- state


def test_state_validates_shapes():
    x = torch.zeros(2, 3, 2, dtype=F64)
    with pytest.raises(ValueError):
        State(x, torch.zeros(2, 3, 3, dtype=F64), torch.ones(2, 3, dtype=F64))
    with pytest.raises(ValueError):
        State(x, x.clone(), torch.ones(2, 4, dtype=F64))
    with pytest.raises(ValueError):
        State(x[0], x[0].clone(), torch.ones(3, dtype=F64))


def test_state_select_where_cat_repeat():
    s = random_state(4, 3, seed=1)
    assert (s.batch_size, s.num_bodies, s.dim, s.dtype) == (4, 3, 3, F64)
    sub = s.select(torch.tensor([2, 0]))
    assert torch.equal(sub.position, s.position[[2, 0]]) and torch.equal(sub.mass, s.mass[[2, 0]])
    other = random_state(4, 3, seed=2)
    mask = torch.tensor([True, False, True, False])
    w = s.where(mask, other)
    assert torch.equal(w.position[0], s.position[0]) and torch.equal(w.position[1], other.position[1])
    assert torch.equal(w.mass[3], other.mass[3]) and torch.equal(w.velocity[2], s.velocity[2])
    c = State.cat([s, other])
    assert c.batch_size == 8 and torch.equal(c.velocity[4:], other.velocity)
    r = s.repeat_interleave(3)
    assert r.batch_size == 12
    assert torch.equal(r.position[3], s.position[1]) and torch.equal(r.position[5], s.position[1])


# ---------------------------------------------------------------- gravity and energy


@pytest.mark.parametrize("softening", [0.0, 0.1])
def test_accelerations_and_energy_match_pair_loop(softening):
    g = Gravity(G=1.7, softening=softening)
    s = random_state(3, 5, seed=3)
    acc = accelerations(s.position, s.mass, g)
    energy = total_energy(s, g)
    assert acc.shape == (3, 5, 3) and energy.shape == (3,)
    for b in range(3):
        ref_a = torch.tensor(reference_accelerations(s.position[b], s.mass[b], g.G, softening), dtype=F64)
        torch.testing.assert_close(acc[b], ref_a, rtol=1e-12, atol=1e-13)
        ref_e = reference_energy(s.position[b], s.velocity[b], s.mass[b], g.G, softening)
        assert abs(float(energy[b]) - ref_e) <= 1e-12 * abs(ref_e)
    torch.testing.assert_close(kinetic_energy(s) + potential_energy(s, g), energy, rtol=0, atol=0)


def test_softening_weakens_gravity():
    s = random_state(1, 5, seed=4)
    hard = accelerations(s.position, s.mass, Gravity())
    soft = accelerations(s.position, s.mass, Gravity(softening=0.3))
    assert bool((soft.norm(dim=-1) < hard.norm(dim=-1)).all())
    assert float(potential_energy(s, Gravity(softening=0.3))[0]) > float(potential_energy(s, Gravity())[0])


def test_net_force_vanishes_and_batches_are_independent():
    g = Gravity(G=0.8, softening=0.05)
    s = random_state(4, 5, seed=5)
    acc = accelerations(s.position, s.mass, g)
    net = (s.mass[..., None] * acc).sum(1)
    assert float(net.abs().max()) < 1e-13
    energy = total_energy(s, g)
    for b in range(4):
        one = s.select(torch.tensor([b]))
        torch.testing.assert_close(accelerations(one.position, one.mass, g)[0], acc[b], rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(total_energy(one, g)[0], energy[b], rtol=1e-15, atol=0.0)
    # Changing one system leaves the others' results untouched.
    moved = State(s.position.clone(), s.velocity, s.mass)
    moved.position[2] += 1.0
    acc2 = accelerations(moved.position, moved.mass, g)
    assert torch.equal(acc2[[0, 1, 3]], acc[[0, 1, 3]]) and not torch.equal(acc2[2], acc[2])


def test_pair_freefall_times_match_loop():
    g = Gravity(G=2.0)
    s = random_state(2, 4, seed=6)
    t = pair_freefall_times(s, g)
    assert t.shape == (2, 6)
    for b in range(2):
        ref = []
        for i in range(4):
            for j in range(i + 1, 4):
                r = float((s.position[b, j] - s.position[b, i]).norm())
                ref.append(math.sqrt(r**3 / (g.G * float(s.mass[b, i] + s.mass[b, j]))))
        torch.testing.assert_close(t[b], torch.tensor(ref, dtype=F64), rtol=1e-13, atol=0)
        assert float(min_freefall_time(s, g)[b]) == pytest.approx(min(ref), rel=1e-13)


# ---------------------------------------------------------------- integrator


def test_kdk_step_matches_hand_written_velocity_verlet():
    g = Gravity(G=1.3, softening=0.01)
    s = random_state(2, 4, seed=7)
    dt = torch.tensor([0.01, 0.003], dtype=F64)
    after = kdk_step(s, dt, g)
    for b in range(2):
        x, v, m, h = s.position[b], s.velocity[b], s.mass[b], float(dt[b])
        a0 = torch.tensor(reference_accelerations(x, m, g.G, g.softening), dtype=F64)
        v_half = v + 0.5 * h * a0
        x1 = x + h * v_half
        a1 = torch.tensor(reference_accelerations(x1, m, g.G, g.softening), dtype=F64)
        v1 = v_half + 0.5 * h * a1
        torch.testing.assert_close(after.position[b], x1, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(after.velocity[b], v1, rtol=1e-13, atol=1e-14)
    assert torch.equal(after.mass, s.mass)
    # The input state is not modified.
    assert not torch.equal(after.position, s.position)


def test_kdk_substeps_and_time_reversibility():
    g = Gravity()
    s = random_state(2, 3, seed=8)
    dt = torch.tensor([0.02, 0.01], dtype=F64)
    two = kdk_step(s, dt, g, substeps=2)
    half = kdk_step(kdk_step(s, dt / 2, g), dt / 2, g)
    torch.testing.assert_close(two.position, half.position, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(two.velocity, half.velocity, rtol=1e-14, atol=1e-15)
    back = kdk_step(State(two.position, -two.velocity, two.mass), dt, g, substeps=2)
    torch.testing.assert_close(back.position, s.position, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(-back.velocity, s.velocity, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        kdk_step(s, torch.tensor([0.01], dtype=F64), g)


def test_relative_energy_error_and_step_error():
    e0 = torch.tensor([-2.0, 4.0], dtype=F64)
    e1 = torch.tensor([-2.2, 3.0], dtype=F64)
    torch.testing.assert_close(relative_energy_error(e0, e1), torch.tensor([0.1, 0.25], dtype=F64))
    g = Gravity()
    s = random_state(2, 3, seed=9)
    dt = torch.tensor([0.01, 0.02], dtype=F64)
    after, err = step_error(s, dt, g)
    ref = (total_energy(after, g) - total_energy(s, g)).abs() / total_energy(s, g).abs()
    torch.testing.assert_close(err, ref, rtol=0, atol=0)


# ---------------------------------------------------------------- Kepler convergence and period


KEPLER_STEPS = (500, 1000, 2000)


@pytest.fixture(scope="module")
def kepler_runs():
    """e = 0.9, a = 1, m1 = m2 = 1 from apocentre, one period at each of KEPLER_STEPS fixed steps.

    All runs are advanced together as one batch (a finished run takes dt = 0 steps).
    """
    g = Gravity()
    one, period = ics.kepler_orbits(torch.tensor(1.0), torch.tensor(0.9), torch.tensor(1.0), torch.tensor(1.0))
    T = float(period[0])
    k = len(KEPLER_STEPS)
    s = one.repeat_interleave(k)
    n_steps = torch.tensor(KEPLER_STEPS)
    dt = T / n_steps.to(F64)
    e0 = total_energy(s, g)
    max_err = torch.zeros(k, dtype=F64)
    half = [None] * k
    separation = []  # of the finest run, after every step
    for i in range(max(KEPLER_STEPS)):
        active = i < n_steps
        s = kdk_step(s, torch.where(active, dt, torch.zeros_like(dt)), g)
        err = ((total_energy(s, g) - e0) / e0).abs()
        max_err = torch.where(active, torch.maximum(max_err, err), max_err)
        for j, n in enumerate(KEPLER_STEPS):
            if i + 1 == n // 2:
                half[j] = s.select(torch.tensor([j]))
        separation.append((s.position[-1, 1] - s.position[-1, 0]).norm())
    separation = torch.stack(separation).tolist()
    return {"start": one, "T": T, "dt": dt, "max_err": max_err, "end": s, "half": half, "separation": separation}


def test_kepler_fixed_dt_energy_error_is_second_order(kepler_runs):
    dt, err = kepler_runs["dt"].numpy(), kepler_runs["max_err"].numpy()
    assert bool(np.all(np.diff(err) < 0)), f"error must fall with dt: {err}"
    slope = np.polyfit(np.log(dt), np.log(err), 1)[0]
    assert 1.85 < slope < 2.15, f"KDK energy error should scale as dt^2, fitted slope {slope:.3f} ({err})"
    # Successive halvings each divide the error by about 4.
    ratios = err[:-1] / err[1:]
    assert bool(np.all((ratios > 3.5) & (ratios < 4.5))), ratios


def test_kepler_period_is_reproduced(kepler_runs):
    T = kepler_runs["T"]
    assert T == pytest.approx(2 * math.pi * math.sqrt(1.0 / 2.0), rel=1e-14)
    assert ics.kepler_period(1.0, 2.0) == pytest.approx(T, rel=1e-14)
    start, end = kepler_runs["start"], kepler_runs["end"]
    pos_err = (end.position - start.position).norm(dim=-1).amax(-1)
    vel_err = (end.velocity - start.velocity).norm(dim=-1).amax(-1)
    # Back at the apocentre start after one period: the miss is the phase error, ~ dt^2,
    # so it vanishes as dt -> 0 (each halving divides it by about 4).
    assert float(pos_err[-1]) < 3e-3, pos_err
    assert float(vel_err[-1]) < 3e-3, vel_err
    miss_ratio = (pos_err[:-1] / pos_err[1:]).numpy()
    assert bool(np.all((miss_ratio > 3.5) & (miss_ratio < 4.5))), miss_ratio
    # Half a period in, each run is at pericentre, separation a (1 - e) = 0.1.
    for h in kepler_runs["half"]:
        r = float((h.position[0, 1] - h.position[0, 0]).norm())
        assert r == pytest.approx(0.1, abs=5e-3)
    # The largest separation of the second half-orbit (apocentre, 1.9) is reached at t = T.
    sep = kepler_runs["separation"]
    n = len(sep)
    k = int(np.argmax(sep[n // 2:])) + n // 2 + 1
    t_apo = k * T / n
    assert t_apo == pytest.approx(T, rel=3e-3)
    assert max(sep) == pytest.approx(1.9, abs=1e-4)
    assert min(sep) == pytest.approx(0.1, abs=2e-3)


# ---------------------------------------------------------------- initial conditions


@pytest.mark.parametrize("start", ["apocentre", "pericentre"])
def test_kepler_orbits_frame_energy_and_apsides(start):
    G = 1.3
    a = torch.tensor([1.0, 2.5, 0.7], dtype=F64)
    e = torch.tensor([0.3, 0.9, 0.0], dtype=F64)
    m1 = torch.tensor([1.0, 0.5, 3.0], dtype=F64)
    m2 = torch.tensor([1.0, 2.0, 0.1], dtype=F64)
    angle = torch.tensor([0.4, 2.0, -1.0], dtype=F64)
    s, period = ics.kepler_orbits(a, e, m1, m2, G=G, start=start, angle=angle)
    assert s.position.shape == (3, 2, 2) and s.dtype == F64
    torch.testing.assert_close(s.mass, torch.stack([m1, m2], -1))
    # Centre-of-mass frame.
    assert float((s.mass[..., None] * s.position).sum(1).abs().max()) < 1e-14
    assert float((s.mass[..., None] * s.velocity).sum(1).abs().max()) < 1e-14
    g = Gravity(G=G)
    torch.testing.assert_close(total_energy(s, g), -G * m1 * m2 / (2 * a), rtol=1e-13, atol=0)
    rel = s.position[:, 1] - s.position[:, 0]
    rel_v = s.velocity[:, 1] - s.velocity[:, 0]
    r_expected = a * (1 + e) if start == "apocentre" else a * (1 - e)
    torch.testing.assert_close(rel.norm(dim=-1), r_expected, rtol=1e-13, atol=0)
    # At an apsis the velocity is perpendicular to the separation.
    assert float((rel * rel_v).sum(-1).abs().max()) < 1e-13
    # Specific angular momentum sqrt(G M a (1 - e^2)), counter-clockwise; line of apsides at `angle`.
    h = rel[:, 0] * rel_v[:, 1] - rel[:, 1] * rel_v[:, 0]
    torch.testing.assert_close(h, torch.sqrt(G * (m1 + m2) * a * (1 - e**2)), rtol=1e-13, atol=1e-14)
    phi = torch.atan2(rel[:, 1], rel[:, 0])
    torch.testing.assert_close(torch.remainder(phi - angle + math.pi, 2 * math.pi) - math.pi,
                               torch.zeros(3, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(period, 2 * math.pi * torch.sqrt(a**3 / (G * (m1 + m2))), rtol=1e-14, atol=0)


def test_kepler_orbits_rejects_bad_arguments():
    one = torch.tensor(1.0)
    with pytest.raises(ValueError):
        ics.kepler_orbits(one, torch.tensor(1.0), one, one)
    with pytest.raises(ValueError):
        ics.kepler_orbits(torch.tensor(-1.0), torch.tensor(0.5), one, one)
    with pytest.raises(ValueError):
        ics.kepler_orbits(one, torch.tensor(0.5), one, one, start="sideways")


def _recover_a_e(state: State, m1: float, m2: float, G: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """a from the energy, e from the (apocentre) separation a (1 + e)."""
    energy = total_energy(state, Gravity(G=G))
    a = -G * m1 * m2 / (2 * energy)
    r = (state.position[:, 1] - state.position[:, 0]).norm(dim=-1)
    return a, r / a - 1


def test_kepler_ensemble_is_seeded_and_within_ranges():
    s1, p1 = ics.kepler_ensemble(64, e_range=(0.2, 0.8), a_range=(0.5, 2.0), seed=11)
    s2, p2 = ics.kepler_ensemble(64, e_range=(0.2, 0.8), a_range=(0.5, 2.0), seed=11)
    s3, _ = ics.kepler_ensemble(64, e_range=(0.2, 0.8), a_range=(0.5, 2.0), seed=12)
    assert torch.equal(s1.position, s2.position) and torch.equal(s1.velocity, s2.velocity) and torch.equal(p1, p2)
    assert not torch.allclose(s1.position, s3.position)
    a, e = _recover_a_e(s1, 1.0, 1.0)
    assert bool(((a > 0.5 - 1e-12) & (a < 2.0 + 1e-12)).all()), a
    assert bool(((e > 0.2 - 1e-10) & (e < 0.8 + 1e-10)).all()), e
    # Stratified: both ranges spanned edge to edge whatever the seed, one orbit per stratum.
    for seed in range(6):
        _, e_seed = _recover_a_e(ics.kepler_ensemble(64, e_range=(0.0, 0.99), a_range=(0.5, 2.0), seed=seed)[0], 1.0,
                                 1.0)
        assert float(e_seed.min()) == pytest.approx(0.0, abs=1e-9) and float(e_seed.max()) == pytest.approx(0.99)
    assert float(e.min()) == pytest.approx(0.2) and float(e.max()) == pytest.approx(0.8)
    assert float(a.min()) == pytest.approx(0.5) and float(a.max()) == pytest.approx(2.0)
    strata = torch.floor((e - 0.2) / 0.6 * 64).long().clamp(0, 63)
    assert int(torch.bincount(strata, minlength=64).max()) <= 2  # stretched strata: at most 2 share one
    phi = torch.atan2(s1.position[:, 1, 1], s1.position[:, 1, 0])
    assert float(phi.max() - phi.min()) > math.pi
    torch.testing.assert_close(p1, 2 * math.pi * torch.sqrt(a**3 / 2.0), rtol=1e-10, atol=0)
    # Centre-of-mass frame for every member.
    assert float((s1.mass[..., None] * s1.velocity).sum(1).abs().max()) < 1e-14


def test_kepler_ensemble_dim3_pads_with_zeros():
    s2, _ = ics.kepler_ensemble(8, e_range=(0.0, 0.9), a_range=(0.5, 2.0), seed=3, m1=2.0, m2=0.5)
    s3, _ = ics.kepler_ensemble(8, e_range=(0.0, 0.9), a_range=(0.5, 2.0), seed=3, m1=2.0, m2=0.5, dim=3)
    assert s3.dim == 3
    assert torch.equal(s3.position[..., :2], s2.position) and torch.equal(s3.velocity[..., :2], s2.velocity)
    assert torch.equal(s3.position[..., 2], torch.zeros(8, 2, dtype=F64))
    assert torch.equal(s3.velocity[..., 2], torch.zeros(8, 2, dtype=F64))
    torch.testing.assert_close(total_energy(s3, Gravity()), total_energy(s2, Gravity()), rtol=1e-15, atol=0)


def test_plummer_sphere_henon_units():
    s = ics.plummer_sphere(8, seed=5, batch=3)
    assert s.position.shape == (3, 8, 3) and s.dtype == F64
    torch.testing.assert_close(s.mass.sum(-1), torch.ones(3, dtype=F64))
    assert bool((s.mass == 1.0 / 8).all())
    g = Gravity()
    torch.testing.assert_close(total_energy(s, g), torch.full((3,), -0.25, dtype=F64), rtol=1e-12, atol=0)
    kin, pot = kinetic_energy(s), potential_energy(s, g)
    torch.testing.assert_close(2 * kin / -pot, torch.ones(3, dtype=F64), rtol=1e-12, atol=0)
    assert float((s.mass[..., None] * s.velocity).sum(1).abs().max()) < 1e-14
    assert float((s.mass[..., None] * s.position).sum(1).abs().max()) < 1e-14
    # Seeded, and the members of a batch differ.
    again = ics.plummer_sphere(8, seed=5, batch=3)
    other = ics.plummer_sphere(8, seed=6, batch=3)
    assert torch.equal(again.position, s.position) and not torch.allclose(other.position, s.position)
    assert not torch.allclose(s.position[0], s.position[1])
    with pytest.raises(ValueError):
        ics.plummer_sphere(1, seed=0)
    with pytest.raises(ValueError):
        ics.plummer_sphere(8, seed=0, dim=2)


def test_figure_eight_and_pythagorean_energies():
    g = Gravity()
    f8 = ics.figure_eight()
    assert f8.position.shape == (1, 3, 2)
    assert float(total_energy(f8, g)[0]) == pytest.approx(-1.2871419917663258, abs=1e-9)
    assert float(f8.velocity.sum(1).abs().max()) < 1e-8  # zero total momentum (unit masses)
    assert float(f8.position.sum(1).abs().max()) < 1e-8
    assert ics.FIGURE_EIGHT_PERIOD == pytest.approx(6.3259, abs=1e-4)
    py = ics.pythagorean()
    # -G (3*4/5 + 3*5/4 + 4*5/3): the 3-4-5 triangle, all at rest.
    assert float(total_energy(py, g)[0]) == pytest.approx(-(12 / 5 + 15 / 4 + 20 / 3), rel=1e-14)
    assert float(total_energy(py, g)[0]) == pytest.approx(-12.816666666666666, rel=1e-14)
    assert torch.equal(py.velocity, torch.zeros_like(py.velocity))
    assert torch.equal(py.mass, torch.tensor([[3.0, 4.0, 5.0]], dtype=F64))
    assert float((py.mass[..., None] * py.position).sum(1).abs().max()) < 1e-14
    for build in (ics.figure_eight, ics.pythagorean):
        s2, s3 = build(), build(dim=3)
        assert s3.dim == 3 and torch.equal(s3.position[..., :2], s2.position)
        assert torch.equal(s3.position[..., 2], torch.zeros(1, 3, dtype=F64))
        assert float(total_energy(s3, g)[0]) == pytest.approx(float(total_energy(s2, g)[0]), rel=1e-15)
    with pytest.raises(ValueError):
        ics.figure_eight(dim=1)


def test_float32_builders():
    s, _ = ics.kepler_ensemble(4, e_range=(0.0, 0.5), a_range=(1.0, 2.0), seed=0, dtype=torch.float32)
    assert s.dtype == torch.float32 and s.mass.dtype == torch.float32
    assert ics.plummer_sphere(4, seed=0, dtype=torch.float32).dtype == torch.float32


def test_free_fall_three_body_ensemble():
    s = ics.free_fall_three_body(16, seed=2, mass_range=(1.0, 5.0))
    assert s.position.shape == (16, 3, 2) and s.dtype == F64
    assert bool(((s.mass >= 1.0) & (s.mass <= 5.0)).all())
    assert torch.equal(s.velocity, torch.zeros_like(s.velocity))
    assert float((s.mass[..., None] * s.position).sum(1).abs().max()) < 1e-13
    assert bool((total_energy(s, Gravity()) < 0).all())  # at rest: bound
    again = ics.free_fall_three_body(16, seed=2, mass_range=(1.0, 5.0))
    other = ics.free_fall_three_body(16, seed=3, mass_range=(1.0, 5.0))
    assert torch.equal(again.position, s.position) and not torch.allclose(other.position, s.position)
    s3 = ics.free_fall_three_body(16, seed=2, mass_range=(1.0, 5.0), dim=3)
    assert torch.equal(s3.position[..., :2], s.position) and not bool(s3.position[..., 2].any())
