"""Evaluators: how a replay minibatch becomes loss-sum gradients, a pass mask and errors.

The driver owns the optimizer; an evaluator only computes. Every evaluator computes the same
reduction shards: the minibatch is cut into `compute.reduction_shards` contiguous shards
(`split_minibatch`), each shard goes through `evaluate_shard` (the evaluation primitive and
that shard's loss-sum gradients), and `reduce_shards` sums the shards' results in shard order.
`LocalEvaluator` runs the shards one after the other in-process; the Dask evaluator
(training/dask_evaluator.py) runs the same function on workers and reduces with the same
function on the driver. The shards are part of the run's config, not of the cluster, so the
driver applies a bitwise identical update whichever evaluator and however many workers
computed it (on the CPU, in the same dtype, with one torch thread in the driver as
`compute.torch_threads` defaults to and in every worker as Dask's nannies start them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from nbody_dt.config import Config
from nbody_dt.model.evaluate import StepCriteria, evaluate_step
from nbody_dt.model.history import History
from nbody_dt.model.losses import select_loss
from nbody_dt.model.network import DtNetwork
from nbody_dt.model.trajectory import Minibatch
from nbody_dt.physics.state import State


@dataclass(frozen=True)
class MinibatchResult:
    """passed, rel_dE: (B,) on the CPU; loss_sum over the `loss_count` selected samples;
    grads: d loss_sum / d parameter for each model parameter, None when every sample passed."""

    passed: torch.Tensor
    rel_dE: torch.Tensor
    loss_sum: float
    loss_count: int
    grads: list[torch.Tensor] | None


@dataclass(frozen=True)
class ShardResult:
    """One shard's part of a MinibatchResult: passed, rel_dE (its samples, on the CPU), the sum
    of its selected losses, and d(that sum)/d parameter in float64 (on the device it ran on),
    None when none of its samples carried loss."""

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


def split_minibatch(minibatch: Minibatch, shards: int) -> list[Minibatch]:
    """At most `shards` contiguous, non-empty shards of a minibatch, in order: shard i holds
    rows [n i // k, n (i + 1) // k) with k = min(shards, n). Only n and `shards` decide the cut."""
    n = len(minibatch)
    k = max(1, min(shards, n))
    bounds = [n * i // k for i in range(k + 1)]
    return [minibatch.select(slice(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _owned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device).clone(memory_format=torch.contiguous_format)


def evaluate_shard(model: DtNetwork, shard: Minibatch, criteria: StepCriteria, loss_on: str) -> ShardResult:
    """The evaluation primitive on one shard and the gradients of its loss sum: the one
    per-shard computation of every evaluator (in-process and on Dask workers).

    The shard's tensors are first copied into fresh contiguous tensors on the network's device,
    so that its bits never depend on where (or how aligned) the input lies in memory: a slice
    of the driver's minibatch and an array deserialized on a worker give the same result.
    """
    device = next(model.parameters()).device
    s, h = shard.state, shard.history
    state = State(_owned(s.position, device), _owned(s.velocity, device), _owned(s.mass, device))
    history = History(_owned(h.position, device), _owned(h.velocity, device), _owned(h.valid, device))
    ev = evaluate_step(model, state, history, criteria)
    selected = select_loss(ev.loss, ev.passed, loss_on)
    loss_sum = selected.sum()
    grads = None
    if selected.numel():
        params = list(model.parameters())
        raw = torch.autograd.grad(loss_sum, params, allow_unused=True)
        grads = [(torch.zeros_like(p) if g is None else g).to(torch.float64) for g, p in zip(raw, params)]
    return ShardResult(ev.passed.cpu(), ev.rel_dE.cpu(), float(loss_sum.detach()), int(selected.numel()), grads)


def reduce_shards(results: list[ShardResult], param_dtypes: list[torch.dtype]) -> MinibatchResult:
    """The shards' results summed in shard order (gradients in float64, then cast to each
    parameter's dtype): grads None when every sample passed (the driver does not step)."""
    passed = torch.cat([r.passed for r in results])
    rel_dE = torch.cat([r.rel_dE for r in results])
    loss_sum, loss_count, total = 0.0, 0, None
    for r in results:
        loss_sum += r.loss_sum
        loss_count += r.loss_count
        if r.grads is None:
            continue
        if total is None:
            total = [g.clone() for g in r.grads]
        else:
            for t, g in zip(total, r.grads):
                t += g.to(t.device)
    grads = None
    if total is not None and not bool(passed.all()):
        grads = [t.to(d) for t, d in zip(total, param_dtypes)]
    return MinibatchResult(passed, rel_dE, loss_sum, loss_count, grads)


class LocalEvaluator:
    """In-process: the run's reduction shards one after the other, each vectorized."""

    def __init__(self, shards: int):
        self.shards = max(1, int(shards))

    @classmethod
    def from_config(cls, cfg: Config) -> LocalEvaluator:
        return cls(cfg.compute.reduction_shards)

    def evaluate(self, model: DtNetwork, minibatch: Minibatch, criteria: StepCriteria, loss_on: str) -> MinibatchResult:
        results = [evaluate_shard(model, shard, criteria, loss_on) for shard in split_minibatch(minibatch, self.shards)]
        return reduce_shards(results, [p.dtype for p in model.parameters()])

    def close(self) -> None:
        pass
