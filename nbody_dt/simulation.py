"""Simulate a named problem with a named dt policy: what `nbody-dt simulate` and the science
benchmark run. Builds initial conditions and policies from plain arguments."""

from __future__ import annotations

from dataclasses import dataclass, replace

from nbody_dt.model.evaluate import StepCriteria
from nbody_dt.model.network import DtNetwork
from nbody_dt.model.policy import LearnedPolicy
from nbody_dt.physics import initial_conditions as ics
from nbody_dt.physics.gravity import Gravity
from nbody_dt.physics.policies import DtPolicy, FixedDt, FreeFall, Oracle, StepController
from nbody_dt.physics.simulate import SimulationResult, simulate
from nbody_dt.physics.state import State

PROBLEMS = ("kepler", "figure8", "pythagorean", "plummer")
POLICIES = ("fixed", "freefall", "controller", "oracle", "learned")


@dataclass(frozen=True)
class Problem:
    """One initial condition and how long to integrate it."""

    state: State
    t_end: float
    gravity: Gravity


def make_problem(ic: str, *, e: float = 0.9, a: float = 1.0, m1: float = 1.0, m2: float = 1.0,
                 start: str = "apocentre", n: int = 16, seed: int = 1, periods: float | None = None,
                 t_end: float | None = None, G: float = 1.0, softening: float = 0.0, dim: int | None = None) -> Problem:
    """Kepler and figure-eight default to 10 and 5 periods; Pythagorean and Plummer need t_end (default 10)."""
    gravity = Gravity(G, softening)
    if ic == "kepler":
        state, period = ics.kepler_orbits(a, e, m1, m2, G=G, start=start, dim=dim or 2)
        horizon = float(period[0]) * (10.0 if periods is None else periods)
    elif ic == "figure8":
        state = ics.figure_eight(dim or 2)
        horizon = ics.FIGURE_EIGHT_PERIOD * (5.0 if periods is None else periods)
    elif ic == "pythagorean":
        state, horizon = ics.pythagorean(dim or 2), 10.0
    elif ic == "plummer":
        state, horizon = ics.plummer_sphere(n, seed, 1, dim or 3), 10.0
    else:
        raise ValueError(f"unknown initial condition {ic!r} (choose from {', '.join(PROBLEMS)})")
    return Problem(state, horizon if t_end is None else t_end, gravity)


def make_policy(name: str, problem: Problem, threshold: float, *, dt: float | None = None, eta: float | None = None,
                safety: float = 0.9, model: DtNetwork | None = None, criteria: StepCriteria | None = None) -> DtPolicy:
    g = problem.gravity
    if name == "fixed":
        return FixedDt(dt, g)
    if name == "freefall":
        return FreeFall(eta, g)
    if name == "controller":
        return StepController(threshold, g, safety=safety)
    if name == "oracle":
        return Oracle(threshold, g)
    if name == "learned":
        # The network keeps the features and normalization it was trained with; the step
        # itself uses this problem's gravity and threshold.
        return LearnedPolicy(model, replace(criteria, gravity=g, energy_threshold=threshold, accept_lower=0.0))
    raise ValueError(f"unknown policy {name!r} (choose from {', '.join(POLICIES)})")


def run_problem(problem: Problem, policy: DtPolicy, threshold: float, record: bool = True) -> SimulationResult:
    state = problem.state
    if isinstance(policy, LearnedPolicy):
        p = next(policy.model.parameters())
        state = state.to(device=p.device, dtype=p.dtype)
    return simulate(state, policy, problem.gravity, problem.t_end, threshold, record=record)
