"""The kick-drift-kick (velocity Verlet) step: a pure function of an immutable state."""

from __future__ import annotations

import torch

from nbody_dt.physics.gravity import Gravity, accelerations, total_energy
from nbody_dt.physics.state import State


def kdk_step(state: State, dt: torch.Tensor, gravity: Gravity, substeps: int = 1) -> State:
    """Advance each system b by dt[b] with `substeps` KDK steps of dt[b]/substeps.

    dt has shape (B,) and may carry gradients; the result is a new State.
    One substep costs one force evaluation (the end kick's force is the next start kick's).
    """
    if dt.shape != (state.batch_size,):
        raise ValueError(f"dt must have shape ({state.batch_size},), got {tuple(dt.shape)}")
    h = (dt / substeps)[:, None, None]
    x, v, m = state.position, state.velocity, state.mass
    a = accelerations(x, m, gravity)
    for _ in range(substeps):
        v = v + 0.5 * h * a
        x = x + h * v
        a = accelerations(x, m, gravity)
        v = v + 0.5 * h * a
    return State(x, v, m)


def relative_energy_error(energy_before: torch.Tensor, energy_after: torch.Tensor) -> torch.Tensor:
    """|E1 - E0| / |E0| per system."""
    return (energy_after - energy_before).abs() / energy_before.abs()


def step_error(state: State, dt: torch.Tensor, gravity: Gravity, substeps: int = 1) -> tuple[State, torch.Tensor]:
    """One KDK step and its single-step relative energy error."""
    after = kdk_step(state, dt, gravity, substeps)
    return after, relative_energy_error(total_energy(state, gravity), total_energy(after, gravity))
