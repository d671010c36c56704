"""Science benchmark: learned dt against the per-step oracle, the reject/retry controller and a
tuned free-fall criterion, on held-out initial conditions.

    python benchmarks/science/run.py --checkpoint PATH|RUN [--quick] [--json OUT]

For a checkpoint file (or a run URL: its newest intact checkpoint) it simulates held-out
systems with five policies and prints one table:

- learned:    the network's dt as a pure predictor (no rejection, one force evaluation a step);
- oracle:     the per-step oracle, the largest dt whose single-step |dE/E| stays below the
              tolerance (an idealized cost: one force evaluation a step, its search not counted);
- controller: reject/retry control on the single-step error (every try costs a force evaluation);
- freefall:   dt = eta * min pair free-fall time, eta tuned per set by this script to the largest
              value (to 2 %) with no step over the tolerance on any system of the set;
- series:     0.9 x the dt at which the Taylor series of the step's own energy error reaches the
              tolerance (physics/error_series.py: model-free, one force evaluation a step, its
              arithmetic not counted), the physics a set network with model.error_series corrects.

Held-out sets depend on the model's number of bodies N (an MLP has a fixed input size; every set
then uses the model's G, softening and dim, configs/plummer16.toml: softening 0.01). A set network
(model.kind = 'set', any N) runs every set below, the Kepler and N = 3 sets in 2-D without
softening, Plummer spheres of N = 16, 32 and 64 with softening 0.01, and 5 hierarchical systems
of N = 6 (3-D, no softening, t = 0..50); N >= 32: 5 spheres over t = 0..0.5:

- N = 2:  Kepler e = 0.5, 0.9, 0.99 (a = 1, equal masses, from apocentre) over 10 periods;
          'kepler in-range': 10 orbits sampled from the training ranges with a held-out seed;
          'kepler out-of-range': 10 orbits outside them (a and masses up to 10x outside the
          training ranges, mass ratios 0.01-1, pericentre starts, half with e beyond the
          training maximum).
- N = 3:  the figure-eight (5 periods), the Pythagorean problem (t = 0..10), and 10 perturbed
          figure-eights.
- N = 16: 10 held-out Plummer spheres (different seeds), t = 0..1 (about a third of a crossing time).

Columns: force evaluations (median over a set's systems), their ratio to the oracle's (median of
per-system ratios), % of accepted steps whose single-step |dE/E| is at or over the tolerance
(median; 'max' in the JSON), final |E(t_end) - E0| / |E0| (median) and simulation wall time
(sum over the set). --quick shortens every horizon and uses 5-system ensembles.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nbody_dt.config import Config
from nbody_dt.model.evaluate import StepCriteria
from nbody_dt.model.network import DtNetwork
from nbody_dt.model.policy import make_policy, run_problem
from nbody_dt.physics import initial_conditions as ics
from nbody_dt.physics.gravity import Gravity
from nbody_dt.physics.policies import Advance
from nbody_dt.physics.problems import Problem, make_problem
from nbody_dt.physics.state import State
from nbody_dt.training.setup import initial_states

POLICIES = ("learned", "oracle", "controller", "freefall", "series")
HELD_OUT_SEED = 1_000_003
"""Seed of the held-out ensembles (training seeds are small integers)."""


# ----------------------------------------------------------------------------------------------
# checkpoint


def load_checkpoint(source: str) -> tuple[DtNetwork, StepCriteria, Config]:
    """Network, step criteria and config of a checkpoint file or of a run's newest checkpoint."""
    from nbody_dt.cli import UsageError, load_learned

    try:
        return load_learned(source)
    except UsageError as exc:
        raise SystemExit(str(exc)) from None


# ----------------------------------------------------------------------------------------------
# held-out sets


@dataclass(frozen=True)
class HeldOutSet:
    name: str
    problems: list[Problem]
    labels: list[str]


def _kepler(e: float, a: float, m1: float, m2: float, start: str, periods: float, dim: int, G: float,
            softening: float) -> Problem:
    return make_problem("kepler", e=e, a=a, m1=m1, m2=m2, start=start, periods=periods, G=G, softening=softening,
                        dim=dim)


