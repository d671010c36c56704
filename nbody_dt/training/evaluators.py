"""Evaluators: how a replay minibatch becomes loss-sum gradients, a pass mask and errors.

The driver owns the optimizer; an evaluator only computes. `LocalEvaluator` runs the
evaluation primitive in-process; the Dask evaluator (training/dask_evaluator.py) shards the
minibatch over workers and sums their results. Both return d(sum of selected losses)/dw, so
the driver applies one identical update whichever computed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from nbody_dt.model.evaluate import StepCriteria, evaluate_step
from nbody_dt.model.network import DtNetwork
from nbody_dt.training.trajectory import Minibatch


@dataclass(frozen=True)
class MinibatchResult:
    """passed, rel_dE: (B,) on the CPU; loss_sum over the `loss_count` selected samples;
    grads: d loss_sum / d parameter for each model parameter, None when every sample passed."""

    passed: torch.Tensor
    rel_dE: torch.Tensor
    loss_sum: float
    loss_count: int
    grads: list[torch.Tensor] | None


class Evaluator(Protocol):
    def evaluate(self, model: DtNetwork, minibatch: Minibatch, criteria: StepCriteria, loss_on: str) -> MinibatchResult:
        ...

    def close(self) -> None:
        ...


def on_model_device(model: DtNetwork, minibatch: Minibatch) -> Minibatch:
    """The minibatch on the network's device (stored rows are read on the CPU)."""
    device = next(model.parameters()).device
    return minibatch if minibatch.state.device == device else minibatch.to(device)


def evaluate_minibatch_gradients(model: DtNetwork, minibatch: Minibatch, criteria: StepCriteria, loss_on: str,
                                 skip_if_all_pass: bool) -> MinibatchResult:
    """The evaluation primitive on a minibatch (or one shard of it) and its loss-sum gradients.

    skip_if_all_pass: no backward pass when every sample passed (the whole minibatch is
    here, so the driver will not step); a shard of a larger minibatch always computes them.
    """
    minibatch = on_model_device(model, minibatch)
    ev = evaluate_step(model, minibatch.state, minibatch.history, criteria)
    selected = ev.loss if loss_on == "all" else ev.loss[~ev.passed]
    loss_sum = selected.sum()
    grads = None
    if selected.numel() and not (skip_if_all_pass and bool(ev.passed.all())):
        params = list(model.parameters())
        raw = torch.autograd.grad(loss_sum, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(raw, params)]
    return MinibatchResult(ev.passed.cpu(), ev.rel_dE.cpu(), float(loss_sum.detach()), int(selected.numel()), grads)


class LocalEvaluator:
    """In-process, vectorized over the whole minibatch (the default)."""

    def evaluate(self, model: DtNetwork, minibatch: Minibatch, criteria: StepCriteria, loss_on: str) -> MinibatchResult:
        return evaluate_minibatch_gradients(model, minibatch, criteria, loss_on, skip_if_all_pass=True)

    def close(self) -> None:
        pass
