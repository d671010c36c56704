"""The Taylor series of the KDK step's energy error (physics/error_series.py), the classical
'series' policy built on it, and the set network that corrects its dt (model.error_series)."""

from __future__ import annotations

import math

import pytest
import torch

from nbody_dt.config import ConfigError, load
from nbody_dt.model.policy import make_policy, run_problem
from nbody_dt.model.set_network import SetDtNetwork, pair_set_features
from nbody_dt.physics import initial_conditions as ics
from nbody_dt.physics.error_series import energy_error_series, error_series_dt, series_dt, step_series
from nbody_dt.physics.gravity import (
    Gravity,
    accelerations,
    kinetic_energy,
    min_freefall_time,
    potential_energy,
    total_energy,
)
from nbody_dt.physics.integrator import kdk_step
from nbody_dt.physics.policies import oracle_dt
from nbody_dt.physics.problems import make_problem
from nbody_dt.physics.state import State
from tests.conftest import LEGACY

SOFT = Gravity(1.0, 0.01)


def systems() -> tuple[State, Gravity]:
    """A Plummer sphere of 8 (softened), a hierarchical quadruple and a Kepler orbit at pericentre,
    padded to one batch of N = 8."""
    kepler, _ = ics.kepler_orbits(1.0, 0.9, 1.0, 0.5, start="pericentre", dim=3)
    return ics.pad_bodies([ics.plummer_sphere(8, 4), ics.hierarchical(1, 4, 7, dim=3), kepler], 8), SOFT


def test_the_series_is_the_steps_energy_error_and_starts_at_dt_cubed():
    state, g = systems()
    c = energy_error_series(state, g, 8)
    t_min = min_freefall_time(state, g)
    powers = torch.arange(9, dtype=c.dtype)
    scaled = c * t_min[:, None].pow(powers)  # the coefficients in units of t_min
    assert float(scaled[:, :3].abs().max()) < 1e-10  # second order: no h^0..h^2 term
    assert float(scaled[0, 3].abs()) > 1e-3  # the sphere's error starts at h^3 ...
    assert float(scaled[2, 3].abs()) < 1e-10 < float(scaled[2, 4].abs())  # ... a pericentre's at h^4 (symmetry)
    e0 = total_energy(state, g)
    for fraction in (0.01, 0.03, 0.1):
        h = fraction * t_min
        step = (total_energy(kdk_step(state, h, g), g) - e0) / e0.abs()
        series = (c * h[:, None].pow(powers)).sum(-1)
        # truncation error ~ h^9: tiny at 1 % of t_min, still small at 10 %
        bound = {0.01: 1e-6, 0.03: 1e-4, 0.1: 0.05}[fraction]
        assert float(((series - step).abs() / step.abs()).max()) < bound, fraction


def test_the_series_ignores_padding_and_the_order_of_the_bodies():
    sphere = ics.plummer_sphere(6, 2)
    padded = ics.pad_bodies([sphere], 9)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    shuffled = State(sphere.position[:, perm], sphere.velocity[:, perm], sphere.mass[:, perm])
    reference = energy_error_series(sphere, SOFT)
    # c_0..c_2 are round-off (~1e-16): compared absolutely, the rest relatively
    torch.testing.assert_close(energy_error_series(padded, SOFT), reference, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(energy_error_series(shuffled, SOFT), reference, rtol=1e-9, atol=1e-14)


def test_far_pairs_expanded_to_a_low_order_move_the_series_and_its_dt_little():
    sphere = ics.plummer_sphere(64, 3, 3)
    full = step_series(sphere, SOFT, 12, far_order=12).coefficients
    tiered = step_series(sphere, SOFT, 12, far_order=4).coefficients
    assert torch.equal(tiered[:, :5], full[:, :5])  # every pair's terms up to far_order are kept
    assert not torch.equal(tiered, full)  # the far pairs' higher terms are gone ...
    torch.testing.assert_close(tiered, full, rtol=1e-3, atol=0)  # ... and were small
    t_min = min_freefall_time(sphere, SOFT)
    ratio = series_dt(tiered, 2e-4, t_min) / series_dt(full, 2e-4, t_min)
    assert float((ratio - 1).abs().max()) < 2e-4
    # the tight pairs do not depend on the order of the bodies or on padding
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(2))
    shuffled = State(sphere.position[:, perm], sphere.velocity[:, perm], sphere.mass[:, perm])
    # (c_0..c_2 are round-off, ~1e-14 at N = 64: compared absolutely)
    torch.testing.assert_close(step_series(shuffled, SOFT).coefficients, tiered, rtol=1e-9, atol=1e-13)
    padded = ics.pad_bodies([sphere], 70)
    torch.testing.assert_close(step_series(padded, SOFT).coefficients, tiered, rtol=1e-12, atol=1e-13)


