"""Batched N-body physics: state, gravity, energy, the KDK step, initial conditions, dt baselines.

Knows nothing of networks, training, storage or orchestration.
"""

from nbody_dt.physics.gravity import Gravity, accelerations, pair_freefall_times, total_energy
from nbody_dt.physics.integrator import kdk_step, relative_energy_error
from nbody_dt.physics.state import State

__all__ = [
    "Gravity",
    "State",
    "accelerations",
    "kdk_step",
    "pair_freefall_times",
    "relative_energy_error",
    "total_energy",
]
