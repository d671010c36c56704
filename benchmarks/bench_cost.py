"""What a learned step costs against the work it saves (issue 12), CPU or GPU.

    python benchmarks/bench_cost.py [--checkpoint RUN|FILE] [--n 16,64,256,1024] [--batch 1]
                                    [--pairs all,per_body,system] [--wall-n 64] [--device cpu]

Part 1, per N (Plummer spheres, softening 0.01): the median time of one network evaluation
(`log_dt` of the set network: pair features incl. the tidal field, encoder, pooling; with
model.error_series also the series of the step's error, timed alone as well), one
direct-summation force evaluation (`accelerations`) and one energy evaluation (`total_energy`)
of the same batch, for each pair selection (all pairs, the k tightest of each body, the k
tightest of the system). A KDK step costs one force evaluation; the reject/retry controller
also pays one energy evaluation per try; the learned policy, a pure predictor, pays the
network instead.

Part 2 (--wall-n): wall time of integrating held-out Plummer spheres over t = 0..t_end with the
learned policy as a pure predictor (network + KDK, no energy) against the controller (KDK +
energy per try, E0 cached), both at the same tolerance (--wall-repeats R: each set R times, the
median wall times and ratio, and the ratio's range); the learned steps, and the controller's tries and
accepted steps. Both KDKs evaluate the start force afresh (neither caches it). The network is
called once before (its compiled kernels load on a process's first call; that time is printed).

Without --checkpoint the network is the untrained set network of configs/general.toml (the cost
does not depend on the weights; part 2 then needs a checkpoint and is skipped).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

from nbody_dt.allocator import retain_freed_memory  # noqa: E402
from nbody_dt.config import load  # noqa: E402
from nbody_dt.model.set_network import SetDtNetwork, build_network  # noqa: E402
from nbody_dt.physics import initial_conditions as ics  # noqa: E402
from nbody_dt.physics.error_series import error_series_dt  # noqa: E402
from nbody_dt.physics.gravity import Gravity, accelerations, min_freefall_time, total_energy  # noqa: E402
from nbody_dt.physics.integrator import kdk_step, relative_energy_error  # noqa: E402

SOFTENING = 0.01
SEED = 1_000_003


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls after one warm-up call."""
    with torch.no_grad():
        fn()
        _sync(device)
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def per_n_costs(model: SetDtNetwork, ns: list[int], batch: int, selections: list[str], k: int,
                device: torch.device, max_all_n: int = 256) -> list[dict]:
    g = Gravity(1.0, SOFTENING)
    rows = []
    for n in ns:
        state = ics.plummer_sphere(n, SEED, batch).to(device=device)
        repeats = max(3, min(50, int(2e6 / (n * n * batch))))
        force = timed(lambda: accelerations(state.position, state.mass, g), device, repeats)
        energy = timed(lambda: total_energy(state, g), device, repeats)
        row = {"n": n, "batch": batch, "force_ms": 1e3 * force, "energy_ms": 1e3 * energy, "network": {}}
        if model.error_series:  # the network's base alone: the series of the step's error and its dt
            series = timed(lambda: error_series_dt(state, g, model.threshold, model.error_series), device,
                           max(3, repeats // 4))
            row["series"] = {"ms": 1e3 * series, "x_force": series / force}
        for how in selections:
            if how == "all" and n > max_all_n:
                continue
            net = model.for_gravity(g)
            net.pairs, net.pair_k = how, k
            t = timed(lambda: net.log_dt(state), device, max(3, repeats // 4))
            row["network"][how] = {"ms": 1e3 * t, "x_force": t / force}
        rows.append(row)
        print(f"N={n:5d}  force {1e3 * force:9.3f} ms  energy {1e3 * energy:9.3f} ms  "
              + (f"series {row['series']['ms']:9.3f} ms ({row['series']['x_force']:.2f}x force)  " if "series" in row
                 else "")
              + "  ".join(f"net[{h}] {v['ms']:9.3f} ms ({v['x_force']:.2f}x force)" for h, v in row["network"].items()),
              flush=True)
    return rows


def learned_wall(model: SetDtNetwork, state, g: Gravity, t_end: float) -> tuple[float, int]:
    """Pure predictor: network dt, one KDK step, no energy evaluation."""
    net = model.for_gravity(g)
    t, steps = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        while t < t_end * (1 - 1e-12):
            dt = torch.minimum(net(state), torch.full((1,), t_end - t, dtype=state.dtype))
            state = kdk_step(state, dt, g)
            t += float(dt[0])
            steps += 1
    return time.perf_counter() - t0, steps


def controller_wall(state, g: Gravity, t_end: float, tol: float, safety: float = 0.9) -> tuple[float, int, int]:
    """Reject/retry on the single-step error: one KDK and one energy evaluation per try (E0 cached);
    wall seconds, tries and accepted steps."""
    t, tries, accepted = 0.0, 0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        dt_next = 0.01 * float(min_freefall_time(state, g)[0])
        e0 = total_energy(state, g)
        while t < t_end * (1 - 1e-12):
            dt = min(dt_next, t_end - t)
            after = kdk_step(state, torch.full((1,), dt, dtype=state.dtype), g)
            e1 = total_energy(after, g)
            err = float(relative_energy_error(e0, e1)[0])
            tries += 1
            if not math.isfinite(err):
                factor = 0.25
            else:
                factor = 2.0 if err == 0 else min(2.0, max(0.25, safety * (tol / err) ** (1 / 3)))
            if err < tol:
                state, e0, t = after, e1, t + dt
                accepted += 1
                if dt == dt_next:
                    dt_next = dt * factor
            else:
                dt_next = dt * factor
    return time.perf_counter() - t0, tries, accepted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a set-network checkpoint file or run (default: untrained, "
                    "configs/general.toml)")
    ap.add_argument("--n", default="16,64,256,1024")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pairs", default="all,per_body,system")
    ap.add_argument("--k", type=int, default=8, help="k of per_body / system (default 8)")
    ap.add_argument("--max-all-n", type=int, default=256, help="largest N timed with all pairs (N = 1024: 523,776 "
                    "pairs, seconds a call)")
    ap.add_argument("--wall-n", default="64", help="Plummer N for part 2 (comma-separated; empty: skip)")
    ap.add_argument("--wall-systems", type=int, default=3)
    ap.add_argument("--t-end", type=float, default=0.25)
    ap.add_argument("--wall-repeats", type=int, default=1, help="part 2: simulate each set this many times; the "
                    "median ratio and its range")
    ap.add_argument("--threshold", type=float, default=2e-4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    retain_freed_memory()  # as the CLI does
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"machine: {cpu_model()}, torch {torch.__version__}, {args.threads} thread(s), device {device}", flush=True)
    if args.checkpoint:
        from nbody_dt.cli import load_learned

        model = load_learned(args.checkpoint)[0]
        if not isinstance(model, SetDtNetwork):
            raise SystemExit(f"--checkpoint {args.checkpoint}: not a set network (model.kind = 'set')")
    else:
        cfg = load(str(Path(__file__).resolve().parents[1] / "configs" / "general.toml"))
        model = build_network(cfg, 2)
    model = model.to(device).eval()
    print(f"network: hidden {[m.out_features for m in model.encoder if hasattr(m, 'out_features')]}, "
          f"{sum(p.numel() for p in model.parameters())} parameters, {next(model.parameters()).dtype}", flush=True)
    per_n_costs(model, [int(x) for x in args.n.split(",") if x], args.batch, args.pairs.split(","), args.k, device,
                args.max_all_n)
    if args.checkpoint and args.wall_n:
        g = Gravity(1.0, SOFTENING)
        # the compiled kernels load (or compile) on a process's first call: once, not per step
        t0 = time.perf_counter()
        with torch.no_grad():
            model.for_gravity(g)(ics.plummer_sphere(8, SEED, 1).to(device=device))
        print(f"first network call (loads the compiled kernels): {time.perf_counter() - t0:.2f} s", flush=True)
        for n in [int(x) for x in args.wall_n.split(",")]:
            ratios, walls = [], []
            for _ in range(args.wall_repeats):  # the whole set again: the ratio's spread on a shared machine
                lw = cw = 0.0
                ls = ct = ca = 0
                for s in range(args.wall_systems):
                    state = ics.plummer_sphere(n, SEED + s, 1).to(device=device)
                    w, steps = learned_wall(model, state, g, args.t_end)
                    lw, ls = lw + w, ls + steps
                    w, tries, accepted = controller_wall(state, g, args.t_end, args.threshold)
                    cw, ct, ca = cw + w, ct + tries, ca + accepted
                ratios.append(lw / cw)
                walls.append((lw, cw))
            lw, cw = (statistics.median(w[k] for w in walls) for k in (0, 1))
            spread = f" (repeats: {min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
            print(f"wall N={n}: {args.wall_systems} spheres, t=0..{args.t_end:g}: learned {lw:.3f} s ({ls} steps), "
                  f"controller {cw:.3f} s ({ct} tries, {ca} accepted; a try is a KDK and an energy evaluation); "
                  f"learned / controller wall {statistics.median(ratios):.2f}{spread}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