def test_the_start_terms_the_series_hands_on_are_the_physics_own():
    state, g = systems()
    start = step_series(state, g, 6)
    torch.testing.assert_close(start.acceleration, accelerations(state.position, state.mass, g), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(start.kinetic, kinetic_energy(state), rtol=1e-13, atol=0)
    torch.testing.assert_close(start.potential, potential_energy(state, g), rtol=1e-13, atol=0)
    i, j = torch.triu_indices(8, 8, offset=1)
    real = (state.mass[:, i] != 0) & (state.mass[:, j] != 0)
    r2 = ((state.position[:, j] - state.position[:, i]) ** 2).sum(-1)
    torch.testing.assert_close(start.separation2[real], r2[real], rtol=1e-13, atol=0)
    # and the set network's pair features read from them equal the features computed afresh
    for how in ("all", "system"):
        fresh, shared = pair_set_features(state, g, how, 4), pair_set_features(state, g, how, 4, start)
        for a, b in zip(fresh, shared):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_the_series_dt_is_the_oracles_dt():
    state, g = systems()
    ratio = error_series_dt(state, g, 2e-4) / oracle_dt(state, g, 2e-4)
    assert float(torch.log(ratio).abs().max()) < 0.05, ratio
    # a truncated series is not: order 4 misses what order 8 sees on at least one of them
    low = error_series_dt(state, g, 2e-4, order=4) / oracle_dt(state, g, 2e-4)
    assert float(torch.log(low).abs().max()) > float(torch.log(ratio).abs().max())


def test_the_series_dt_is_the_most_cautious_of_its_last_truncations():
    state, g = systems()
    c, t_min = energy_error_series(state, g, 12), min_freefall_time(state, g)
    each = torch.stack([series_dt(c[:, :k + 1], 2e-4, t_min, truncations=1) for k in range(8, 13)], 1)
    torch.testing.assert_close(series_dt(c, 2e-4, t_min), each.min(1).values, rtol=0, atol=0)
    assert series_dt(c, 2e-4, t_min).shape == (3,)


def test_the_series_dt_reads_a_known_polynomial_and_the_ends_of_its_span():
    """err = c3 dt^3 crosses 2e-4 at (2e-4 / c3)^(1/3); a series already over the threshold at the
    bottom of the span gives half of it, one that never reaches it the top (span 1e-3..10 x scale)."""
    c = torch.zeros(3, 5, dtype=torch.float64)
    c[:, 3] = torch.tensor([1.0, 1e30, 1e-30], dtype=torch.float64)
    dt = series_dt(c, 2e-4, torch.ones(3, dtype=torch.float64), truncations=1)
    assert float(dt[0]) == pytest.approx(2e-4 ** (1 / 3), rel=2e-5) and float(dt[0]) <= 2e-4 ** (1 / 3)
    assert float(dt[1]) == pytest.approx(0.5e-3, rel=1e-12)
    assert float(dt[2]) == pytest.approx(10.0, rel=1e-12)


def test_the_series_policy_steps_under_the_tolerance_with_fewer_evaluations_than_the_controller():
    problem = make_problem("kepler", e=0.9, periods=2)
    series = run_problem(problem, make_policy("series", problem, 2e-4), 2e-4)
    controller = run_problem(problem, make_policy("controller", problem, 2e-4), 2e-4)
    assert series.violations == 0
    assert series.steps < controller.steps


def series_network(hidden=(8, 8)) -> SetDtNetwork:
    torch.manual_seed(0)
    return SetDtNetwork(list(hidden), "silu", SOFT, error_series=12, threshold=2e-4)


def test_the_set_network_corrects_the_series_dt_and_stays_permutation_invariant():
    state, g = systems()
    model = series_network()  # untrained: series_fraction (0.87) of the series dt in every state
    torch.testing.assert_close(model(state), 0.87 * error_series_dt(state, g, 2e-4), rtol=1e-12, atol=0)
    with torch.no_grad():
        model.head[-1].weight.normal_(0.0, 3.0)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(2))
    shuffled = State(state.position[:, perm], state.velocity[:, perm], state.mass[:, perm])
    torch.testing.assert_close(model.log_dt(shuffled), model.log_dt(state), rtol=0, atol=1e-9)
    correction = (model.log_dt(state) - torch.log(error_series_dt(state, g, 2e-4))).detach()
    assert float(correction.abs().max()) > 1e-3  # the correction is live: the check above could fail
    assert bool((correction < 0).all())  # however large its weights, it never steps beyond the series' dt
    model.log_dt(state).sum().backward()  # the correction trains; the series carries no gradient
    assert model.head[-1].weight.grad is not None and float(model.head[-1].weight.grad.abs().sum()) > 0


