"""Losses on the single-step relative energy error, zero inside the loss band [lower, upper].

Both are safe against non-finite errors: such a sample costs a finite penalty whose gradient
shrinks dt, and never produces a NaN gradient.
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


def band_loss(rel_dE: torch.Tensor, log_dt: torch.Tensor, lower: float, upper: float, penalty: float) -> torch.Tensor:
    """Per-sample squared distance outside the band in log err, differentiated through the step."""
    distance = _log_distance_outside(rel_dE, lower, upper)
    return torch.where(torch.isfinite(rel_dE), distance.pow(2), _nonfinite_penalty(log_dt, penalty))


def regression_loss(
    rel_dE: torch.Tensor, log_dt: torch.Tensor, lower: float, upper: float, exponent: float, penalty: float
) -> torch.Tensor:
    """Per-sample (log dt - target)^2 with the detached target log dt - distance / exponent.

    Treats err ~ dt^exponent locally, so the target is the dt that would land on the band
    edge; the gradient flows only through the network's log dt, never through the KDK step
    (whose exact gradient is unstable where the energy change crosses zero).
    """
    distance = _log_distance_outside(rel_dE.detach(), lower, upper)
    target = (log_dt - distance / exponent).detach()
    return torch.where(torch.isfinite(rel_dE), (log_dt - target).pow(2), _nonfinite_penalty(log_dt, penalty))
