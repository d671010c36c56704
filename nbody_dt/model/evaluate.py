"""The one evaluation primitive: states (+history) -> dt, one KDK step, energy error, pass mask, loss.

Collection, replay (local and on Dask workers) and simulation all turn a state into a dt
through `evaluate_step`, so they cannot disagree about features, normalization or dt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nbody_dt.config import Config
from nbody_dt.model.history import History
from nbody_dt.model.losses import band_loss, margin_loss, regression_loss
from nbody_dt.model.network import DtNetwork
from nbody_dt.physics.gravity import Gravity, total_energy
from nbody_dt.physics.integrator import kdk_step, relative_energy_error
from nbody_dt.physics.state import State


@dataclass(frozen=True, kw_only=True)
class StepCriteria:
    """Acceptance band, loss and integration settings of a step evaluation."""

    gravity: Gravity
    energy_threshold: float
    accept_lower: float
    loss_kind: str
    loss_lower: float
    loss_upper: float
    loss_exponent: float
    nonfinite_penalty: float
    substeps: int = 1
    overshoot_weight: float = 1.0
    dt_fraction_range: tuple[float, float] = (0.84, 0.9)
    probe_ratio: float = 1.1

    @staticmethod
    def from_config(cfg: Config) -> StepCriteria:
        return StepCriteria(
            gravity=Gravity(cfg.physics.G, cfg.physics.softening), energy_threshold=cfg.collect.energy_threshold,
            accept_lower=cfg.collect.accept_lower, loss_kind=cfg.loss.kind, loss_lower=cfg.loss.lower,
            loss_upper=cfg.loss.upper, loss_exponent=cfg.loss.exponent, nonfinite_penalty=cfg.loss.nonfinite_penalty,
            substeps=cfg.collect.substeps, overshoot_weight=cfg.loss.overshoot_weight,
            dt_fraction_range=cfg.loss.dt_fraction_range, probe_ratio=cfg.loss.probe_ratio,
        )


@dataclass(frozen=True)
class StepEvaluation:
    """Per system: dt and log dt (B,), the state after the step, its relative energy error,
    whether it lies in the acceptance band [accept_lower, energy_threshold), and the loss."""

    dt: torch.Tensor
    log_dt: torch.Tensor
    next_state: State
    rel_dE: torch.Tensor
    passed: torch.Tensor
    loss: torch.Tensor | None


def _zero_nonfinite(grad: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))


def evaluate_step(
    model: DtNetwork,
    state: State,
    history: History,
    criteria: StepCriteria,
    max_dt: torch.Tensor | None = None,
    with_loss: bool = True,
    dt_scale: float = 1.0,
) -> StepEvaluation:
    """Predict dt for every system, take one KDK step, and score it. Vectorized over B.

    max_dt (B,) optionally caps dt (a simulation landing on t_end); dt_scale multiplies the
    network's dt before the cap (a simulation at another tolerance than the trained one). The band loss is
    differentiated through the step (a per-sample hook keeps a non-finite step's gradient
    out of the weights); the regression and margin losses only through the network's log dt.
    The margin loss takes a second, probe step at probe_ratio x dt. with_loss=False (a
    simulation) skips the loss and the probe: loss is then None.
    """
    log_dt = model.log_dt(state, history)
    if dt_scale != 1.0:
        log_dt = log_dt + math.log(dt_scale)
    if max_dt is not None:
        log_dt = torch.minimum(log_dt, torch.log(max_dt))
    dt = torch.exp(log_dt)
    through_step = criteria.loss_kind == "band" and dt.requires_grad
    step_dt = dt if through_step else dt.detach()
    if through_step:
        step_dt.register_hook(_zero_nonfinite)
    after = kdk_step(state, step_dt, criteria.gravity, criteria.substeps)
    energy = total_energy(state, criteria.gravity)
    rel_dE = relative_energy_error(energy, total_energy(after, criteria.gravity))
    passed = (rel_dE >= criteria.accept_lower) & (rel_dE < criteria.energy_threshold)
    loss = _loss(state, energy, log_dt, step_dt.detach(), rel_dE, criteria) if with_loss else None
    return StepEvaluation(dt, log_dt, State(after.position.detach(), after.velocity.detach(), after.mass),
                          rel_dE.detach(), passed, loss)


def _loss(state: State, energy: torch.Tensor, log_dt: torch.Tensor, dt: torch.Tensor, rel_dE: torch.Tensor,
          criteria: StepCriteria) -> torch.Tensor:
    """Per-sample loss of the configured kind (differentiable as evaluate_step describes)."""
    if criteria.loss_kind == "band":
        return band_loss(rel_dE, log_dt, criteria.loss_lower, criteria.loss_upper, criteria.nonfinite_penalty,
                         criteria.overshoot_weight)
    if criteria.loss_kind == "regression":
        return regression_loss(rel_dE, log_dt, criteria.loss_lower, criteria.loss_upper, criteria.loss_exponent,
                               criteria.nonfinite_penalty, criteria.overshoot_weight)
    with torch.no_grad():
        probe = kdk_step(state, dt * criteria.probe_ratio, criteria.gravity, criteria.substeps)
        probe_rel_dE = relative_energy_error(energy, total_energy(probe, criteria.gravity))
    lower, upper = criteria.dt_fraction_range
    return margin_loss(rel_dE, probe_rel_dE, log_dt, threshold=criteria.energy_threshold, lower=lower, upper=upper,
                       probe_ratio=criteria.probe_ratio, min_exponent=criteria.loss_exponent,
                       penalty=criteria.nonfinite_penalty, overshoot_weight=criteria.overshoot_weight,
                       accept_lower=criteria.accept_lower)
