"""Named test problems (`nbody-dt simulate --ic`, the science benchmark): an initial condition,
its gravity and how long to integrate it, built from plain arguments."""

from __future__ import annotations

from dataclasses import dataclass

from nbody_dt.physics import initial_conditions as ics
from nbody_dt.physics.gravity import Gravity
from nbody_dt.physics.state import State

PROBLEMS = ("kepler", "figure8", "pythagorean", "plummer", "hierarchical")


@dataclass(frozen=True)
class Problem:
    """One initial condition and how long to integrate it."""

    state: State
    t_end: float
    gravity: Gravity


def make_problem(ic: str, *, e: float = 0.9, a: float = 1.0, m1: float = 1.0, m2: float = 1.0,
                 start: str = "apocentre", n: int = 16, seed: int = 1, periods: float | None = None,
                 t_end: float | None = None, G: float = 1.0, softening: float = 0.0, dim: int | None = None) -> Problem:
    """Kepler and figure-eight default to 10 and 5 periods; Pythagorean, Plummer and hierarchical (n
    bodies, an inner binary of a = 1 and outer companions: physics.initial_conditions.hierarchical)
    need t_end (default 10)."""
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
    elif ic == "hierarchical":
        state, horizon = ics.hierarchical(1, n, seed, G=G, dim=dim or 3), 10.0
    else:
        raise ValueError(f"unknown initial condition {ic!r} (choose from {', '.join(PROBLEMS)})")
    return Problem(state, horizon if t_end is None else t_end, gravity)
