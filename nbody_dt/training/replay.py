"""Part 2, generalization replay: train on random minibatches of stored accepted states.

The seed's names and semantics: sample_minibatch, evaluate_minibatch, generalize_on_trajectory.
Stored states are only read, never modified.
"""

from __future__ import annotations

import time

import torch

from nbody_dt.config import Config
from nbody_dt.model.evaluate import StepCriteria, evaluate_step
from nbody_dt.model.losses import select_loss
from nbody_dt.model.network import DtNetwork
from nbody_dt.model.trajectory import Minibatch, ReplaySource
from nbody_dt.training.evaluators import Evaluator, LocalEvaluator, MinibatchResult, on_model_device


def sample_positions(n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """min(k, n) distinct positions in [0, n), uniform without replacement, in draw order.

    For a small sample of a large trajectory it rejects repeated draws instead of permuting
    all n positions (a full randperm of 10^6 rows costs more than a replay iteration).
    """
    k = min(k, n)
    if 4 * k >= n:
        return torch.randperm(n, generator=generator)[:k]
    draws = torch.empty(0, dtype=torch.int64)
    while True:
        draws = torch.cat([draws, torch.randint(n, (k + k // 2 + 16,), generator=generator)])
        values, order = torch.sort(draws, stable=True)
        first = torch.ones_like(values, dtype=torch.bool)
        first[1:] = values[1:] != values[:-1]
        unique_in_draw_order = draws[order[first].sort().values]
        if len(unique_in_draw_order) >= k:
            return unique_in_draw_order[:k]


def sample_minibatch(trajectory: ReplaySource, batch_size: int, generator: torch.Generator | None = None) -> Minibatch:
    """A uniform random minibatch of replayable rows, without replacement, capped at the trajectory length."""
    return trajectory.gather(sample_positions(len(trajectory), batch_size, generator))


def minibatch_metrics(passed: torch.Tensor, rel_dE: torch.Tensor) -> dict:
    n = len(passed)
    return {
        "pass_count": int(passed.sum()),
        "fail_count": int(n - passed.sum()),
        "mean_rel_dE": float(rel_dE.mean()) if n else 0.0,
        "max_rel_dE": float(rel_dE.max()) if n else 0.0,
    }


def evaluate_minibatch(model: DtNetwork, minibatch: Minibatch, config: Config):
    """One single-step dt prediction and integration for every sample, all at once.

    Returns (all_pass, loss, rel_dE, metrics): loss is the mean over the failing samples
    (over all samples with loss.on = 'all'), differentiable; zero when nothing counts.
    """
    minibatch = on_model_device(model, minibatch)
    ev = evaluate_step(model, minibatch.state, minibatch.history, StepCriteria.from_config(config))
    selected = select_loss(ev.loss, ev.passed, config.loss.on)
    loss = selected.mean() if selected.numel() else ev.loss.sum() * 0.0
    return bool(ev.passed.all()), loss, ev.rel_dE, minibatch_metrics(ev.passed, ev.rel_dE)


def apply_gradients(model: DtNetwork, optimizer: torch.optim.Optimizer, result: MinibatchResult) -> None:
    """One optimizer step on the mean selected loss, from the evaluator's loss-sum gradients
    (none when nothing carried loss)."""
    if result.grads is None:
        return
    optimizer.zero_grad(set_to_none=True)
    for p, g in zip(model.parameters(), result.grads):
        p.grad = (g / result.loss_count).to(device=p.device, dtype=p.dtype)
    optimizer.step()


def _failing_positions(model: DtNetwork, trajectory: ReplaySource, criteria: StepCriteria, chunk: int) -> torch.Tensor:
    """Positions of every replayable row that fails with the current weights (verify = full)."""
    failing = []
    with torch.no_grad():
        for lo in range(0, len(trajectory), chunk):
            pos = torch.arange(lo, min(lo + chunk, len(trajectory)))
            mb = on_model_device(model, trajectory.gather(pos))
            ev = evaluate_step(model, mb.state, mb.history, criteria)
            failing.append(pos[~ev.passed.cpu()])
    return torch.cat(failing) if failing else torch.empty(0, dtype=torch.int64)


def _skipped(window_rows: int) -> dict:
    return {"replay_iterations": 0, "replay_converged": 1, "replay_skipped": 1, "replay_mean_rel_dE": 0.0,
            "replay_max_rel_dE": 0.0, "replay_final_pass_rate": 0.0, "replay_first_pass_rate": 0.0,
            "replay_window_rows": window_rows, "replay_samples": 0, "replay_wall_s": 0.0,
            "replay_samples_per_s": 0.0}


def replay_steps(config: Config, epoch: int) -> int:
    """The iteration cap of an epoch's replay: replay.final_steps in the last epoch when set, else
    replay.steps. The last collection moves the weights on a few live systems; a long last replay
    leaves the checkpoint the precision that replay alone keeps buying (benchmarks/README.md)."""
    if epoch >= config.epochs - 1 and config.replay.final_steps:
        return config.replay.final_steps
    return config.replay.steps


def generalize_on_trajectory(
    model: DtNetwork,
    trajectory: ReplaySource,
    optimizer: torch.optim.Optimizer,
    config: Config,
    evaluator: Evaluator | None = None,
    generator: torch.Generator | None = None,
    steps: int | None = None,
) -> tuple[bool, int, dict]:
    """At most `steps` (default replay.steps) iterations of: sample a minibatch, evaluate it, and
    either stop (every sample passes: (True, iteration + 1, metrics)) or step on the mean loss of
    the failing samples. Returns (False, steps, metrics) when the cap is hit.

    An empty trajectory or one shorter than replay.min_size is skipped: (True, 0, metrics
    marked replay_skipped). With replay.verify = 'full', a passing minibatch is followed by a
    check of every replayable row; training goes on (within the same cap) on rows that fail.
    """
    n = len(trajectory)
    if n == 0 or n < config.replay.min_size:
        return True, 0, _skipped(n)
    evaluator = evaluator or LocalEvaluator.from_config(config)
    criteria = StepCriteria.from_config(config)
    bs, on = config.replay.batch_size, config.loss.on
    cap = config.replay.steps if steps is None else steps
    start = time.perf_counter()
    samples, first_rate, result = 0, None, None
    converged, iterations = False, cap
    for it in range(cap):
        result = evaluator.evaluate(model, sample_minibatch(trajectory, bs, generator), criteria, on)
        samples += len(result.passed)
        first_rate = float(result.passed.float().mean()) if first_rate is None else first_rate
        if bool(result.passed.all()):
            failing = _failing_positions(model, trajectory, criteria, bs) if config.replay.verify == "full" else []
            if len(failing) == 0:
                converged, iterations = True, it + 1
                break
            pick = failing[sample_positions(len(failing), bs, generator)]
            result = evaluator.evaluate(model, trajectory.gather(pick), criteria, on)
            samples += len(result.passed)
        apply_gradients(model, optimizer, result)
    wall = time.perf_counter() - start
    stats = minibatch_metrics(result.passed, result.rel_dE) if result is not None else minibatch_metrics(
        torch.zeros(0, dtype=torch.bool), torch.zeros(0))
    return converged, iterations, {
        "replay_iterations": iterations,
        "replay_converged": int(converged),
        "replay_skipped": 0,
        "replay_mean_rel_dE": stats["mean_rel_dE"],
        "replay_max_rel_dE": stats["max_rel_dE"],
        "replay_final_pass_rate": stats["pass_count"] / max(1, len(result.passed)) if result is not None else 0.0,
        "replay_first_pass_rate": first_rate or 0.0,
        "replay_window_rows": n,
        "replay_samples": samples,
        "replay_wall_s": wall,
        "replay_samples_per_s": samples / wall if wall > 0 else 0.0,
    }
