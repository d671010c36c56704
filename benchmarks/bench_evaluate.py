"""Benchmark the evaluation primitive (state -> features -> dt -> one KDK step -> energies -> loss),
forward and backward, on a batch of Kepler states.

Compares the vectorized `model.evaluate.evaluate_step` with
  (a) the same computation as a Python loop over samples (B calls with B = 1), and
  (b) the bare network (`model.mlp`) forward and backward on the precomputed feature tensor,
and, for scale, the bare network as a per-sample loop (the most any loop ratio can reach).

    PYTHONPATH=. python benchmarks/bench_evaluate.py [--quick] [--batch 512] [--loss regression|band]

Prints a table of medians and the two ratios (loop / vectorized, vectorized / bare network).
The variants are timed interleaved (one of each per round), so load drift hits all alike.
The per-sample loop costs the same for every sample, so it is timed on the first
--loop-samples samples and scaled to the whole batch (stated in the table).
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

from nbody_dt.model.evaluate import StepCriteria, evaluate_step
from nbody_dt.model.features import compute_features
from nbody_dt.model.history import History
from nbody_dt.model.network import DtNetwork
from nbody_dt.physics.gravity import Gravity
from nbody_dt.physics.initial_conditions import kepler_ensemble

HIDDEN = [200, 1000, 1000, 200]


def interleaved(fns: dict, repeats: dict, warmup: int = 1) -> dict[str, list[float]]:
    """Time every variant once per round, round after round, so that a drifting machine load
    (other jobs on shared cores) weighs on all variants alike. repeats[name] caps its rounds."""
    for name, fn in fns.items():
        for _ in range(warmup if repeats[name] > 1 else 0):
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(max(repeats.values())):
        for name, fn in fns.items():
            if r < repeats[name]:
                t0 = time.perf_counter()
                fn()
                out[name].append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loss", choices=("regression", "band", "margin"), default="regression")
    ap.add_argument("--features", choices=("basic", "rich"), default="rich")
    add_timing_options(ap)
    args = ap.parse_args(argv)
    repeats, loop_repeats, loop_samples, scale = timing_plan(args)

    torch.manual_seed(0)
    g = Gravity()
    state, _ = kepler_ensemble(args.batch, e_range=(0.0, 0.95), a_range=(0.5, 2.0), seed=0)
    history = History.empty(state, 0)
    model = DtNetwork(args.features, 2, 2, 0, HIDDEN, "silu", "log_freefall", g, dtype=torch.float64)
    model.set_scales(state)
    # Acceptance band [2.5e-5, 2e-4), error loss band [6e-5, 1.2e-4]; margin: its defaults (a probe step).
    criteria = StepCriteria(gravity=g, energy_threshold=2e-4, accept_lower=2.5e-5, loss_kind=args.loss,
                            loss_lower=6e-5, loss_upper=1.2e-4, loss_exponent=3.0, nonfinite_penalty=10.0)
    features, _ = compute_features(args.features, state, history, g, model.scales)
    n_params = sum(p.numel() for p in model.parameters())

    def vectorized():
        model.zero_grad(set_to_none=True)
        evaluate_step(model, state, history, criteria).loss.mean().backward()

    def loop(samples: int = loop_samples):
        model.zero_grad(set_to_none=True)
        b = state.batch_size
        for i in range(samples):
            idx = slice(i, i + 1)
            ev = evaluate_step(model, state.select(idx), history.select(idx), criteria)
            (ev.loss.sum() / b).backward()

    def bare():
        model.zero_grad(set_to_none=True)
        model.mlp(features).mean().backward()

    def bare_loop(samples: int = loop_samples):
        """The floor of any per-sample loop: the bare network alone, one feature row at a time."""
        model.zero_grad(set_to_none=True)
        for i in range(samples):
            (model.mlp(features[i:i + 1]).sum() / args.batch).backward()

    def vectorized_forward():
        with torch.no_grad():
            evaluate_step(model, state, history, criteria)

    def bare_forward():
        with torch.no_grad():
            model.mlp(features)

    # The loop computes the same gradients (checked once on the first samples, not timed).
    check = min(16, args.batch)
    model.zero_grad(set_to_none=True)
    sub = slice(0, check)
    (evaluate_step(model, state.select(sub), history.select(sub), criteria).loss.sum() / args.batch).backward()
    ref = [p.grad.clone() for p in model.parameters()]
    loop(check)
    worst = max(float((p.grad - r).abs().max() / r.abs().max().clamp_min(1e-300))
                for p, r in zip(model.parameters(), ref))

    fns = {"vectorized fwd+bwd": vectorized, "bare network fwd+bwd": bare, "vectorized fwd": vectorized_forward,
           "bare network fwd": bare_forward, "per-sample loop fwd+bwd": loop,
           "bare network per-sample loop fwd+bwd": bare_loop}
    loops = ("per-sample loop fwd+bwd", "bare network per-sample loop fwd+bwd")
    results = interleaved(fns, {k: loop_repeats if k in loops else repeats for k in fns})
    for k in loops:
        results[k] = [t * scale for t in results[k]]
    med = {k: statistics.median(v) for k, v in results.items()}
    loop_ratio = med["per-sample loop fwd+bwd"] / med["vectorized fwd+bwd"]
    bare_ratio = med["vectorized fwd+bwd"] / med["bare network fwd+bwd"]
    fwd_ratio = med["vectorized fwd"] / med["bare network fwd"]
    bare_loop_ratio = med["bare network per-sample loop fwd+bwd"] / med["bare network fwd+bwd"]

    print(f"# bench_evaluate: evaluation primitive, B={args.batch} Kepler states, hidden {HIDDEN}, float64, "
          f"features={args.features}, loss={args.loss}, {n_params:,} parameters")
    print(f"# machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"# loop gradients agree with the vectorized ones to {worst:.1e} (relative, worst parameter, "
          f"first {check} samples)")
    print(f"# per-sample loop timed on {loop_samples} samples, scaled x{scale:g} to the batch")
    print()
    print("| variant | median ms | min ms | repeats | per sample us |")
    print("|---|---:|---:|---:|---:|")
    for k, v in results.items():
        print(f"| {k} | {1e3 * med[k]:.1f} | {1e3 * min(v):.1f} | {len(v)} | {1e6 * med[k] / args.batch:.1f} |")
    print()
    print(f"per-sample loop / vectorized (fwd+bwd): {loop_ratio:.1f}x")
    print(f"vectorized / bare network (fwd+bwd):    {bare_ratio:.2f}x")
    print(f"vectorized / bare network (fwd only):   {fwd_ratio:.2f}x")
    print(f"bare network per-sample loop / bare network batched: {bare_loop_ratio:.1f}x (the network's own share)")
    return {"median_s": med, "loop_ratio": loop_ratio, "bare_ratio": bare_ratio, "forward_ratio": fwd_ratio,
            "bare_loop_ratio": bare_loop_ratio}


if __name__ == "__main__":
    main()
