"""Validation of a trained model on fresh systems of its own training distribution (the config's
initial conditions at another seed), never on the held-out sets: what design choices are made on.

Every system is advanced with the per-step oracle for --steps steps; at each visited state the
model's dt is compared with the oracle's and stepped once: the median oracle/model dt ratio (the
model's force evaluations per oracle evaluation, roughly), the share of model steps at or over the
tolerance, and the spread of log(dt_model / dt_oracle), per family of a mixture and overall.

    python benchmarks/science/validate.py CHECKPOINT_OR_RUN [--ic-seed 12345] [--steps 64]
    python benchmarks/science/validate.py CHECKPOINT_OR_RUN --plummer 64 [--spheres 5] [--t-end 0.5]

--plummer N validates a set network at an N it was not trained on instead: Plummer spheres of N
(softening 0.01) at seeds 7000, 7001, ... (not the held-out seeds), stepped with the model as a
pure predictor over t = 0..t_end; the share of steps at or over the tolerance and, for a model on
the error series (model.error_series), its dt against the series' own.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import run as B  # noqa: E402

from nbody_dt.model.evaluate import evaluate_step  # noqa: E402
from nbody_dt.model.history import History  # noqa: E402
from nbody_dt.model.set_network import SetDtNetwork  # noqa: E402
from nbody_dt.physics import initial_conditions as ics  # noqa: E402
from nbody_dt.physics.error_series import error_series_dt  # noqa: E402
from nbody_dt.physics.gravity import Gravity  # noqa: E402
from nbody_dt.physics.integrator import step_error  # noqa: E402
from nbody_dt.physics.policies import oracle_dt  # noqa: E402
from nbody_dt.training.setup import initial_states, mixture_counts  # noqa: E402


def family_labels(cfg) -> list[str]:
    """One label per system of initial_states(cfg): 'family N' for a mixture, the kind otherwise."""
    ic = cfg.initial_conditions
    if ic.kind != "mixture":
        return [ic.kind] * ic.num_orbits
    counts = mixture_counts(ic.family_weights, ic.num_orbits)
    return [f"{f} {n}" for f, n, c in zip(ic.families, ic.family_n, counts) for _ in range(c)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--ic-seed", type=int, default=12345, help="seed of the validation systems (not the run's)")
    ap.add_argument("--steps", type=int, default=64, help="oracle steps per system")
    ap.add_argument("--plummer", type=int, metavar="N", help="validate on Plummer spheres of N bodies instead")
    ap.add_argument("--spheres", type=int, default=5, help="--plummer: how many spheres")
    ap.add_argument("--t-end", type=float, default=0.5, help="--plummer: end time of each sphere")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, criteria, cfg = B.load_checkpoint(args.checkpoint)
    if args.plummer:
        plummer_validation(model, cfg.collect.energy_threshold, args.plummer, args.spheres, args.t_end)
        return
    tol = cfg.collect.energy_threshold
    ic = cfg.initial_conditions.model_copy(update={"seed": args.ic_seed})
    cfg = cfg.model_copy(update={"initial_conditions": ic})
    gravity = Gravity(cfg.physics.G, cfg.physics.softening)
    state = initial_states(cfg)
    labels = family_labels(cfg)
    ratios, over = [], []
    for _ in range(args.steps):
        d = oracle_dt(state, gravity, tol)
        with torch.no_grad():
            ev = evaluate_step(model, state, History.empty(state, model.history_len), criteria, with_loss=False)
        ratios.append(torch.log(ev.dt / d))
        over.append(~(ev.rel_dE < tol))  # NaN counts as over
        state, _ = step_error(state, d, gravity)
    ratios, over = torch.stack(ratios, 1), torch.stack(over, 1)  # (B, steps)
    groups = {name: [k for k, lab in enumerate(labels) if lab == name] for name in dict.fromkeys(labels)}
    groups["all"] = list(range(len(labels)))
    print(f"{args.checkpoint}: validation systems at initial_conditions.seed = {args.ic_seed}, {args.steps} oracle "
          f"steps each, tolerance {tol:g}")
    print(f"{'family':<16} {'systems':>7} {'oracle/model dt (median)':>24} {'% over':>7} {'std log ratio':>13}")
    for name, rows in groups.items():
        lr, ov = ratios[rows].flatten(), over[rows].flatten()
        print(f"{name:<16} {len(rows):>7} {float(torch.exp(-lr).median()):>24.3f} "
              f"{100 * float(ov.double().mean()):>7.1f} {float(lr.std()):>13.3f}", flush=True)


PLUMMER_SEED = 7000
"""Seeds of the unseen-N validation spheres (the held-out ones start at run.HELD_OUT_SEED)."""


def plummer_validation(model, tol: float, n: int, spheres: int, t_end: float) -> None:
    """The model as a pure predictor on Plummer spheres of n bodies: steps over the tolerance, and
    for a model on the error series its dt against the series' own."""
    if not isinstance(model, SetDtNetwork):
        raise SystemExit("--plummer: needs a set network (model.kind = 'set')")
    gravity = Gravity(1.0, 0.01)
    net = model.for_gravity(gravity)
    series = net.error_series
    steps, over, log_ratio = 0, 0, []
    for seed in range(PLUMMER_SEED, PLUMMER_SEED + spheres):
        state, t = ics.plummer_sphere(n, seed), 0.0
        while t < t_end:
            with torch.no_grad():
                predicted = net(state)
            if series:
                log_ratio.append(float(torch.log(predicted / error_series_dt(state, gravity, tol, series))[0]))
            dt = torch.clamp(predicted, max=t_end - t)
            state, err = step_error(state, dt, gravity)
            t, steps, over = t + float(dt[0]), steps + 1, over + int(not float(err[0]) < tol)
    line = f"Plummer N = {n}, {spheres} spheres (seeds {PLUMMER_SEED}...), t = 0..{t_end:g}: {over} of {steps} steps " \
           f"over the tolerance ({100 * over / steps:.1f} %)"
    if log_ratio:
        lr = torch.tensor(log_ratio)
        line += f"; log(dt / series dt) mean {float(lr.mean()):+.3f}, std {float(lr.std()):.3f}"
    print(line)


if __name__ == "__main__":
    main()
