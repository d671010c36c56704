"""Work-precision benchmark (issue 15): long-horizon energy error against force evaluations.

    python benchmarks/science/work_precision.py --kepler RUN [--three-body RUN] [--plummer RUN]
        [--out DIR] [--tolerances 5e-5,2e-4,8e-4] [--problems kepler-0.9,figure8] [--plummer-spheres 5]
        [--quick]

Problems: Kepler e = 0.5, 0.9, 0.99 (a = 1, equal masses, from apocentre) over 1000 periods,
the figure-eight over 100 periods, held-out Plummer spheres of 16 bodies (softening of the
N = 16 model, else 0.01) over 10 crossing times (t_cr = 2 sqrt(2) in Henon units). A 16-body
sphere is chaotic over that horizon: which close encounters a run meets, and so its cost and
error, change with the policy, so one sphere gives anecdotes. --plummer-spheres K (default 5)
runs K spheres and reports, per policy and tolerance, their summed force evaluations and the
median of each energy figure (the per-sphere rows are kept in the JSON). Policies, each at every
per-step tolerance:

- learned, learned-sym: the network of the problem's N (plain, and the time-symmetric step of
  model/symmetric.py), fitted to each tolerance by model.policy.at_threshold (a network on the
  error series reads the series there; any other scales its dt by (tolerance / trained
  tolerance)^(1/3), the dt^3 law of the single-step error); skipped where no model of that N is given;
- oracle: the per-step oracle (one evaluation a step, its search not counted);
- controller: reject/retry on the single-step error (every try counted);
- freefall: dt = eta t_ff, eta tuned per problem and tolerance to the largest value (to 2 %)
  with no step over the tolerance during the first 1 % of the horizon (at least one period).

Per run: force evaluations (every one the policy spends), % of steps over the tolerance, final
and maximum |dE/E|, the maximum over the first 1 % and over the last 10 % of the horizon (first 10
and last 100 of 1000 periods), and the drift rate: the log-log slope of the running maximum of
|dE/E| against time over the last two decades of the horizon (0: bounded, 0.5: random walk,
1: linear drift). Writes work_precision.json, work_precision.md (the table) and one PNG per
problem (force evaluations against max |dE/E|) to --out. --quick: tiny horizons, one tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).parent))
import run as B  # noqa: E402

from nbody_dt.model.policy import make_policy, run_problem  # noqa: E402
from nbody_dt.physics import initial_conditions as ics  # noqa: E402
from nbody_dt.physics.gravity import Gravity, total_energy  # noqa: E402
from nbody_dt.physics.policies import Advance  # noqa: E402
from nbody_dt.physics.problems import Problem, make_problem  # noqa: E402
from nbody_dt.physics.state import State  # noqa: E402

POLICIES = ("learned", "learned-sym", "oracle", "controller", "freefall")
PROBLEMS = ("kepler-0.5", "kepler-0.9", "kepler-0.99", "figure8", "plummer16")
CROSSING_TIME = 2 * math.sqrt(2)
"""Crossing time of a Plummer sphere in Henon units (G = M = 1, E = -1/4)."""


@dataclass(frozen=True)
class Case:
    name: str
    problems: tuple[Problem, ...]
    """One problem, or an ensemble whose runs are aggregated into one row (see `aggregate`)."""
    unit: float
    """One period (Kepler, figure-eight) or crossing time (Plummer): the horizon's unit."""
    n_bodies: int


def make_cases(names: list[str], quick: bool, kepler_periods: float, plummer_softening: float,
               plummer_spheres: int) -> list[Case]:
    cases = []
    for name in names:
        if name.startswith("kepler-"):
            periods = 2.0 if quick else kepler_periods
            p = make_problem("kepler", e=float(name.split("-")[1]), periods=periods)
            cases.append(Case(name, (p,), p.t_end / periods, 2))
        elif name == "figure8":
            periods = 0.5 if quick else 100.0
            cases.append(Case(name, (make_problem("figure8", periods=periods),), ics.FIGURE_EIGHT_PERIOD, 3))
        elif name == "plummer16":
            t_end = 0.05 if quick else 10 * CROSSING_TIME
            spheres = tuple(make_problem("plummer", n=16, seed=B.HELD_OUT_SEED + k, t_end=t_end,
                                         softening=plummer_softening, dim=3) for k in range(plummer_spheres))
            cases.append(Case(name, spheres, CROSSING_TIME, 16))
        else:
            raise SystemExit(f"unknown problem {name!r} (choose from {', '.join(PROBLEMS)})")
    return cases


