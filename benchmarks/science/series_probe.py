"""How well the Taylor series of the KDK step's energy error predicts the oracle's dt, by order
(benchmarks/README.md, "An error series"). Never the held-out sets:

- on the validation systems of a mixture config (validate.py's: initial_conditions.seed = 12345),
  advanced with the oracle for --steps steps: per family, the spread of log(dt_series / dt_oracle)
  for the series truncated at each order (one truncation) and for the default guarded reading;
- on Plummer spheres of --plummer-n bodies at validate.PLUMMER_SEED... over t = 0..0.5, stepped at
  --safety x the series' dt: the steps at or over the tolerance, per order.

    python benchmarks/science/series_probe.py [--config configs/general.toml] [--orders 5,6,8,10,12]
                                              [--steps 8] [--plummer-n 64] [--safety 0.9]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from validate import PLUMMER_SEED, family_labels  # noqa: E402

from nbody_dt.config import load  # noqa: E402
from nbody_dt.physics import initial_conditions as ics  # noqa: E402
from nbody_dt.physics.error_series import TRUNCATIONS, energy_error_series, series_dt  # noqa: E402
from nbody_dt.physics.gravity import Gravity, min_freefall_time  # noqa: E402
from nbody_dt.physics.integrator import step_error  # noqa: E402
from nbody_dt.physics.policies import oracle_dt  # noqa: E402
from nbody_dt.training.setup import initial_states  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def readings(orders: list[int]) -> dict[str, tuple[int, int]]:
    """The series' readings by name, as (order, truncations): each order alone, and the guarded
    default at the highest."""
    out = {f"order {k}": (k, 1) for k in orders}
    out[f"order {max(orders)}, guarded ({TRUNCATIONS} truncations)"] = (max(orders), TRUNCATIONS)
    return out


def reading_dt(state, gravity: Gravity, tol: float, order: int, truncations: int) -> torch.Tensor:
    """The series' dt read at `order` with `truncations`."""
    c = energy_error_series(state, gravity, order)
    return series_dt(c, tol, min_freefall_time(state, gravity), truncations=truncations)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "general.toml"))
    ap.add_argument("--orders", default="5,6,8,10,12")
    ap.add_argument("--steps", type=int, default=8, help="oracle steps per validation system")
    ap.add_argument("--plummer-n", type=int, default=64)
    ap.add_argument("--spheres", type=int, default=5)
    ap.add_argument("--safety", type=float, default=0.9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    orders = sorted(int(k) for k in args.orders.split(","))
    cfg = load(args.config)
    cfg = cfg.model_copy(update={"initial_conditions": cfg.initial_conditions.model_copy(update={"seed": 12345})})
    tol, gravity = cfg.collect.energy_threshold, Gravity(cfg.physics.G, cfg.physics.softening)
    state, labels = initial_states(cfg), family_labels(cfg)
    ratios: dict[str, list[torch.Tensor]] = {}
    for _ in range(args.steps):
        oracle = oracle_dt(state, gravity, tol)
        c, t_min = energy_error_series(state, gravity, max(orders)), min_freefall_time(state, gravity)
        for name, (order, truncations) in readings(orders).items():  # one series, truncated per reading
            dt = series_dt(c[:, :order + 1], tol, t_min, truncations=truncations)
            ratios.setdefault(name, []).append(torch.log(dt / oracle))
        state, _ = step_error(state, oracle, gravity)
    groups = {name: [k for k, lab in enumerate(labels) if lab == name] for name in dict.fromkeys(labels)}
    groups["all"] = list(range(len(labels)))
    print(f"std of log(dt_series / dt_oracle), validation systems (seed 12345), {args.steps} oracle steps each")
    print(f"{'reading':<34} " + " ".join(f"{g:>15}" for g in groups))
    for name, rows in ratios.items():
        lr = torch.stack(rows, 1)
        print(f"{name:<34} " + " ".join(f"{float(lr[r].std()):>15.3f}" for r in groups.values()))

    print(f"\nPlummer N = {args.plummer_n}, {args.spheres} spheres (seeds {PLUMMER_SEED}...), t = 0..0.5, "
          f"softening 0.01, dt = {args.safety} x the series' dt: steps at or over the tolerance")
    soft = Gravity(1.0, 0.01)
    for name, (order, truncations) in readings(orders).items():
        over = steps = 0
        for seed in range(PLUMMER_SEED, PLUMMER_SEED + args.spheres):
            sphere, t = ics.plummer_sphere(args.plummer_n, seed), 0.0
            while t < 0.5:
                dt = args.safety * reading_dt(sphere, soft, tol, order, truncations)
                sphere, err = step_error(sphere, dt, soft)
                t, steps, over = t + float(dt[0]), steps + 1, over + int(not float(err[0]) < tol)
        print(f"{name:<34} {over} of {steps}", flush=True)


if __name__ == "__main__":
    main()