def test_a_learned_policy_on_the_series_reads_it_at_the_tolerance_it_is_run_at():
    """Trained at 2e-4 and run at 5e-5, the network reads the series at 5e-5 (its correction, here
    the initial 0.87, kept) and holds the tighter tolerance; read at 2e-4 it would step 1.6x too far."""
    from nbody_dt.model.evaluate import StepCriteria

    problem = make_problem("plummer", n=8, seed=3, softening=0.01, t_end=0.5)
    criteria = StepCriteria.from_config(load(None, LEGACY + []))
    assert criteria.energy_threshold == 2e-4
    policy = make_policy("learned", problem, 5e-5, model=series_network(), criteria=criteria)
    first = policy.advance(problem.state, math.inf)
    assert first.dt == pytest.approx(0.87 * float(error_series_dt(problem.state, SOFT, 5e-5)[0]), rel=1e-12)
    assert first.dt < 0.7 * float(error_series_dt(problem.state, SOFT, 2e-4)[0])
    result = run_problem(problem, make_policy("learned", problem, 5e-5, model=series_network(), criteria=criteria),
                         5e-5)
    assert result.accepted_steps > 5 and result.violations == 0


@pytest.mark.parametrize("overrides, message", [
    (["model.error_series=8"], "only the set network with the attention pooling"),
    (["model.kind='set'", "model.error_series=8", "model.pair_prior='x.pt'"], "without a pair prior"),
    (["model.kind='set'", "model.error_series=8", "model.pooling='error_sum'"], "with the attention pooling"),
    (["model.kind='set'", "model.error_series=2"], "order must be 0 or at least 3, got 2"),
    (["model.kind='set'", "model.series_margin=0.01"], "series_margin: a margin below the error series' dt needs"),
    (["model.kind='set'", "model.error_series=8", "model.series_margin=0.2"], "must lie below 1 - series_margin"),
])
def test_config_refuses_an_error_series_it_cannot_use_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load(None, LEGACY + overrides)
    assert "\n" not in str(info.value)


def test_a_series_margin_caps_the_learned_dt_below_the_series_dt():
    from nbody_dt.model.set_network import build_network

    cfg = load(None, LEGACY + ["model.kind='set'", "model.hidden=[8]", "model.error_series=8",
                               "model.series_margin=0.05"])
    model = build_network(cfg, 2).for_gravity(SOFT)
    state, g = systems()
    series = error_series_dt(state, g, 2e-4, 8)
    torch.testing.assert_close(model(state), math.sqrt(0.84 * 0.9) * series, rtol=1e-12, atol=0)  # the same start
    with torch.no_grad():
        model.head[-1].bias.fill_(-30.0)  # the network asks for no shortening at all: the margin stays
    torch.testing.assert_close(model(state), 0.95 * series, rtol=1e-12, atol=0)


def test_the_network_reads_its_threshold_from_the_config():
    from nbody_dt.model.set_network import build_network

    cfg = load(None, LEGACY + ["model.kind='set'", "model.error_series=6", "collect.energy_threshold=1e-5",
                      "collect.accept_lower=1e-6"])
    model = build_network(cfg, 2)
    assert (model.error_series, model.threshold) == (6, 1e-5)
    # it starts at the centre of the margin loss's band on dt
    state, g = systems()
    torch.testing.assert_close(model.for_gravity(g)(state), math.sqrt(0.84 * 0.9) * error_series_dt(state, g, 1e-5, 6),
                               rtol=1e-12, atol=0)


@pytest.mark.usefixtures("prefect_server")
def test_a_mixture_run_on_the_series_trains_reloads_and_simulates_an_unseen_n(tmp_path, capsys):
    """The CLI trains a mixture run whose base is the error series; its checkpoint rebuilds the
    same network (order and threshold from the stored config) and simulates N = 12, never trained on."""
    import json

    from nbody_dt.cli import load_learned, main
    from tests.conftest import tiny_overrides

    mixture = ["model.kind='set'", "model.hidden=[8]", "model.error_series=10", "initial_conditions.kind='mixture'",
               "physics.dim=3", "physics.softening=0.01", "initial_conditions.families=['kepler', 'plummer']",
               "initial_conditions.family_n=[2, 5]", "initial_conditions.family_weights=[1.0, 1.0]",
               "initial_conditions.family_scale=[100.0, 1.0]", "initial_conditions.num_orbits=4",
               "collect.steps_per_epoch=3"]
    run_url = str(tmp_path / "series")
    overrides = [x for o in tiny_overrides() + mixture for x in ("--set", o)]
    assert main(["train", "--run-dir", run_url, *overrides, "--json"]) == 0
    model, _, cfg = load_learned(run_url)
    assert (model.error_series, model.threshold) == (10, cfg.collect.energy_threshold)
    sphere = ics.plummer_sphere(5, 11)
    base = torch.log(error_series_dt(sphere, SOFT, cfg.collect.energy_threshold, 10))
    correction = (model.for_gravity(SOFT).log_dt(sphere) - base).detach()
    assert float(correction.abs().max()) < 1.0  # a correction of the series, not a dt of its own
    capsys.readouterr()
    assert main(["simulate", "--policy", "learned", "--checkpoint", run_url, "--ic", "plummer", "--n", "12",
                 "--softening", "0.01", "--t-end", "0.02", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accepted_steps"] > 0