@dataclass
class EnergyTrace:
    """Wraps a policy and follows |E(t) - E0| / |E0| after every step: its maximum overall, over the
    first 1 % and the last 10 % of the horizon, and the running maximum at log-spaced times."""

    inner: object
    gravity: Gravity
    e0: float
    t_end: float
    t: float = 0.0
    max_all: float = 0.0
    max_early: float = 0.0
    max_late: float = 0.0
    samples: list[tuple[float, float]] = field(default_factory=list)
    _next_sample: float = 0.0

    def advance(self, state: State, max_dt: float) -> Advance:
        adv = self.inner.advance(state, max_dt)
        self.t += adv.dt
        err = abs(float(total_energy(adv.state, self.gravity)[0]) - self.e0) / abs(self.e0)
        err = err if math.isfinite(err) else math.inf
        self.max_all = max(self.max_all, err)
        if self.t <= 0.01 * self.t_end:
            self.max_early = max(self.max_early, err)
        if self.t >= 0.9 * self.t_end:
            self.max_late = max(self.max_late, err)
        if self.t >= self._next_sample:
            self.samples.append((self.t, self.max_all))
            self._next_sample = self.t * 1.05
        return adv

    def drift_rate(self) -> float | None:
        """Least-squares slope of log(running max) against log t, t in [t_end / 100, t_end]."""
        pts = [(math.log(t), math.log(m)) for t, m in self.samples + [(self.t, self.max_all)]
               if t >= 0.01 * self.t_end and 0 < m < math.inf]
        if len(pts) < 3:
            return None
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx > 0 else None


def tune_eta(case: Case, tol: float) -> float:
    """The tuned free-fall eta on the first 1 % of the horizon (at least one period), one eta for
    every problem of the case."""
    heads = [Problem(p.state, min(p.t_end, max(0.01 * p.t_end, case.unit)), p.gravity) for p in case.problems]
    return B.tune_freefall_eta(heads, tol)


def run_case(case: Case, name: str, tol: float, learned: tuple | None, eta: float | None) -> dict:
    """One policy at one tolerance on the case: its row, aggregated over an ensemble."""
    runs = [run_one(p, name, tol, learned, eta) for p in case.problems]
    return runs[0] if len(runs) == 1 else aggregate(runs)


def aggregate(runs: list[dict]) -> dict:
    """The ensemble's row: summed counts and wall time, steps over the tolerance pooled, the median of
    every energy figure and drift rate; the per-problem rows under "runs"."""
    def median(key: str) -> float | None:
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.median(values) if values else None

    def total(key: str) -> int | float | None:
        return None if any(r[key] is None for r in runs) else sum(r[key] for r in runs)

    over = sum(r["pct_over_tolerance"] * r["accepted_steps"] / 100.0 for r in runs)
    return {"policy": runs[0]["policy"], "tolerance": runs[0]["tolerance"], "eta": runs[0]["eta"],
            "force_evaluations": total("force_evaluations"), "accepted_steps": total("accepted_steps"),
            "pct_over_tolerance": 100.0 * over / total("accepted_steps"),
            **{key: median(key) for key in ("final_rel_dE", "max_rel_dE", "max_rel_dE_first_1pct",
                                            "max_rel_dE_last_10pct", "drift_rate")},
            "wall_s": total("wall_s"), "network_calls": total("network_calls"), "runs": runs}


def run_one(p: Problem, name: str, tol: float, learned: tuple | None, eta: float | None) -> dict:
    kwargs: dict = {}
    if name.startswith("learned"):
        model, criteria, _ = learned
        kwargs = dict(model=model, criteria=criteria, symmetric=name == "learned-sym")
    policy = make_policy("learned" if name.startswith("learned") else name, p, tol, eta=eta, **kwargs)
    trace = EnergyTrace(policy, p.gravity, float(total_energy(p.state, p.gravity)[0]), p.t_end)
    res = run_problem(p, trace, tol, record=False)
    return {"policy": name, "tolerance": tol, "eta": eta, "force_evaluations": res.steps,
            "accepted_steps": res.accepted_steps, "pct_over_tolerance": 100.0 * res.violations / res.accepted_steps,
            "final_rel_dE": res.final_rel_dE, "max_rel_dE": trace.max_all, "max_rel_dE_first_1pct": trace.max_early,
            "max_rel_dE_last_10pct": trace.max_late, "drift_rate": trace.drift_rate(), "wall_s": res.wall_s,
            "network_calls": getattr(policy, "network_evaluations", None)}


def _interp_loglog(xs: list[float], ys: list[float], x: float) -> float:
    """log-log linear interpolation of a curve at x (extrapolation by the nearest segment)."""
    pts = sorted(zip(xs, ys))
    if len(pts) == 1:
        return pts[0][1]
    k = next((i for i in range(1, len(pts) - 1) if x < pts[i][0]), len(pts) - 1)
    (x0, y0), (x1, y1) = pts[k - 1], pts[k]
    if x0 == x1 or y0 <= 0 or y1 <= 0:
        return min(y0, y1)
    f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0)))


def below(rows: list[dict], policy: str, other: str) -> list[bool] | None:
    """Per point of `policy`'s curve: is its max |dE/E| below `other`'s curve at the same force evaluations?"""
    mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["force_evaluations"])
    theirs = [r for r in rows if r["policy"] == other]
    if not mine or not theirs:
        return None
    xs, ys = [r["force_evaluations"] for r in theirs], [r["max_rel_dE"] for r in theirs]
    return [r["max_rel_dE"] < _interp_loglog(xs, ys, r["force_evaluations"]) for r in mine]