def kepler_sets(cfg: Config, quick: bool, softening: float | None = None, dim: int | None = None) -> list[HeldOutSet]:
    ic, G = cfg.initial_conditions, cfg.physics.G
    dim = cfg.physics.dim if dim is None else dim
    eps = cfg.physics.softening if softening is None else softening
    periods, ens_periods, n_ens = (2.0, 1.0, 5) if quick else (10.0, 2.0, 10)
    sets = []
    for e in (0.5, 0.9, 0.99):
        sets.append(HeldOutSet(f"kepler e={e}", [_kepler(e, 1.0, 1.0, 1.0, "apocentre", periods, dim, G, eps)],
                               [f"e={e} a=1 q=1"]))
    gen = torch.Generator().manual_seed(HELD_OUT_SEED)
    u = torch.rand(n_ens, 6, generator=gen, dtype=torch.float64).tolist()
    (e_lo, e_hi), (a_lo, a_hi) = ic.e_range, ic.a_range

    def log_uniform(lo: float, hi: float, x: float) -> float:
        return math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * x)

    inside, in_labels = [], []
    for x in u:
        e, a = e_lo + (e_hi - e_lo) * x[0], log_uniform(a_lo, a_hi, x[1])
        inside.append(_kepler(e, a, ic.m1, ic.m2, ic.start, ens_periods, dim, G, eps))
        in_labels.append(f"e={e:.3f} a={a:.3g}")
    sets.append(HeldOutSet("kepler in-range", inside, in_labels))

    outside, out_labels = [], []
    e_beyond = min(0.995, e_hi + 0.5 * (1.0 - e_hi))
    for k, x in enumerate(u):
        e = e_lo + (e_hi - e_lo) * x[0] if k % 2 == 0 else e_hi + (e_beyond - e_hi) * x[0]
        a = log_uniform(a_lo / 10, a_lo, x[1]) if x[2] < 0.5 else log_uniform(a_hi, a_hi * 10, x[1])
        total = (ic.m1 + ic.m2) * log_uniform(0.1, 10.0, x[3])
        q = log_uniform(0.01, 1.0, x[4])  # m2 / m1
        m1, m2 = total / (1 + q), total * q / (1 + q)
        start = "pericentre" if ic.start == "apocentre" else "apocentre"
        outside.append(_kepler(e, a, m1, m2, start, ens_periods, dim, G, eps))
        out_labels.append(f"e={e:.3f} a={a:.3g} M={total:.3g} q={q:.3g} {start}")
    sets.append(HeldOutSet("kepler out-of-range", outside, out_labels))
    return sets


def _perturbed_figure_eight(dim: int, scale: float, gen: torch.Generator) -> State:
    s = ics.figure_eight(dim)
    pos = s.position + scale * torch.randn(s.position.shape, generator=gen, dtype=s.dtype)
    vel = s.velocity + scale * torch.randn(s.velocity.shape, generator=gen, dtype=s.dtype)
    if dim == 3:  # stay planar
        pos[..., 2] = 0
        vel[..., 2] = 0
    w = (s.mass / s.mass.sum(-1, keepdim=True))[..., None]
    pos = pos - (w * pos).sum(1, keepdim=True)
    vel = vel - (w * vel).sum(1, keepdim=True)
    return State(pos, vel, s.mass)


def three_body_sets(cfg: Config, quick: bool, softening: float | None = None,
                    dim: int | None = None) -> list[HeldOutSet]:
    G = cfg.physics.G
    dim = cfg.physics.dim if dim is None else dim
    eps = cfg.physics.softening if softening is None else softening
    g = Gravity(G, eps)
    f8_periods, pyth_t, n_ens = (1.0, 3.0, 5) if quick else (5.0, 10.0, 10)
    sets = [
        HeldOutSet("figure-eight", [make_problem("figure8", periods=f8_periods, G=G, softening=eps, dim=dim)],
                   [f"{f8_periods:g} periods"]),
        HeldOutSet("pythagorean", [make_problem("pythagorean", t_end=pyth_t, G=G, softening=eps, dim=dim)],
                   [f"t_end={pyth_t:g}"]),
    ]
    gen = torch.Generator().manual_seed(HELD_OUT_SEED)
    horizon = ics.FIGURE_EIGHT_PERIOD * (1.0 if quick else 2.0)
    perturbed = [Problem(_perturbed_figure_eight(dim, 0.05, gen), horizon, g) for _ in range(n_ens)]
    sets.append(HeldOutSet("figure-eight perturbed", perturbed, [f"sigma=0.05 #{k}" for k in range(n_ens)]))
    return sets


