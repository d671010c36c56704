"""One replay iteration: LocalEvaluator against DaskEvaluator, for a few minibatch sizes.

An "iteration" is one `evaluator.evaluate(model, minibatch, criteria, loss_on)`: the evaluation
primitive (features -> dt -> one KDK step -> energy error -> loss) and the loss-sum gradients
of every sample (loss.on = 'all'), as generalize_on_trajectory calls it once per replay step.
The minibatch is a Kepler ensemble of `max(sizes)` random two-body systems (the default
config's initial conditions), the network untrained, so most samples fail and gradients are
always computed. Reports medians over --repeats timed calls after --warmup calls, the ratio
dask / local, the largest relative gradient difference between the two, and where the Dask
iteration's time goes (driver: prepare = split + copy of the weights, scatter of the weights,
tasks from submit to gathered, combine; the slowest shard's own compute time on its worker).

    PYTHONPATH=. python benchmarks/bench_dask.py                       # CPU, 2 workers, 512 and 4096
    PYTHONPATH=. python benchmarks/bench_dask.py --device cuda --workers 1 --sizes 512 4096 32768
    PYTHONPATH=. python benchmarks/bench_dask.py --address tcp://scheduler:8786   # an existing cluster

--local-threads sets torch's intra-op threads of the driver for the local runs (default: torch's
default, all cores); a list (e.g. "1,2") times the local evaluator with each. Dask workers of a
LocalCluster run single-threaded (OMP_NUM_THREADS=1, one thread per worker process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_model  # noqa: E402

from nbody_dt.config import from_dict  # noqa: E402
from nbody_dt.model.evaluate import StepCriteria  # noqa: E402
from nbody_dt.model.history import History  # noqa: E402
from nbody_dt.model.network import DtNetwork  # noqa: E402
from nbody_dt.model.trajectory import Minibatch  # noqa: E402
from nbody_dt.training.dask_evaluator import DaskEvaluator  # noqa: E402
from nbody_dt.training.evaluators import LocalEvaluator  # noqa: E402
from nbody_dt.training.setup import initial_states  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--hidden", default="200,1000,1000,200", help="hidden widths, comma separated")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--device", default="cpu", help="driver device of the local evaluator (cpu, cuda)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers (without --address)")
    p.add_argument("--shards", type=int, default=0,
                   help="compute.reduction_shards of both evaluators (default: the config's default)")
    p.add_argument("--address", default="", help="an existing scheduler instead of a LocalCluster")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--local-threads", default="", help="torch threads of the driver for local runs, e.g. '1,2'")
    p.add_argument("--direct", default="auto", choices=("auto", "yes", "no"),
                   help="DaskEvaluator direct_to_workers (auto: yes for a LocalCluster, Dask's default for --address)")
    p.add_argument("--json", default="", help="also write the results here")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rel_grad_diff(a, b) -> float:
    return max(float((x.cpu() - y.cpu()).abs().max() / x.abs().max().cpu().clamp_min(1e-300)) for x, y in zip(a, b))


def main(argv=None) -> dict:
    args = parse_args(argv)
    hidden = [int(h) for h in args.hidden.split(",")]
    cfg = from_dict({"model": {"hidden": hidden}, "dtype": args.dtype, "device": args.device,
                     "initial_conditions": {"num_orbits": max(args.sizes), "seed": 1},
                     "compute": {"evaluator": "dask", "dask_workers": args.workers, "dask_address": args.address,
                                 **({"reduction_shards": args.shards} if args.shards else {})}})
    device = torch.device(args.device)
    torch.manual_seed(0)
    states = initial_states(cfg).to(device=device)
    model = DtNetwork.from_config(cfg, states.num_bodies).to(device)
    model.set_scales(states)
    criteria = StepCriteria.from_config(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    batches = {n: Minibatch(states.select(torch.arange(n, device=device)),
                            History.empty(states.select(torch.arange(n, device=device)), 0), torch.arange(n))
               for n in args.sizes}
    local_threads = [int(t) for t in args.local_threads.split(",") if t] or [torch.get_num_threads()]
    default_threads = torch.get_num_threads()

    results: dict = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                                 "python": platform.python_version(), "torch": torch.__version__,
                                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
                     "settings": {**vars(args), "hidden": hidden, "parameters": n_params,
                                  "driver_default_threads": default_threads},
                     "local": {}, "dask": {}, "load_average_start": os.getloadavg()}
    print(f"network {hidden} {args.dtype}, {n_params} parameters; driver device {device}; "
          f"{cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    local = LocalEvaluator.from_config(cfg)

    def time_one(fn) -> float:
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t

    t = time.perf_counter()
    direct = {"auto": None, "yes": True, "no": False}[args.direct]
    with DaskEvaluator(cfg, args.address or None, args.workers, direct_to_workers=direct) as ev:
        start_s = time.perf_counter() - t
        devices = ev.warm_up()
        results["dask_setup"] = {"start_s": start_s, "workers": devices, "shards": ev.shards}
        print(f"dask: {len(devices)} workers {sorted(set(devices.values()))}, {ev.shards} shards, "
              f"started in {start_s:.1f} s", flush=True)
        for n, mb in batches.items():
            # interleaved: local (each thread count) then dask, `repeats` times, so that a change of
            # the machine's load during the run hits both alike
            local_times = {th: [] for th in local_threads}
            dask_times, timings = [], []
            for r in range(args.warmup + args.repeats):
                for th in local_threads:
                    torch.set_num_threads(th)
                    dt = time_one(lambda: local.evaluate(model, mb, criteria, "all"))
                    if r >= args.warmup:
                        local_times[th].append(dt)
                torch.set_num_threads(default_threads)
                dt = time_one(lambda: ev.evaluate(model, mb, criteria, "all"))
                if r >= args.warmup:
                    dask_times.append(dt)
                    timings.append(dict(ev.last_timings))
            breakdown = {k: statistics.median(t[k] for t in timings) for k in timings[0] if k != "attempts"}
            diff = max_rel_grad_diff(local.evaluate(model, mb, criteria, "all").grads,
                                     ev.evaluate(model, mb, criteria, "all").grads)
            for th in local_threads:
                results["local"][f"{n}@{th}"] = local_times[th]
                print(f"local  {n:>6} samples, {th} driver thread(s): median "
                      f"{statistics.median(local_times[th]) * 1e3:9.1f} ms", flush=True)
            results["dask"][str(n)] = {"times": dask_times, "breakdown": breakdown, "max_rel_grad_diff": diff}
            print(f"dask   {n:>6} samples: median {statistics.median(dask_times) * 1e3:9.1f} ms  (" +
                  ", ".join(f"{k} {v * 1e3:.1f}" for k, v in breakdown.items()) +
                  f" ms; max rel grad diff vs local {diff:.1e})", flush=True)
    results["load_average_end"] = os.getloadavg()
    print(f"load average at the end: {os.getloadavg()[0]:.2f}", flush=True)

    print("\n| samples | local (driver threads) median ms | dask median ms | dask / local |")
    print("|---:|---|---:|---:|")
    for n in args.sizes:
        d = statistics.median(results["dask"][str(n)]["times"])
        loc = {t: statistics.median(results["local"][f"{n}@{t}"]) for t in local_threads}
        cells = ", ".join(f"{v * 1e3:.1f} ({t} thr)" for t, v in loc.items())
        ratios = ", ".join(f"{d / v:.2f} (vs {t} thr)" for t, v in loc.items())
        print(f"| {n} | {cells} | {d * 1e3:.1f} | {ratios} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