def plot(case: Case, rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for name in POLICIES:
        pts = sorted((r["force_evaluations"], r["max_rel_dE"], r["tolerance"]) for r in rows if r["policy"] == name)
        if pts:
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], "o-", label=name)
            for x, y, tol in pts:
                ax.annotate(f"{tol:g}", (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("force evaluations")
    ax.set_ylabel("max |dE/E| over the run")
    spheres = f", median of {len(case.problems)}" if len(case.problems) > 1 else ""
    ax.set_title(f"{case.name}, t_end = {case.problems[0].t_end / case.unit:g} x "
                 f"{'t_cr' if case.n_bodies > 3 else 'T'}{spheres}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict) -> str:
    head = ("problem", "policy", "tol", "force evals", "x oracle", "% over", "final |dE/E|", "max |dE/E|",
            "max first 1 %", "max last 10 %", "drift", "wall s")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for prob, rows in results.items():
        oracle = {r["tolerance"]: r["force_evaluations"] for r in rows if r["policy"] == "oracle"}
        for r in rows:
            ratio = f"{r['force_evaluations'] / oracle[r['tolerance']]:.3f}" if r["tolerance"] in oracle else ""
            name = r["policy"] + (f" eta={r['eta']:.3g}" if r["eta"] else "")
            drift = "" if r["drift_rate"] is None else f"{r['drift_rate']:.2f}"
            lines.append(f"| {prob} | {name} | {r['tolerance']:g} | {r['force_evaluations']} | {ratio} | "
                         f"{r['pct_over_tolerance']:.2f} | {r['final_rel_dE']:.2e} | {r['max_rel_dE']:.2e} | "
                         f"{r['max_rel_dE_first_1pct']:.2e} | {r['max_rel_dE_last_10pct']:.2e} | {drift} | "
                         f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def save(out: Path, tolerances: list[float], args: argparse.Namespace, results: dict) -> None:
    (out / "work_precision.json").write_text(json.dumps(
        {"tolerances": tolerances, "quick": args.quick, "kepler_periods": args.kepler_periods, "results": results},
        indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kepler", help="N = 2 model: a checkpoint file or run URL")
    ap.add_argument("--three-body", help="N = 3 model (figure-eight)")
    ap.add_argument("--plummer", help="N = 16 model (Plummer sphere)")
    ap.add_argument("--out", default="work_precision", help="output directory (default ./work_precision)")
    ap.add_argument("--tolerances", default="5e-5,2e-4,8e-4", help="per-step |dE/E| tolerances")
    ap.add_argument("--problems", default=",".join(PROBLEMS), help="comma-separated subset of " + ",".join(PROBLEMS))
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of " + ",".join(POLICIES))
    ap.add_argument("--kepler-periods", type=float, default=1000.0, help="Kepler horizon in periods (default 1000)")
    ap.add_argument("--plummer-spheres", type=int, default=5,
                    help="Plummer spheres in the plummer16 ensemble (default 5; 1: the first sphere alone)")
    ap.add_argument("--quick", action="store_true", help="tiny horizons and one tolerance (2e-4): a smoke run")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tolerances = [2e-4] if args.quick else [float(t) for t in args.tolerances.split(",")]
    policies = [p for p in args.policies.split(",") if p]
    if set(policies) - set(POLICIES):
        ap.error(f"unknown policies {sorted(set(policies) - set(POLICIES))}")
    if args.plummer_spheres < 1:
        ap.error(f"--plummer-spheres must be at least 1, got {args.plummer_spheres}")
    models = {}
    for n, source in ((2, args.kepler), (3, args.three_body), (16, args.plummer)):
        if source:
            models[n] = B.load_checkpoint(source)
    softening = models[16][2].physics.softening if 16 in models else 0.01
    cases = make_cases([p for p in args.problems.split(",") if p], args.quick, args.kepler_periods, softening,
                       args.plummer_spheres)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    for case in cases:
        rows = results.setdefault(case.name, [])
        for tol in tolerances:
            eta = tune_eta(case, tol) if "freefall" in policies else None
            for name in policies:
                learned = models.get(case.n_bodies)
                if name.startswith("learned") and learned is None:
                    continue
                rows.append(run_case(case, name, tol, learned, eta if name == "freefall" else None))
                save(out, tolerances, args, results)
                r = rows[-1]
                print(f"{case.name:<12} {name:<11} tol={tol:<7g} evals={r['force_evaluations']:<8} "
                      f"max|dE/E|={r['max_rel_dE']:.2e} last/first={r['max_rel_dE_last_10pct']:.2e}/"
                      f"{r['max_rel_dE_first_1pct']:.2e} ({r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        plot(case, rows, out / f"work_precision_{case.name}.png")
        summary = {other: below(rows, "learned-sym", other) for other in ("controller", "freefall")}
        print(f"{case.name}: learned-sym below controller / freefall: {summary}", file=sys.stderr, flush=True)
    (out / "work_precision.md").write_text(table(results) + "\n")
    print(table(results))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
