"""dt policies for simulation: the learned one (the evaluation primitive as a pure predictor) beside
the classical ones, chosen by name (`nbody-dt simulate --policy`), and a problem run with one."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from nbody_dt.model.evaluate import StepCriteria, evaluate_step
from nbody_dt.model.history import History
from nbody_dt.model.network import DtNetwork
from nbody_dt.model.set_network import SetDtNetwork
from nbody_dt.model.symmetric import SymmetricLearnedPolicy
from nbody_dt.physics.policies import Advance, DtPolicy, ErrorSeries, FixedDt, FreeFall, Oracle, StepController
from nbody_dt.physics.problems import Problem
from nbody_dt.physics.simulate import SimulationResult, simulate
from nbody_dt.physics.state import State

POLICIES = ("fixed", "freefall", "controller", "series", "oracle", "learned")


@dataclass
class LearnedPolicy:
    """Steps with the network's dt (times dt_scale), no rejection; keeps its own history window."""

    model: DtNetwork
    criteria: StepCriteria
    dt_scale: float = 1.0
    history: History | None = field(default=None)

    def advance(self, state: State, max_dt: float) -> Advance:
        if self.history is None:
            self.history = History.empty(state, self.model.history_len)
        cap = torch.full((state.batch_size,), max_dt, dtype=state.dtype, device=state.device)
        with torch.no_grad():
            ev = evaluate_step(self.model, state, self.history, self.criteria, max_dt=cap, with_loss=False,
                               dt_scale=self.dt_scale)
        self.history = self.history.push(state)
        return Advance(ev.next_state, float(ev.dt[0]), float(ev.rel_dE[0]), self.criteria.substeps)


def at_threshold(model: DtNetwork | SetDtNetwork, trained: float, threshold: float) -> tuple[DtNetwork | SetDtNetwork,
                                                                                                float]:
    """The network, and a factor on its dt, for a per-step tolerance `threshold` when it was trained at
    `trained`: a set network on the error series reads the series at `threshold` (factor 1); any
    other keeps its dt scaled by (threshold / trained)^(1/3), the dt^3 law of the KDK step's
    single-step error (benchmarks/README.md, "Measurements behind the defaults")."""
    if threshold == trained:
        return model, 1.0
    if isinstance(model, SetDtNetwork) and model.error_series:
        return model.at_threshold(threshold), 1.0
    return model, (threshold / trained) ** (1.0 / 3.0)


def make_policy(name: str, problem: Problem, threshold: float, *, dt: float | None = None, eta: float | None = None,
                safety: float = 0.9, model: DtNetwork | None = None, criteria: StepCriteria | None = None,
                symmetric: bool = False, dt_scale: float = 1.0) -> DtPolicy:
    """A policy by name; for 'learned', symmetric=True gives the time-symmetric step (model/symmetric.py)
    and dt_scale multiplies the network's dt. A learned policy at a `threshold` other than the one
    its network was trained at (criteria.energy_threshold) is fitted to it by `at_threshold`."""
    g = problem.gravity
    if name == "fixed":
        return FixedDt(dt, g)
    if name == "freefall":
        return FreeFall(eta, g)
    if name == "controller":
        return StepController(threshold, g, safety=safety)
    if name == "series":
        return ErrorSeries(threshold, g, safety=safety)
    if name == "oracle":
        return Oracle(threshold, g)
    if name == "learned":
        # The step uses this problem's gravity and threshold; the network reads its features as
        # its for_gravity says (the MLP under the training force law, the set network under this one).
        model, scale = at_threshold(model.for_gravity(g), criteria.energy_threshold, threshold)
        dt_scale *= scale
        criteria = replace(criteria, gravity=g, energy_threshold=threshold, accept_lower=0.0)
        if symmetric:
            return SymmetricLearnedPolicy(model, criteria, dt_scale)
        return LearnedPolicy(model, criteria, dt_scale)
    raise ValueError(f"unknown policy {name!r} (choose from {', '.join(POLICIES)})")


def run_problem(problem: Problem, policy: DtPolicy, threshold: float, record: bool = True) -> SimulationResult:
    state = problem.state
    if isinstance(policy, (LearnedPolicy, SymmetricLearnedPolicy)):
        p = next(policy.model.parameters())
        state = state.to(device=p.device, dtype=p.dtype)
    return simulate(state, policy, problem.gravity, problem.t_end, threshold, record=record)
