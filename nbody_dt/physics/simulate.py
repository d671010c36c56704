"""Integrate one system to t_end with any dt policy and record what it cost."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from nbody_dt.physics.gravity import Gravity, total_energy
from nbody_dt.physics.policies import DtPolicy
from nbody_dt.physics.state import State


@dataclass
class SimulationResult:
    """Figures of one integration plus its time series (for plots)."""

    steps: int
    """Force evaluations, rejected tries included."""
    accepted_steps: int
    max_step_rel_dE: float
    final_rel_dE: float
    violations: int
    """Accepted steps whose single-step relative energy error is >= threshold."""
    t_end: float
    wall_s: float
    time: list[float] = field(default_factory=list)
    dt: list[float] = field(default_factory=list)
    step_rel_dE: list[float] = field(default_factory=list)
    total_rel_dE: list[float] = field(default_factory=list)
    positions: list[list[list[float]]] = field(default_factory=list)

    def summary(self) -> dict:
        """The scalar figures, JSON-ready."""
        return {
            "steps": self.steps,
            "accepted_steps": self.accepted_steps,
            "rejected_steps": self.steps - self.accepted_steps,
            "max_step_rel_dE": self.max_step_rel_dE,
            "final_rel_dE": self.final_rel_dE,
            "violations": self.violations,
            "t_end": self.t_end,
            "wall_s": self.wall_s,
        }


def simulate(
    state: State,
    policy: DtPolicy,
    gravity: Gravity,
    t_end: float,
    threshold: float,
    max_steps: int = 10_000_000,
    record: bool = True,
) -> SimulationResult:
    """Advance a single system (B = 1) from t = 0 to t_end; the last step is shortened to land on t_end."""
    if state.batch_size != 1:
        raise ValueError("simulate integrates one system at a time (B = 1)")
    start = time.perf_counter()
    e0 = float(total_energy(state, gravity)[0])
    t, steps, accepted, violations, max_err = 0.0, 0, 0, 0, 0.0
    result = SimulationResult(0, 0, 0.0, 0.0, 0, t_end, 0.0)
    if record:
        result.positions.append(state.position[0].tolist())
    tol_end = 1e-12 * max(abs(t_end), 1.0)
    with torch.no_grad():
        while t_end - t > tol_end:
            if accepted >= max_steps:
                raise RuntimeError(f"simulation exceeded {max_steps} steps before t_end={t_end} (reached t={t})")
            adv = policy.advance(state, t_end - t)
            if not adv.dt > 0:
                raise FloatingPointError(f"policy proposed a non-positive dt ({adv.dt}) at t={t}")
            state, t = adv.state, t + adv.dt
            steps += adv.force_evaluations
            accepted += 1
            violations += int(not adv.rel_dE < threshold)
            max_err = max(max_err, adv.rel_dE) if adv.rel_dE == adv.rel_dE else float("inf")
            if record:
                e = float(total_energy(state, gravity)[0])
                result.time.append(t)
                result.dt.append(adv.dt)
                result.step_rel_dE.append(adv.rel_dE)
                result.total_rel_dE.append(abs(e - e0) / abs(e0))
                result.positions.append(state.position[0].tolist())
    e_final = float(total_energy(state, gravity)[0])
    result.steps, result.accepted_steps, result.violations = steps, accepted, violations
    result.max_step_rel_dE = max_err
    result.final_rel_dE = abs(e_final - e0) / abs(e0)
    result.t_end = t
    result.wall_s = time.perf_counter() - start
    return result
