"""Losses on the single-step relative energy error, zero inside a loss band.

band and regression put the band on the error itself, [lower, upper]; margin puts it on dt, as
fractions of the threshold dt (the dt whose error would reach the tolerance). All are safe
against non-finite errors: such a sample costs a finite penalty whose gradient shrinks dt, and
never produces a NaN gradient. All weigh a sample above the band by `overshoot_weight`: an
overshoot risks a step over the tolerance, an undershoot only costs force evaluations, so a
weight > 1 makes the network cautious exactly where its dt is uncertain (where the error is
steep in dt, e.g. at pericentre of eccentric orbits).
"""

from __future__ import annotations

import math

import torch

_MIN_ERR = 1e-300


def _log_error(rel_dE: torch.Tensor) -> torch.Tensor:
    """log of the error, clamped away from 0; 0 (an error of 1) where it is not finite."""
    return torch.log(torch.where(torch.isfinite(rel_dE), rel_dE, torch.ones_like(rel_dE)).clamp_min(_MIN_ERR))


def _log_distance_outside(rel_dE: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Signed distance outside the band in log err: > 0 above upper, < 0 below lower, 0 inside."""
    log_err = _log_error(rel_dE)
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


MAX_LOCAL_EXPONENT = 12.0
"""Cap on the measured local exponent (apocentre and pericentre steps of KDK have err ~ dt^4,
circular orbits dt^6; near a sign change of the error the two-point estimate is meaningless)."""


def margin_loss(
    rel_dE: torch.Tensor, probe_rel_dE: torch.Tensor, log_dt: torch.Tensor, *, threshold: float, lower: float,
    upper: float, probe_ratio: float, min_exponent: float, penalty: float, overshoot_weight: float = 1.0,
    accept_lower: float = 0.0,
) -> torch.Tensor:
    """Per-sample squared distance of log dt outside [log(lower * dt_thr), log(upper * dt_thr)].

    dt_thr, the dt whose error would reach `threshold`, is extrapolated from err at dt along
    the local power law err ~ dt^p measured between dt and probe_ratio * dt (p clamped to
    [min_exponent, MAX_LOCAL_EXPONENT]; min_exponent where the probe is not finite). A fixed
    err band sits at a fraction (band / threshold)^(1/p) of dt_thr that changes with p along
    an orbit (0.79-0.87 where p = 3, 0.84-0.90 at the apsides where p = 4, 0.89-0.93 on circular
    orbits where p = 6), so steep phases run close to the tolerance and flat ones waste steps;
    this band is one fraction everywhere. Below `accept_lower` (near a sign change of the error,
    or where the law is steep) the target is the regression loss's instead: the dt whose error
    would reach accept_lower along err ~ dt^min_exponent. The band so never admits a dt the
    acceptance band rejects, and pushes up from there as hard as the regression loss (with the
    measured, steep exponent the push was too weak: a collection stalled at a sign change).
    Like regression, the target is detached.
    """
    log_err = _log_error(rel_dE.detach())
    probe_ok = torch.isfinite(probe_rel_dE) & (probe_rel_dE > 0)
    measured = (_log_error(probe_rel_dE.detach()) - log_err) / math.log(probe_ratio)
    exponent = torch.where(probe_ok, measured, torch.full_like(measured, min_exponent))
    exponent = exponent.clamp(min_exponent, MAX_LOCAL_EXPONENT)
    log_dt_now = log_dt.detach()
    log_dt_thr = log_dt_now + (math.log(threshold) - log_err) / exponent
    log_low = log_dt_thr + math.log(lower)
    if accept_lower > 0:
        log_low = torch.maximum(log_low, log_dt_now + (math.log(accept_lower) - log_err) / min_exponent)
    distance = torch.relu(log_dt_now - log_dt_thr - math.log(upper)) - torch.relu(log_low - log_dt_now)
    target = (log_dt - distance).detach()
    loss = _weighted(distance, overshoot_weight) * (log_dt - target).pow(2)
    return torch.where(torch.isfinite(rel_dE), loss, _nonfinite_penalty(log_dt, penalty))


def select_loss(loss: torch.Tensor, passed: torch.Tensor, on: str) -> torch.Tensor:
    """The per-sample losses that count (config loss.on): all of them, or the failing samples' only."""
    return loss if on == "all" else loss[~passed]
