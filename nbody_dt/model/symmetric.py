"""A time-symmetric learned step: the network's dt made reversible without extra force evaluations.

A KDK step by dt from (x0, v0) drifts with v_half = v0 + dt/2 a(x0) from x0 to x1 = x0 + dt v_half.
The drift depends only on dt and on the force at x0 (the previous step's end kick), and the
reversed step from (x1, -v1) drifts along the same segment with -v_half. The symmetric step takes
the dt that solves

    log dt = log dt_scale + mean over s in [0, 1] of log h_even(x0 + s dt v_half, v_half),
    h_even(x, v) = sqrt(h(x, v) h(x, -v)),

with h the network's dt (it reads the radial cosine, so it is not even in v on its own) and the
mean by Simpson's rule (s = 0, 1/2, 1). The same dt solves the reversed step's equation, so
reversing the velocities retraces the steps (to the iteration's tolerance, ITERATION_TOL on
log dt). The mean along the drift, rather than h_even at its midpoint alone, smooths the narrow
features the network has at the apsides: with the midpoint alone the map was so sensitive there
that round-off grew until a 40-period run no longer came back, and the energy error drifted
(benchmarks/README.md, "Long-horizon energy"). The equation is solved by Newton iterations of
batched network calls (about 3 a step) and no force evaluation, so the step costs one force
evaluation, like the plain learned step. A model with history or substeps is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from nbody_dt.model.evaluate import StepCriteria
from nbody_dt.model.history import History
from nbody_dt.model.network import DtNetwork
from nbody_dt.physics.gravity import accelerations
from nbody_dt.physics.integrator import step_error
from nbody_dt.physics.policies import Advance
from nbody_dt.physics.state import State

ITERATION_TOL = 1e-12
"""|residual| of the equation for log dt at which the iteration stops: the reversibility tolerance."""
NEWTON_ITERATIONS = 8
DRIFT_NODES = (0.0, 0.5, 1.0)
DRIFT_WEIGHTS = (1 / 6, 4 / 6, 1 / 6)
"""Simpson's rule for the mean of log h_even along the drift (x0 + s dt v_half, v_half), s in [0, 1]."""


