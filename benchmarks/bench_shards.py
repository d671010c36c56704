"""What the reduction shards cost the local evaluator: one replay iteration (sample a minibatch,
`LocalEvaluator(k)`, `apply_gradients`) for several shard counts k, against k = 1 (one
vectorized pass, what the local evaluator did before the shards were part of the config).

    PYTHONPATH=. python benchmarks/bench_shards.py [--shards 1,2,4,8] [--hidden 64,64,64] [--threads 1]

The shard counts are timed interleaved (one iteration of each per round, after a warm-up round),
so that a drifting machine load weighs on all of them alike; each figure is the median over the
rounds. Every variant trains its own copy of the same network with its own optimizer on the
same minibatches (the failing fraction, hence the work, stays comparable).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_replay import kepler_trajectory  # noqa: E402
from machine import cpu_model  # noqa: E402

from nbody_dt import config as C
from nbody_dt.model.evaluate import StepCriteria
from nbody_dt.model.network import DtNetwork
from nbody_dt.training.evaluators import LocalEvaluator
from nbody_dt.training.replay import apply_gradients, sample_minibatch
from nbody_dt.training.setup import make_optimizer


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="1,2,4,8", help="shard counts, comma separated (the first is the baseline)")
    ap.add_argument("--hidden", default="", help="hidden widths, comma separated (default: the config's)")
    ap.add_argument("--batch", type=int, default=0, help="minibatch size (default: the config's replay.batch_size)")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's choice)")
    ap.add_argument("--orbits", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64, help="rows per orbit in the trajectory")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"model.hidden=[{args.hidden}]"] if args.hidden else []
    if args.batch:
        overrides.append(f"replay.batch_size={args.batch}")
    cfg = C.load(overrides=overrides)
    counts = [int(k) for k in args.shards.split(",")]
    torch.manual_seed(cfg.seed)
    traj = kepler_trajectory(args.orbits, args.steps, cfg)
    base = DtNetwork.from_config(cfg, 2)
    base.set_scales(traj.gather(torch.arange(min(len(traj), 4096))).state)
    criteria = StepCriteria.from_config(cfg)
    variants = []
    for k in counts:
        model = copy.deepcopy(base)
        variants.append((k, model, make_optimizer(cfg, model), LocalEvaluator(k)))
    gen = torch.Generator().manual_seed(0)
    times: dict[int, list[float]] = {k: [] for k in counts}
    fail: dict[int, list[float]] = {k: [] for k in counts}
    for r in range(args.repeats + 1):
        mb = sample_minibatch(traj, cfg.replay.batch_size, gen)
        for k, model, optimizer, evaluator in variants:
            t0 = time.perf_counter()
            result = evaluator.evaluate(model, mb, criteria, cfg.loss.on)
            apply_gradients(model, optimizer, result)
            if r:  # round 0 warms up
                times[k].append(time.perf_counter() - t0)
                fail[k].append(1.0 - float(result.passed.float().mean()))
    n_params = sum(p.numel() for p in base.parameters())
    print(f"# bench_shards: one replay iteration, batch {cfg.replay.batch_size} from {len(traj)} Kepler rows, hidden "
          f"{cfg.model.hidden} ({n_params:,} parameters), {cfg.dtype}, loss={cfg.loss.kind}, loss.on={cfg.loss.on}")
    print(f"# machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; {args.repeats} rounds")
    print()
    print(f"| reduction_shards | median ms | min ms | x {counts[0]} shard(s) | mean fail rate |")
    print("|---:|---:|---:|---:|---:|")
    t_base = statistics.median(times[counts[0]])
    out = {}
    for k in counts:
        med = statistics.median(times[k])
        out[k] = {"median_s": med, "min_s": min(times[k]), "ratio": med / t_base}
        print(f"| {k} | {1e3 * med:.1f} | {1e3 * min(times[k]):.1f} | {med / t_base:.2f} | "
              f"{statistics.mean(fail[k]):.2f} |")
    return out


if __name__ == "__main__":
    main()