def plummer_sets(cfg: Config, n_bodies: int, quick: bool, softening: float | None = None) -> list[HeldOutSet]:
    """Held-out Plummer spheres: 10 over t = 0..1 (quick: 5 over 0..0.25); from N = 32 on, where the
    oracle's search costs ~1 s a step, 5 over t = 0..0.5."""
    G = cfg.physics.G
    eps = cfg.physics.softening if softening is None else softening
    n_ens, t_end = (5, 0.25) if quick else (10, 1.0) if n_bodies < 32 else (5, 0.5)
    seeds = [HELD_OUT_SEED + k for k in range(n_ens)]
    problems = [make_problem("plummer", n=n_bodies, seed=s, t_end=t_end, G=G, softening=eps, dim=3) for s in seeds]
    return [HeldOutSet(f"plummer N={n_bodies}", problems, [f"seed={s}" for s in seeds])]


GENERAL_PLUMMER_SOFTENING = 0.01
"""Softening of the general suite's Plummer spheres (as configs/plummer16.toml); the point-mass
sets (Kepler, N = 3, hierarchical) have none."""
HIERARCHICAL_N = 6


def hierarchical_sets(cfg: Config, n_bodies: int, quick: bool) -> list[HeldOutSet]:
    """Held-out hierarchical systems: an inner binary (a = 1) with n - 2 outer companions, t = 0..50
    (about eight inner periods), 3-D, no softening."""
    n_ens, t_end = (3, 10.0) if quick else (5, 50.0)
    seeds = [HELD_OUT_SEED + k for k in range(n_ens)]
    problems = [make_problem("hierarchical", n=n_bodies, seed=s, t_end=t_end, G=cfg.physics.G, softening=0.0, dim=3)
                for s in seeds]
    return [HeldOutSet(f"hierarchical N={n_bodies}", problems, [f"seed={s}" for s in seeds])]


def general_sets(cfg: Config, quick: bool) -> list[HeldOutSet]:
    """Every held-out set, for a set network (any N): the Kepler sets and the N = 3 sets (2-D, no
    softening), Plummer spheres of 16, 32 and 64 bodies (softening 0.01) and a hierarchical
    system of HIERARCHICAL_N bodies. N = 32, 64 and 6 are never trained on by configs/general.toml."""
    sets = kepler_sets(cfg, quick, softening=0.0, dim=2) + three_body_sets(cfg, quick, softening=0.0, dim=2)
    for n in (16, 32, 64):
        sets += plummer_sets(cfg, n, quick, softening=GENERAL_PLUMMER_SOFTENING)
    return sets + hierarchical_sets(cfg, HIERARCHICAL_N, quick)


def held_out_sets(cfg: Config, n_bodies: int | None, quick: bool) -> list[HeldOutSet]:
    """The sets of a fixed-N model's N, or (n_bodies None: a set network) every set."""
    if n_bodies is None:
        return general_sets(cfg, quick)
    if n_bodies == 2:
        return kepler_sets(cfg, quick)
    if n_bodies == 3:
        return three_body_sets(cfg, quick)
    if cfg.physics.dim == 3:
        return plummer_sets(cfg, n_bodies, quick)
    raise SystemExit(f"no held-out set for N={n_bodies} bodies in {cfg.physics.dim} dimensions")


# ----------------------------------------------------------------------------------------------
# free-fall eta tuning


class _Violation(Exception):
    pass


@dataclass
class _AbortOnViolation:
    """Wraps a policy and stops the simulation at the first step at or over the tolerance."""

    inner: object
    threshold: float

    def advance(self, state: State, max_dt: float) -> Advance:
        adv = self.inner.advance(state, max_dt)
        if not adv.rel_dE < self.threshold:
            raise _Violation
        return adv


def _passes(problems: list[Problem], eta: float, threshold: float) -> bool:
    for p in problems:
        try:
            run_problem(p, _AbortOnViolation(make_policy("freefall", p, threshold, eta=eta), threshold), threshold,
                        record=False)
        except _Violation:
            return False
    return True


