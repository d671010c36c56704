"""The learned dt policy for simulation: the evaluation primitive as a pure predictor."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nbody_dt.model.evaluate import StepCriteria, evaluate_step
from nbody_dt.model.history import History
from nbody_dt.model.network import DtNetwork
from nbody_dt.physics.policies import Advance
from nbody_dt.physics.state import State


@dataclass
class LearnedPolicy:
    """Steps with the network's dt, no rejection; keeps its own history window."""

    model: DtNetwork
    criteria: StepCriteria
    history: History | None = field(default=None)

    def advance(self, state: State, max_dt: float) -> Advance:
        if self.history is None:
            self.history = History.empty(state, self.model.history_len)
        cap = torch.full((state.batch_size,), max_dt, dtype=state.dtype, device=state.device)
        with torch.no_grad():
            ev = evaluate_step(self.model, state, self.history, self.criteria, max_dt=cap, with_loss=False)
        self.history = self.history.push(state)
        return Advance(ev.next_state, float(ev.dt[0]), float(ev.rel_dE[0]), self.criteria.substeps)
