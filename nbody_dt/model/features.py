"""Network inputs from a state batch and its history window.

- basic: centre-of-mass positions and velocities divided by the stored length and velocity
  scales, and mass fractions (the seed's inputs).
- rich: physically scale-free pair features, pairs sorted by free-fall time: log(v^2 r / G m),
  log|1 - v^2 r / 2 G m| (log r / 2a for a bound pair), the radial cosine r.v / (|r||v|)
  (tells inbound from outbound), log(t_ff / min t_ff), the
  pair's mass fraction and log1p(eps^2 / r^2) for softening.
- delta_mag: rich plus, per history slot and body, log1p of |x - x_k| / L and |v - v_k| / V.

With history length K > 0, basic and rich append the same features of each past state;
slots before the first step are zero. Scales (length, velocity, acceleration, time) are
derived once from the training states and stored with the model.
"""

from __future__ import annotations

import torch

from nbody_dt.model.history import History
from nbody_dt.physics.gravity import Gravity, accelerations, pair_indices
from nbody_dt.physics.state import State

_TINY = 1e-30


def derive_scales(state: State, gravity: Gravity) -> torch.Tensor:
    """(length, velocity, acceleration, time) of a set of systems: mean RMS radius from the
    centre of mass, mean RMS |a|, T = sqrt(L / A), and V = mean RMS speed (L / T if all at rest)."""
    mtot = state.mass.sum(-1, keepdim=True)
    com = (state.mass[..., None] * state.position).sum(1, keepdim=True) / mtot[..., None]
    length = ((state.position - com).pow(2).sum(-1).mean(-1).sqrt()).mean()
    acc = accelerations(state.position, state.mass, gravity).pow(2).sum(-1).mean(-1).sqrt().mean()
    time = torch.sqrt(length / acc)
    speed = state.velocity.pow(2).sum(-1).mean(-1).sqrt().mean()
    velocity = torch.where(speed > 0, speed, length / time)
    return torch.stack([length, velocity, acc, time])


def feature_dim(kind: str, num_bodies: int, dim: int, history_len: int) -> int:
    pairs = num_bodies * (num_bodies - 1) // 2
    basic = 2 * num_bodies * dim
    rich = 6 * pairs
    if kind == "basic":
        return basic * (1 + history_len) + num_bodies
    if kind == "rich":
        return rich * (1 + history_len)
    if kind == "delta_mag":
        return rich + 2 * num_bodies * history_len
    raise ValueError(f"unknown feature kind {kind!r}")


def _centred(position: torch.Tensor, velocity: torch.Tensor, mass: torch.Tensor):
    w = (mass / mass.sum(-1, keepdim=True))[..., None]
    return position - (w * position).sum(-2, keepdim=True), velocity - (w * velocity).sum(-2, keepdim=True)


def _basic(position: torch.Tensor, velocity: torch.Tensor, mass: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    x, v = _centred(position, velocity, mass)
    return torch.cat([(x / scales[0]).flatten(1), (v / scales[1]).flatten(1)], 1)


def pair_features(
    position: torch.Tensor, velocity: torch.Tensor, mass: torch.Tensor, gravity: Gravity
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale-free features (B, P, 6) of all pairs, sorted by free-fall time, and min t_ff (B,)."""
    n = position.shape[1]
    i, j = pair_indices(n, position.device)
    dx = position[:, j] - position[:, i]
    dv = velocity[:, j] - velocity[:, i]
    r2 = (dx * dx).sum(-1)
    v2 = (dv * dv).sum(-1)
    r = r2.sqrt()
    m = mass[:, i] + mass[:, j]
    gm = gravity.G * m
    t_ff = torch.sqrt(r2 * r / gm).clamp_min(_TINY)  # coincident bodies: tiny, not 0 (no 0/0)
    order = t_ff.argsort(-1)
    t_min = t_ff.gather(-1, order[:, :1])
    feats = torch.stack(
        [
            torch.log(v2 * r / gm + 1e-12),
            # log|1 - v^2 r / 2Gm| = log(r / 2a) on a Kepler orbit: separates e = 0.96 from 0.99 near
            # pericentre, where v^2 r / Gm is close to 2 for every eccentric orbit.
            torch.log(torch.abs(1 - 0.5 * v2 * r / gm) + 1e-4),
            (dx * dv).sum(-1) / (r * v2.sqrt() + _TINY),
            torch.log(t_ff / t_min),
            m / mass.sum(-1, keepdim=True),
            torch.log1p(gravity.softening**2 / (r2 + _TINY)),
        ],
        -1,
    )
    return feats.gather(1, order[..., None].expand_as(feats)), t_min[:, 0]


def compute_features(
    kind: str, state: State, history: History, gravity: Gravity, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (B, F) and the smallest pair free-fall time (B,) of each system."""
    pf, t_min = pair_features(state.position, state.velocity, state.mass, gravity)
    k = history.length
    if kind == "basic":
        parts = [_basic(state.position, state.velocity, state.mass, scales)]
        for s in range(k):
            f = _basic(history.position[:, s], history.velocity[:, s], state.mass, scales)
            parts.append(f * history.valid[:, s, None])
        parts.append(state.mass / state.mass.sum(-1, keepdim=True))
        return torch.cat(parts, 1), t_min
    parts = [pf.flatten(1)]
    if kind == "rich":
        for s in range(k):
            hp, _ = pair_features(history.position[:, s], history.velocity[:, s], state.mass, gravity)
            valid = history.valid[:, s, None]
            parts.append(torch.where(valid, hp.flatten(1), torch.zeros_like(hp.flatten(1))))
    elif kind == "delta_mag":
        valid = history.valid[..., None]
        dxm = (state.position[:, None] - history.position).norm(dim=-1) / scales[0]
        dvm = (state.velocity[:, None] - history.velocity).norm(dim=-1) / scales[1]
        parts += [(torch.log1p(dxm) * valid).flatten(1), (torch.log1p(dvm) * valid).flatten(1)]
    else:
        raise ValueError(f"unknown feature kind {kind!r}")
    return torch.cat(parts, 1), t_min