def tune_freefall_eta(problems: list[Problem], threshold: float, start: float = 0.05, rel_tol: float = 0.02) -> float:
    """The largest eta (to rel_tol, by bracketing then log bisection) with no step over the tolerance."""
    lo = hi = start
    if _passes(problems, start, threshold):
        while True:
            hi = lo * 2
            if not _passes(problems, hi, threshold):
                break
            lo = hi
    else:
        while True:
            lo = hi / 2
            if _passes(problems, lo, threshold):
                break
            hi = lo
            if lo < 1e-8:
                raise RuntimeError("free-fall tuning found no admissible eta")
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _passes(problems, mid, threshold) else (lo, mid)
    return lo


# ----------------------------------------------------------------------------------------------
# running


def run_set(hs: HeldOutSet, threshold: float, model: DtNetwork, criteria: StepCriteria,
            policies: tuple[str, ...], log=print, baseline: dict | None = None) -> dict:
    """Per policy: per-system summaries and the set's aggregate figures. `baseline`: this set's entry
    of an earlier --json output (same sets, same threshold), whose model-free policies (all but
    'learned') are reused instead of rerun."""
    out: dict = {"set": hs.name, "systems": hs.labels, "policies": {}}
    if baseline is not None:
        if baseline["systems"] != hs.labels:
            raise SystemExit(f"--baseline: set {hs.name!r} holds other systems than this run's")
        for name in policies:
            if name != "learned" and name in baseline["policies"]:
                out["policies"][name] = {"runs": baseline["policies"][name]["runs"]}
        if "freefall_eta" in baseline:
            out["freefall_eta"] = baseline["freefall_eta"]
    eta = out.get("freefall_eta")
    policies = tuple(p for p in policies if p not in out["policies"])
    if "freefall" in policies:
        t0 = time.perf_counter()
        eta = tune_freefall_eta(hs.problems, threshold)
        out["freefall_eta"] = eta
        out["freefall_tuning_s"] = time.perf_counter() - t0
    for name in policies:
        runs = []
        for p in hs.problems:
            policy = make_policy(name, p, threshold, eta=eta, model=model, criteria=criteria)
            runs.append(run_problem(p, policy, threshold, record=False).summary())
        out["policies"][name] = {"runs": runs}
        log(f"  {hs.name:<22} {name:<10} done ({sum(r['wall_s'] for r in runs):.1f} s)")
    return summarize(out)


def summarize(out: dict) -> dict:
    """A set's aggregate figures per policy from its per-system runs (policies in POLICIES order)."""
    order = [p for p in POLICIES if p in out["policies"]]
    out["policies"] = {name: out["policies"][name] for name in order}
    oracle = out["policies"].get("oracle")
    for name, entry in out["policies"].items():
        runs = entry["runs"]
        over = [100.0 * r["violations"] / max(1, r["accepted_steps"]) for r in runs]
        entry["force_evaluations"] = statistics.median(r["steps"] for r in runs)
        entry["ratio_to_oracle"] = (statistics.median(r["steps"] / o["steps"] for r, o in zip(runs, oracle["runs"]))
                                    if oracle else None)
        entry["ratios_to_oracle"] = ([r["steps"] / o["steps"] for r, o in zip(runs, oracle["runs"])]
                                     if oracle else None)
        entry["pct_over_tolerance"] = statistics.median(over)
        entry["pct_over_tolerance_max"] = max(over)
        entry["final_rel_dE"] = statistics.median(r["final_rel_dE"] for r in runs)
        entry["wall_s"] = sum(r["wall_s"] for r in runs)
    return out


