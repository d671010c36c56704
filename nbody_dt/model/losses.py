"""Losses on the single-step relative energy error, zero inside the loss band [lower, upper].

Both are safe against non-finite errors: such a sample costs a finite penalty whose gradient
shrinks dt, and never produces a NaN gradient. Both weigh a sample above the band by
`overshoot_weight`: an overshoot risks a step over the tolerance, an undershoot only costs
force evaluations, so a weight > 1 makes the network cautious exactly where its dt is
uncertain (where the error is steep in dt, e.g. at pericentre of eccentric orbits).
"""

from __future__ import annotations

import math

import torch

_MIN_ERR = 1e-300


def _log_distance_outside(rel_dE: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Signed distance outside the band in log err: > 0 above upper, < 0 below lower, 0 inside."""
    log_err = torch.log(torch.where(torch.isfinite(rel_dE), rel_dE, torch.ones_like(rel_dE)).clamp_min(_MIN_ERR))
    return torch.relu(log_err - math.log(upper)) - torch.relu(math.log(lower) - log_err)


def _nonfinite_penalty(log_dt: torch.Tensor, penalty: float) -> torch.Tensor:
    """Value `penalty`; gradient penalty * d(log dt), i.e. a push towards smaller dt."""
    return penalty * (1.0 + log_dt - log_dt.detach())


def _weighted(distance: torch.Tensor, overshoot_weight: float) -> torch.Tensor:
    """1 below and inside the band, `overshoot_weight` above it."""
    return torch.where(distance.detach() > 0, overshoot_weight, 1.0).to(distance.dtype)


def band_loss(rel_dE: torch.Tensor, log_dt: torch.Tensor, lower: float, upper: float, penalty: float,
              overshoot_weight: float = 1.0) -> torch.Tensor:
    """Per-sample squared distance outside the band in log err, differentiated through the step."""
    distance = _log_distance_outside(rel_dE, lower, upper)
    loss = _weighted(distance, overshoot_weight) * distance.pow(2)
    return torch.where(torch.isfinite(rel_dE), loss, _nonfinite_penalty(log_dt, penalty))


def regression_loss(
    rel_dE: torch.Tensor, log_dt: torch.Tensor, lower: float, upper: float, exponent: float, penalty: float,
    overshoot_weight: float = 1.0,
) -> torch.Tensor:
    """Per-sample (log dt - target)^2 with the detached target log dt - distance / exponent.

    Treats err ~ dt^exponent locally, so the target is the dt that would land on the band
    edge; the gradient flows only through the network's log dt, never through the KDK step
    (whose exact gradient is unstable where the energy change crosses zero).
    """
    distance = _log_distance_outside(rel_dE.detach(), lower, upper)
    target = (log_dt - distance / exponent).detach()
    loss = _weighted(distance, overshoot_weight) * (log_dt - target).pow(2)
    return torch.where(torch.isfinite(rel_dE), loss, _nonfinite_penalty(log_dt, penalty))
