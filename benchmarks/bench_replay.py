"""Benchmark one replay (Part 2) iteration: sample a 512-row minibatch from an in-memory
trajectory, evaluate it (forward + backward) with `training.evaluators.LocalEvaluator`, and
take the optimizer step with `training.replay.apply_gradients`.

Compared with
  (a) the same iteration written as a per-sample loop (evaluate_step with B = 1 and a
      backward per sample, then the optimizer step), and
  (b) the bare network (`model.mlp`) forward + backward on the same batch's features.
Goals (from the issue): >= 40x faster than (a), and within 1.3x of (b).

    PYTHONPATH=. python benchmarks/bench_replay.py [--quick] [--batch 512]

The variants are timed interleaved, one of each per round, so that a drifting machine load
weighs on all of them alike. The per-sample part of the loop costs the same for every sample, so it is timed on the
first --loop-samples samples of the minibatch and scaled to the whole batch (stated in the
output); sampling and the optimizer step are timed once per iteration, not scaled.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from machine import add_timing_options, cpu_model, timing_plan  # noqa: E402

from nbody_dt import config as C
from nbody_dt.model.evaluate import StepCriteria, evaluate_step
from nbody_dt.model.features import compute_features
from nbody_dt.model.network import DtNetwork
from nbody_dt.model.trajectory import InMemoryTrajectory, Rows
from nbody_dt.physics.gravity import min_freefall_time, total_energy
from nbody_dt.physics.initial_conditions import kepler_ensemble
from nbody_dt.physics.integrator import step_error
from nbody_dt.training.evaluators import LocalEvaluator
from nbody_dt.training.replay import apply_gradients, sample_minibatch
from nbody_dt.training.setup import make_optimizer

HIDDEN = [200, 1000, 1000, 200]
LOOP_GOAL, BARE_GOAL = 40.0, 1.3


def kepler_trajectory(orbits: int, steps: int, cfg: C.Config) -> InMemoryTrajectory:
    """orbits x steps accepted-looking rows: each orbit advanced by KDK steps of 0.02 t_ff."""
    g = StepCriteria.from_config(cfg).gravity
    state, _ = kepler_ensemble(orbits, e_range=(0.0, 0.95), a_range=(0.5, 2.0), seed=0)
    t = torch.zeros(orbits, dtype=torch.float64)
    blocks = []
    for k in range(steps):
        dt = 0.02 * min_freefall_time(state, g)
        after, err = step_error(state, dt, g)
        blocks.append(Rows(state.position, state.velocity, state.mass, dt, t.clone(), total_energy(state, g), err,
                           torch.arange(orbits), torch.full((orbits,), k), torch.zeros(orbits, dtype=torch.int64),
                           torch.full((orbits,), k < cfg.model.history_len)))
        state, t = after, t + dt
    return InMemoryTrajectory.from_blocks(blocks, orbits, cfg.model.history_len)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orbits", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64, help="rows per orbit in the trajectory")
    ap.add_argument("--override", action="append", default=[], help="config override, e.g. loss.kind=band")
    add_timing_options(ap)
    args = ap.parse_args(argv)
    repeats, loop_repeats, loop_samples, scale = timing_plan(args)

    cfg = C.load(overrides=[f"model.hidden={HIDDEN}", f"replay.batch_size={args.batch}", *args.override])
    torch.manual_seed(cfg.seed)
    traj = kepler_trajectory(args.orbits, args.steps, cfg)
    model = DtNetwork.from_config(cfg, 2)
    model.set_scales(traj.gather(torch.arange(min(len(traj), 4096))).state)
    optimizer = make_optimizer(cfg, model)
    criteria = StepCriteria.from_config(cfg)
    evaluator = LocalEvaluator()
    gen = torch.Generator().manual_seed(0)
    on = cfg.loss.on
    n_params = sum(p.numel() for p in model.parameters())

    def iteration():
        mb = sample_minibatch(traj, args.batch, gen)
        result = evaluator.evaluate(model, mb, criteria, on)
        apply_gradients(model, optimizer, result)
        return result

    def loop_iteration(samples: int = loop_samples) -> tuple[float, float]:
        """Returns (whole iteration, its per-sample part) in seconds."""
        t0 = time.perf_counter()
        mb = sample_minibatch(traj, args.batch, gen)
        optimizer.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        b = len(mb)
        for i in range(samples):
            one = mb.select(slice(i, i + 1))
            ev = evaluate_step(model, one.state, one.history, criteria)
            if on == "all" or not bool(ev.passed[0]):
                (ev.loss.sum() / b).backward()
        t2 = time.perf_counter()
        optimizer.step()
        return time.perf_counter() - t0, t2 - t1

    mb0 = sample_minibatch(traj, args.batch, torch.Generator().manual_seed(1))
    features, _ = compute_features(cfg.model.features, mb0.state, mb0.history, model.gravity, model.scales)

    def bare():
        model.zero_grad(set_to_none=True)
        model.mlp(features).mean().backward()

    # Sanity: the loop's gradients equal the evaluator's (first 16 samples, loss.on = all).
    check = mb0.select(slice(0, 16))
    res = evaluator.evaluate(model, check, criteria, "all")
    model.zero_grad(set_to_none=True)
    for i in range(16):
        one = check.select(slice(i, i + 1))
        evaluate_step(model, one.state, one.history, criteria).loss.sum().backward()
    worst = max(float((p.grad - g).abs().max() / g.abs().max().clamp_min(1e-300))
                for p, g in zip(model.parameters(), res.grads))
    first = iteration()
    fail_rate = 1.0 - float(first.passed.float().mean())

    # Interleaved rounds (one of each variant per round): a drifting machine load weighs on all alike.
    iteration()
    bare()
    vec_times, bare_times, loop_extrapolated = [], [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        iteration()
        t1 = time.perf_counter()
        bare()
        t2 = time.perf_counter()
        vec_times.append(t1 - t0)
        bare_times.append(t2 - t1)
        if r < loop_repeats:
            total, part = loop_iteration()
            loop_extrapolated.append(total + part * (scale - 1))
    t_vec, t_bare = statistics.median(vec_times), statistics.median(bare_times)
    t_loop = statistics.median(loop_extrapolated)
    loop_ratio, bare_ratio = t_loop / t_vec, t_vec / t_bare

    print(f"# bench_replay: one replay iteration, batch {args.batch} from {len(traj)} Kepler rows, hidden {HIDDEN}, "
          f"float64, features={cfg.model.features}, history_len={cfg.model.history_len}, loss={cfg.loss.kind}, "
          f"loss.on={on}, optimizer={cfg.optimizer.name}, {n_params:,} parameters")
    print(f"# machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"# loop gradients agree with the evaluator's to {worst:.1e}; first minibatch fail rate {fail_rate:.2f}")
    print(f"# per-sample loop: per-sample part timed on {loop_samples} samples and scaled x{scale:g}")
    print()
    print("| variant | median ms | min ms | repeats |")
    print("|---|---:|---:|---:|")
    print(f"| replay iteration (LocalEvaluator + apply_gradients) | {1e3 * t_vec:.1f} | {1e3 * min(vec_times):.1f} "
          f"| {repeats} |")
    print(f"| bare network fwd+bwd (same batch) | {1e3 * t_bare:.1f} | {1e3 * min(bare_times):.1f} | {repeats} |")
    print(f"| per-sample loop iteration | {1e3 * t_loop:.1f} | {1e3 * min(loop_extrapolated):.1f} | {loop_repeats} |")
    print()
    print(f"per-sample loop / replay iteration: {loop_ratio:.1f}x  (goal >= {LOOP_GOAL:g}x: "
          f"{'met' if loop_ratio >= LOOP_GOAL else 'NOT met'})")
    print(f"replay iteration / bare network:    {bare_ratio:.2f}x (goal <= {BARE_GOAL:g}x: "
          f"{'met' if bare_ratio <= BARE_GOAL else 'NOT met'})")
    return {"iteration_s": t_vec, "bare_s": t_bare, "loop_s": t_loop, "loop_ratio": loop_ratio,
            "bare_ratio": bare_ratio}


if __name__ == "__main__":
    main()