def even_log_dt(model: DtNetwork, position: torch.Tensor, velocity: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """log h_even (B,): the mean of the network's log dt at (x, v) and at (x, -v)."""
    both = State(torch.cat([position, position]), torch.cat([velocity, -velocity]), torch.cat([mass, mass]))
    log_dt = model.log_dt(both, History.empty(both, 0))
    b = position.shape[0]
    return 0.5 * (log_dt[:b] + log_dt[b:])


def symmetric_log_dt(model: DtNetwork, state: State, acceleration: torch.Tensor, dt_scale: float = 1.0,
                     guess: float | None = None) -> tuple[float, int]:
    """log dt of the symmetric step of one system (B = 1) and the network calls it took.

    Newton's method on r(u) = (the module docstring's right-hand side at dt = e^u) - u from `guess` (e.g. extrapolated
    from the previous steps; else log h_even at the state itself). Each iteration is one batched
    network call at u - w, u, u + w (w: the previous step's size), whose central differences give
    r' and r''. It stops when |r(u)| < ITERATION_TOL or when the Newton step's own error estimate,
    max(|r'' / 2 r'|, 1) step^2, is 10x below it (the max guards against a curvature that the
    width w underestimates). Where r is not clearly decreasing (r' = F' - 1 with F' small along
    an orbit) or Newton has not converged after NEWTON_ITERATIONS, bisection takes over.
    """
    x, v, m = state.position, state.velocity, state.mass
    log_scale = math.log(dt_scale)

    nodes = torch.tensor(DRIFT_NODES, dtype=x.dtype, device=x.device)
    weights = torch.tensor(DRIFT_WEIGHTS, dtype=x.dtype, device=x.device)

    def residuals(us: list[float]) -> list[float]:
        u = torch.tensor(us, dtype=x.dtype, device=x.device)
        dt = u.exp()[:, None, None, None]
        v_half = (v + 0.5 * dt * acceleration).expand(-1, len(DRIFT_NODES), -1, -1)
        points = x + nodes[None, :, None, None] * dt * v_half
        k = len(us) * len(DRIFT_NODES)
        log_h = even_log_dt(model, points.reshape(k, *x.shape[1:]), v_half.reshape(k, *x.shape[1:]),
                            m.expand(k, -1)).reshape(len(us), -1)
        return ((log_h * weights).sum(1) + log_scale - u).tolist()

    calls = 0
    if guess is None:
        guess, calls = float(even_log_dt(model, x, v, m)[0]) + log_scale, 1
    u, w = guess, 0.05
    for _ in range(NEWTON_ITERATIONS):
        r_lo, r, r_hi = residuals([u - w, u, u + w])
        calls += 1
        if abs(r) < ITERATION_TOL:
            return u, calls
        slope, curvature = (r_hi - r_lo) / (2 * w), (r_hi - 2 * r + r_lo) / w**2
        if not slope < -0.05:
            break
        step = -r / slope
        u += step
        if max(abs(curvature / (2 * slope)), 1.0) * step**2 < 0.1 * ITERATION_TOL:
            return u, calls
        w = max(abs(step), 1e-6)
    u, more = _bisect(residuals, u)
    return u, calls + more


def _bisect(residuals, u: float, points: int = 7) -> tuple[float, int]:
    """A root of r (r > 0 below it: dt too small) near u by bracketing and bisection, `points`
    interior points a network call; the root and the calls it took."""
    r, calls, width = residuals([u])[0], 1, 0.05
    lo = hi = u
    while True:
        lo, hi = (hi, hi + width) if r > 0 else (lo - width, lo)
        width *= 2
        calls += 1
        if (residuals([hi if r > 0 else lo])[0] > 0) != (r > 0):
            break
        if calls > 60:
            raise FloatingPointError(f"symmetric step: no sign change of the residual near log dt = {u:.4g}")
    while hi - lo > ITERATION_TOL:
        grid = [lo + (hi - lo) * k / (points + 1) for k in range(1, points + 1)]
        values = residuals(grid)
        calls += 1
        k = next((i for i, value in enumerate(values) if value <= 0), points)
        lo, hi = (grid[k - 1] if k else lo), (grid[k] if k < points else hi)
    return 0.5 * (lo + hi), calls


@dataclass
class SymmetricLearnedPolicy:
    """Time-symmetric steps with the network's dt (module docstring); no rejection, no history.

    dt_scale multiplies the network's dt (a looser or tighter tolerance than the trained one);
    network_evaluations counts the iterations' network calls (no force evaluations).
    """

    model: DtNetwork
    criteria: StepCriteria
    dt_scale: float = 1.0
    network_evaluations: int = 0
    _log_dts: list[float] = field(default_factory=list, repr=False)
    """The last two steps' log dt: the iteration's starting guess (the root does not depend on it)."""

    def __post_init__(self) -> None:
        if self.model.history_len or self.criteria.substeps != 1:
            raise ValueError("the symmetric learned step needs model.history_len = 0 and collect.substeps = 1")

    def advance(self, state: State, max_dt: float) -> Advance:
        # The force at the start is the previous step's end kick: counted there, not here.
        acc = accelerations(state.position, state.mass, self.criteria.gravity)
        with torch.no_grad():
            last = self._log_dts[-2:]
            guess = 2 * last[1] - last[0] if len(last) == 2 else (last[0] if last else None)
            log_dt, calls = symmetric_log_dt(self.model, state, acc, self.dt_scale, guess)
        self._log_dts = [*self._log_dts[-1:], log_dt]
        self.network_evaluations += calls
        dt = min(math.exp(log_dt), max_dt)
        dt_t = torch.full((state.batch_size,), dt, dtype=state.dtype, device=state.device)
        after, err = step_error(state, dt_t, self.criteria.gravity, self.criteria.substeps)
        return Advance(after, dt, float(err[0]), 1)
