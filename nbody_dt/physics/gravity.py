"""Newtonian gravity with optional Plummer softening, vectorized over the batch.

A body of zero mass is padding: systems of different N share a batch as (B, N_max, D) with the
missing bodies at mass 0. Padding exerts and feels no force and adds no energy, and no inf or
NaN is ever formed for it (padded bodies may coincide), so a padded system evolves exactly as
the same system without its padding.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from nbody_dt.physics.state import State


@dataclass(frozen=True)
class Gravity:
    """The force law: G and the Plummer softening length epsilon."""

    G: float = 1.0
    softening: float = 0.0


def _pair_geometry(position: torch.Tensor, mass: torch.Tensor,
                   softening: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Separations dx[b,i,j] = x_j - x_i, softened r^2 and the mask of real pairs (i != j, both
    bodies present, i.e. of non-zero mass)."""
    n = position.shape[1]
    dx = position[:, None, :, :] - position[:, :, None, :]
    present = mass != 0
    real = ~torch.eye(n, dtype=torch.bool, device=position.device) & present[:, :, None] & present[:, None, :]
    r2 = (dx * dx).sum(-1) + softening * softening
    # The diagonal and padding are replaced by 1 so that no inf/NaN is ever formed (gradients stay finite).
    r2 = torch.where(real, r2, torch.ones_like(r2))
    return dx, r2, real


def accelerations(position: torch.Tensor, mass: torch.Tensor, gravity: Gravity) -> torch.Tensor:
    """a_i = G sum_j m_j (x_j - x_i) / (|x_j - x_i|^2 + eps^2)^(3/2); shape (B, N, D)."""
    dx, r2, real = _pair_geometry(position, mass, gravity.softening)
    weight = torch.where(real, mass[:, None, :] * r2.pow(-1.5), torch.zeros_like(r2))
    return gravity.G * (weight[..., None] * dx).sum(2)


def kinetic_energy(state: State) -> torch.Tensor:
    return 0.5 * (state.mass * (state.velocity * state.velocity).sum(-1)).sum(-1)


def potential_energy(state: State, gravity: Gravity) -> torch.Tensor:
    """-G sum_{i<j} m_i m_j / sqrt(r_ij^2 + eps^2); shape (B,)."""
    _, r2, real = _pair_geometry(state.position, state.mass, gravity.softening)
    mm = state.mass[:, :, None] * state.mass[:, None, :]
    pair = torch.where(real, mm * r2.rsqrt(), torch.zeros_like(r2))
    return -0.5 * gravity.G * pair.sum((-1, -2))


def total_energy(state: State, gravity: Gravity) -> torch.Tensor:
    """Kinetic plus potential energy of each system, shape (B,)."""
    return kinetic_energy(state) + potential_energy(state, gravity)


@functools.lru_cache(maxsize=16)
def pair_indices(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs i < j of n bodies, (P,) each, in `torch.triu_indices` order: the pair order of every
    per-pair array. Cached (at N = 1024 building them costs milliseconds); never modify them."""
    i, j = torch.triu_indices(n, n, offset=1, device=device)
    return i, j


def pair_freefall_times(state: State, gravity: Gravity) -> torch.Tensor:
    """sqrt(r_ij^3 / (G (m_i + m_j))) for every pair i < j, shape (B, N(N-1)/2), unsoftened;
    +inf for a pair with a padded (zero-mass) body."""
    n = state.num_bodies
    i, j = pair_indices(n, state.device)
    dx = state.position[:, j] - state.position[:, i]
    r = dx.norm(dim=-1)
    m = state.mass[:, i] + state.mass[:, j]
    t = torch.sqrt(r.pow(3) / (gravity.G * m))
    real = (state.mass[:, i] != 0) & (state.mass[:, j] != 0)
    return torch.where(real, t, torch.full_like(t, math.inf))


def min_freefall_time(state: State, gravity: Gravity) -> torch.Tensor:
    """The smallest pairwise free-fall time of each system, shape (B,)."""
    return pair_freefall_times(state, gravity).min(-1).values
