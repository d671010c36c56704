"""The compiled CPU kernels (physics/series_kernel.py, model/pair_kernel.py) against the torch
implementations they replace on the CPU, which stay the reference (and the path on other devices)."""

from __future__ import annotations

import pytest
import torch

from nbody_dt.model.set_network import pair_set_features, pair_set_features_torch
from nbody_dt.physics import initial_conditions as ics
from nbody_dt.physics.error_series import series_dt, series_dt_torch, step_series, step_series_torch
from nbody_dt.physics.gravity import Gravity, min_freefall_time
from nbody_dt.physics.state import State

SOFT = Gravity(1.0, 0.01)


def mixed_batch() -> State:
    """A softened Plummer sphere of 8, a hierarchical quadruple and a Kepler orbit at pericentre,
    padded to one batch of N = 8 (zero-mass bodies)."""
    kepler, _ = ics.kepler_orbits(1.0, 0.9, 1.0, 0.5, start="pericentre", dim=3)
    return ics.pad_bodies([ics.plummer_sphere(8, 4), ics.hierarchical(1, 4, 7, dim=3), kepler], 8)


def planar_batch() -> State:
    """2-D systems: eccentric Kepler orbits at apocentre and the figure-eight."""
    kepler, _ = ics.kepler_orbits(1.0, torch.tensor([0.0, 0.7, 0.99]), 1.0, 0.5, angle=torch.tensor([0.0, 1.0, 2.0]))
    return ics.pad_bodies([kepler, ics.figure_eight()], 3)


def assert_series_equal(state: State, g: Gravity, **options) -> None:
    compiled, reference = step_series(state, g, **options), step_series_torch(state, g, **options)
    for name, a, b in zip(reference._fields, compiled, reference):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # c_0..c_2 and padded pairs' separations are round-off or arbitrary: compared against the largest entry
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13 * scale, msg=name)


@pytest.mark.parametrize("case", ["mixed", "planar", "plummer64", "plummer64_batch", "float32"])
def test_the_compiled_series_equals_the_torch_reference(case):
    state = {
        "mixed": mixed_batch,
        "planar": planar_batch,
        "plummer64": lambda: ics.plummer_sphere(64, 5),  # tiered: 12 % of its pairs expanded fully
        # rows with different counts of tight pairs: each takes the batch's largest count of its tightest
        "plummer64_batch": lambda: ics.plummer_sphere(64, 6, 3),
        "float32": lambda: ics.plummer_sphere(64, 7, 2),
    }[case]()
    g = Gravity(1.0, 0.0) if case == "planar" else SOFT
    assert_series_equal(state, g, order=12)
    if case == "plummer64_batch":
        assert_series_equal(state, g, order=12, tight_ratio=1e6)  # every pair tight: the full expansion
        assert_series_equal(state, g, order=8, far_order=3)
    if case == "float32":
        single = State(state.position.float(), state.velocity.float(), state.mass.float())
        out = step_series(single, g)
        assert out.coefficients.dtype == torch.float32
        assert bool(torch.isfinite(out.coefficients).all())  # the torch path overflows float32 here
        torch.testing.assert_close(out.coefficients.double(), step_series(state, g).coefficients, rtol=1e-5,
                                   atol=1e-7 * float(out.coefficients.abs().max()))


def test_the_compiled_series_dt_equals_the_torch_reference():
    states = [mixed_batch(), ics.plummer_sphere(16, 8, 4), ics.plummer_sphere(64, 9, 2)]
    for state in states:
        c, t_min = step_series(state, SOFT).coefficients, min_freefall_time(state, SOFT)
        for threshold in (1e-7, 2e-4, 1e-2):
            for truncations in (1, 5):
                torch.testing.assert_close(series_dt(c, threshold, t_min, truncations),
                                           series_dt_torch(c, threshold, t_min, truncations), rtol=1e-12, atol=0)
    # a row that never reaches the threshold (the span's top), one that reaches it at the first point
    # (half the span's bottom) and one in between
    c = torch.zeros(3, 13, dtype=torch.float64)
    c[1, 3], c[2, 3] = 1e12, 1.0
    scale = torch.ones(3, dtype=torch.float64)
    dt = series_dt(c, 2e-4, scale)
    torch.testing.assert_close(dt, series_dt_torch(c, 2e-4, scale), rtol=1e-12, atol=0)
    assert dt[0] == 10.0 and dt[1] == 5e-4 and 0.05 < dt[2] < 0.06  # (2e-4)^(1/3) = 0.0585


@pytest.mark.parametrize("how", ["system", "all"])
def test_the_compiled_pair_features_equal_the_torch_reference(how):
    for state, k in [(mixed_batch(), 4), (mixed_batch(), 40), (ics.plummer_sphere(64, 10, 2), 8)]:
        if how == "all" and state.num_bodies > 8:
            continue
        for start in (step_series(state, SOFT), None):
            compiled = pair_set_features(state, SOFT, how, k, start)
            reference = pair_set_features_torch(state, SOFT, how, k, start)
            assert torch.equal(compiled.mask, reference.mask)
            for name in ("features", "t_min", "t_ff", "energy_share"):
                a, b = getattr(compiled, name), getattr(reference, name)
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