def format_table(results: list[dict]) -> str:
    head = ("set", "n", "policy", "force evals", "x oracle", "% over tol", "final |dE/E|", "wall s")
    rows = []
    for res in results:
        n = len(res["systems"])
        for name, e in res["policies"].items():
            label = name if name != "freefall" else f"freefall eta={res['freefall_eta']:.3g}"
            ratio = "" if e["ratio_to_oracle"] is None else f"{e['ratio_to_oracle']:.3f}"
            rows.append((res["set"], str(n), label, f"{e['force_evaluations']:g}", ratio,
                         f"{e['pct_over_tolerance']:.2f}", f"{e['final_rel_dE']:.2e}", f"{e['wall_s']:.1f}"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def line(r: tuple) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a checkpoint file or a run URL (its newest checkpoint)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="no simulation: merge the policies of earlier --json "
                    "outputs of the same sets (e.g. a learned-only run and a --policies oracle,controller,freefall "
                    "run) and print the table")
    ap.add_argument("--quick", action="store_true", help="short horizons and 5-system ensembles (about 2 min)")
    ap.add_argument("--json", help="write every figure (per system too) to this JSON file")
    ap.add_argument("--threshold", type=float, help="per-step |dE/E| tolerance (default: the model's "
                    "collect.energy_threshold)")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of " + ",".join(POLICIES))
    ap.add_argument("--sets", help="comma-separated substrings: only sets whose name contains one of them")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--pairs", choices=("all", "per_body", "system"), help="set network: override the pairs it "
                    "encodes (model.pairs) at inference, e.g. to measure what per_body or system selection costs")
    ap.add_argument("--pair-k", type=int, help="set network: override model.pair_k at inference")
    ap.add_argument("--baseline", help="an earlier --json output of the same sets and threshold: reuse its "
                    "oracle, controller and freefall runs (they do not depend on the model) and run only 'learned'")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    if not args.checkpoint:
        ap.error("--checkpoint is required (or --merge)")
    torch.set_num_threads(args.threads)
    policies = tuple(p for p in args.policies.split(",") if p)
    unknown = set(policies) - set(POLICIES)
    if unknown:
        ap.error(f"unknown policies {sorted(unknown)}")
    model, criteria, cfg = load_checkpoint(args.checkpoint)
    if args.pairs or args.pair_k:
        if cfg.model.kind != "set":
            ap.error("--pairs / --pair-k: only for a set network (model.kind = 'set')")
        model.pairs = args.pairs or model.pairs
        model.pair_k = args.pair_k or model.pair_k
    threshold = args.threshold or cfg.collect.energy_threshold
    n_bodies = None if cfg.model.kind == "set" else initial_states(cfg).num_bodies
    sets = held_out_sets(cfg, n_bodies, args.quick)
    if args.sets:
        keys = args.sets.split(",")
        sets = [s for s in sets if any(k in s.name for k in keys)]
    pairs = f", pairs {model.pairs} k={model.pair_k}" if cfg.model.kind == "set" else ""
    print(f"checkpoint {args.checkpoint}: N={n_bodies or 'any'}{pairs}, dim={cfg.physics.dim}, "
          f"tolerance {threshold:g}, {'quick' if args.quick else 'full'} sets", flush=True)
    base: dict = {}
    if args.baseline:
        prior = json.loads(Path(args.baseline).read_text())
        if prior["threshold"] != threshold or prior["quick"] != args.quick:
            raise SystemExit(f"--baseline {args.baseline}: other threshold or --quick setting than this run")
        base = {entry["set"]: entry for entry in prior["sets"]}
    t0 = time.perf_counter()
    results = [run_set(s, threshold, model, criteria, policies, log=lambda m: print(m, file=sys.stderr, flush=True),
                       baseline=base.get(s.name)) for s in sets]
    total = time.perf_counter() - t0
    print(format_table(results))
    print(f"total {total:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "threshold": threshold,
                                               "quick": args.quick, "total_s": total, "sets": results}, indent=1))
    return 0


def merge(paths: list[str], json_out: str | None) -> int:
    """Print (and optionally write) the table of several --json outputs' policies, set by set."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    if len({(d["threshold"], d["quick"]) for d in docs}) != 1:
        raise SystemExit("--merge: the outputs differ in threshold or --quick")
    merged: dict[str, dict] = {}
    for d in docs:
        for entry in d["sets"]:
            into = merged.setdefault(entry["set"], {"set": entry["set"], "systems": entry["systems"], "policies": {}})
            if into["systems"] != entry["systems"]:
                raise SystemExit(f"--merge: set {entry['set']!r} holds other systems in {d.get('checkpoint')}")
            into["policies"].update({k: {"runs": v["runs"]} for k, v in entry["policies"].items()})
            if "freefall_eta" in entry:
                into["freefall_eta"] = entry["freefall_eta"]
    results = [summarize(r) for r in merged.values()]
    print(format_table(results))
    if json_out:
        Path(json_out).write_text(json.dumps({"merged": paths, "threshold": docs[0]["threshold"],
                                              "quick": docs[0]["quick"], "sets": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
