"""Classical dt policies: fixed, pairwise free-fall, reject/retry controller, error series, per-step oracle.

A policy advances one system (B = 1) by one accepted step and reports what it cost.
The learned policy (model layer) follows the same protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from nbody_dt.physics.crossing import first_crossing
from nbody_dt.physics.error_series import error_series_dt
from nbody_dt.physics.gravity import Gravity, min_freefall_time, total_energy
from nbody_dt.physics.integrator import kdk_step, relative_energy_error, step_error
from nbody_dt.physics.state import State


@dataclass(frozen=True)
class Advance:
    """One accepted step: the new state, its dt and error, and the force evaluations it cost."""

    state: State
    dt: float
    rel_dE: float
    force_evaluations: int


class DtPolicy(Protocol):
    def advance(self, state: State, max_dt: float) -> Advance:
        """Take one accepted step of at most max_dt from `state` (B = 1)."""
        ...


def _one_step(state: State, dt: float, gravity: Gravity) -> tuple[State, float]:
    """One KDK step of a single system by a scalar dt, and its relative energy error."""
    after, err = step_error(state, torch.full((state.batch_size,), dt, dtype=state.dtype, device=state.device),
                            gravity)
    return after, float(err[0])


@dataclass
class FixedDt:
    dt: float
    gravity: Gravity

    def advance(self, state: State, max_dt: float) -> Advance:
        dt = min(self.dt, max_dt)
        after, err = _one_step(state, dt, self.gravity)
        return Advance(after, dt, err, 1)


@dataclass
class FreeFall:
    """dt = eta * min over pairs sqrt(r^3 / (G (m_i + m_j)))."""

    eta: float
    gravity: Gravity

    def advance(self, state: State, max_dt: float) -> Advance:
        dt = min(self.eta * float(min_freefall_time(state, self.gravity)[0]), max_dt)
        after, err = _one_step(state, dt, self.gravity)
        return Advance(after, dt, err, 1)


@dataclass
class StepController:
    """Reject/retry control on the single-step relative energy error.

    A try with err >= tolerance is rejected and retried with dt scaled by
    clip(safety * (tolerance / err)^(1/3), 1/4, 2) (< 1 on failure); an accepted step sets the
    next trial dt the same way. Every try, rejected or not, costs one force evaluation.
    """

    tolerance: float
    gravity: Gravity
    safety: float = 0.9
    initial_eta: float = 0.01
    next_dt: float | None = None

    def _factor(self, err: float) -> float:
        if not math.isfinite(err):
            return 0.25
        if err == 0.0:
            return 2.0
        return min(2.0, max(0.25, self.safety * (self.tolerance / err) ** (1.0 / 3.0)))

    def advance(self, state: State, max_dt: float) -> Advance:
        if self.next_dt is None:
            self.next_dt = self.initial_eta * float(min_freefall_time(state, self.gravity)[0])
        tries = 0
        while True:
            dt = min(self.next_dt, max_dt)
            after, err = _one_step(state, dt, self.gravity)
            tries += 1
            factor = self._factor(err)
            if err < self.tolerance:
                if dt == self.next_dt:  # a step shortened to land on t_end proposes nothing new
                    self.next_dt = dt * factor
                return Advance(after, dt, err, tries)
            self.next_dt = dt * factor  # factor <= safety < 1 whenever err >= tolerance


@dataclass
class ErrorSeries:
    """dt = safety x the dt at which the Taylor series (in dt, to `order`) of the step's own energy
    error reaches the tolerance: a predictor from the start state, one force evaluation a step (the
    series' arithmetic, compiled on the CPU 0.4-0.9x a force evaluation's wall time, is not counted,
    as the network's is not for the learned policy; benchmarks/README.md, "An error series" and "A
    compiled series")."""

    tolerance: float
    gravity: Gravity
    safety: float = 0.9
    order: int = 12

    def advance(self, state: State, max_dt: float) -> Advance:
        dt = min(self.safety * float(error_series_dt(state, self.gravity, self.tolerance, self.order)[0]), max_dt)
        after, err = _one_step(state, dt, self.gravity)
        return Advance(after, dt, err, 1)


def oracle_dt(
    state: State,
    gravity: Gravity,
    threshold: float,
    grid_ratio: float = 1.05,
    span: tuple[float, float] = (1e-5, 10.0),
    refinements: int = 2,
    points: int = 16,
) -> torch.Tensor:
    """The per-step oracle: for each system the end of the FIRST dt interval, growing from 0,
    on which the single-step relative energy error stays below `threshold`.

    The error is not monotone in dt (chance cancellations open windows of small error at
    large dt), so instead of bisecting over a wide bracket this scans a geometric grid of
    dt (ratio `grid_ratio`, spanning `span` times the smallest pair free-fall time) from small
    to large, takes the first failing grid point, and refines the bracket [last pass, first
    fail] `refinements` times with `points` interior points each. Vectorized over B and the grid.
    Returns dt of shape (B,).
    """
    b = state.batch_size
    t_ff = min_freefall_time(state, gravity)
    n_grid = int(math.ceil(math.log(span[1] / span[0]) / math.log(grid_ratio))) + 1
    factors = span[0] * grid_ratio ** torch.arange(n_grid, dtype=state.dtype, device=state.device)
    e0 = total_energy(state, gravity)

    def errors(dts: torch.Tensor) -> torch.Tensor:
        """Single-step errors for dts of shape (B, K): every system at K trial steps."""
        k = dts.shape[1]
        expanded = state.repeat_interleave(k)
        after = kdk_step(expanded, dts.reshape(-1), gravity)
        err = relative_energy_error(e0.repeat_interleave(k), total_energy(after, gravity)).reshape(b, k)
        return torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))

    scale = t_ff.clone()
    while True:
        grid = scale[:, None] * factors[None, :]
        fails = errors(grid) >= threshold
        first_pass_fails = fails[:, 0]
        if not bool(first_pass_fails.any()):
            break
        # Even the smallest trial step fails for some systems: look at smaller steps there.
        scale = torch.where(first_pass_fails, scale * span[0], scale)
        if bool((scale < t_ff * 1e-30).any()):
            raise FloatingPointError("oracle found no admissible dt (is the state singular?)")
    return first_crossing(errors, grid, fails, threshold, refinements, points)


@dataclass
class Oracle:
    """Steps with the per-step oracle dt; one force evaluation per step (an idealized cost)."""

    threshold: float
    gravity: Gravity

    def advance(self, state: State, max_dt: float) -> Advance:
        dt = min(float(oracle_dt(state, self.gravity, self.threshold)[0]), max_dt)
        after, err = _one_step(state, dt, self.gravity)
        return Advance(after, dt, err, 1)
