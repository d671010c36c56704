"""The nbody-dt command line: train, resume, simulate, report, deploy, config.

Bad input ends with one line on stderr naming what is wrong and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise UsageError(f"{self.prog}: {message}")


def _positive(name: str):
    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{name} must be positive and finite, got {text}")
        return value

    return check


def _eccentricity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--e must be a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"--e must lie in [0, 1), got {text}")
    return value


def _bodies(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--n must be an integer, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"--n must be at least 2, got {value}")
    return value


def _nonnegative(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"--softening must be >= 0, got {text}")
    return value


def _add_simulate(sub) -> None:
    from nbody_dt.simulation import POLICIES, PROBLEMS

    p = sub.add_parser("simulate", help="integrate one system with a dt policy and report its cost and accuracy")
    p.add_argument("--ic", choices=PROBLEMS, default="kepler", help="initial condition (default kepler)")
    p.add_argument("--policy", choices=POLICIES, default="oracle", help="dt policy (default oracle)")
    p.add_argument("--e", type=_eccentricity, default=0.9, help="Kepler eccentricity (default 0.9)")
    p.add_argument("--a", type=_positive("--a"), default=1.0, help="Kepler semi-major axis (default 1)")
    p.add_argument("--m1", type=_positive("--m1"), default=1.0)
    p.add_argument("--m2", type=_positive("--m2"), default=1.0)
    p.add_argument("--start", choices=("apocentre", "pericentre"), default="apocentre")
    p.add_argument("--n", type=_bodies, default=16, help="Plummer bodies (default 16)")
    p.add_argument("--seed", type=int, default=1, help="Plummer seed (default 1)")
    p.add_argument("--softening", type=_nonnegative, default=0.0)
    p.add_argument("--G", type=_positive("--G"), default=1.0)
    p.add_argument("--periods", type=_positive("--periods"), help="Kepler (default 10) / figure-eight (default 5) periods")
    p.add_argument("--t-end", type=_positive("--t-end"), help="end time (Pythagorean and Plummer default 10)")
    p.add_argument("--dt", type=_positive("--dt"), help="fixed policy: the step")
    p.add_argument("--eta", type=_positive("--eta"), help="freefall policy: dt = eta * min pair free-fall time")
    p.add_argument("--safety", type=_positive("--safety"), default=0.9, help="controller safety factor")
    p.add_argument("--checkpoint", help="learned policy: a checkpoint file or a run URL (its latest checkpoint)")
    p.add_argument("--threshold", type=_positive("--threshold"), default=2e-4,
                   help="per-step relative energy error tolerance (default 2e-4)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", help="write orbit, dt(t) and |dE/E|(t) to this PNG")


def cmd_simulate(args) -> int:
    from nbody_dt.simulation import make_policy, make_problem, plot_result, run_problem

    if args.policy == "fixed" and args.dt is None:
        raise UsageError("simulate: --policy fixed needs --dt")
    if args.policy == "freefall" and args.eta is None:
        raise UsageError("simulate: --policy freefall needs --eta")
    if args.policy == "learned" and not args.checkpoint:
        raise UsageError("simulate: --policy learned needs --checkpoint PATH|RUN")
    problem = make_problem(args.ic, e=args.e, a=args.a, m1=args.m1, m2=args.m2, start=args.start, n=args.n,
                           seed=args.seed, periods=args.periods, t_end=args.t_end, G=args.G, softening=args.softening)
    model = criteria = None
    if args.policy == "learned":
        model, criteria = _load_learned(args.checkpoint)
    policy = make_policy(args.policy, problem, args.threshold, dt=args.dt, eta=args.eta, safety=args.safety,
                         model=model, criteria=criteria)
    result = run_problem(problem, policy, args.threshold, record=bool(args.plot))
    summary = {"ic": args.ic, "policy": args.policy, "threshold": args.threshold, **result.summary()}
    if args.plot:
        plot_result(result, args.plot, f"{args.ic} / {args.policy}")
        summary["plot"] = args.plot
    if args.json:
        print(json.dumps(summary))
    else:
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            print(f"{key:<{width}}  {value:.6g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0


def _load_learned(source: str):
    """(model, criteria) from a checkpoint file or a run URL."""
    from nbody_dt.checkpoint_io import load_policy

    return load_policy(source)


def cmd_config(args) -> int:
    from nbody_dt import config

    if args.markdown:
        print(config.defaults_markdown())
        return 0
    print(json.dumps(config.load(args.config, args.set).to_dict(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nbody-dt", description="Learned integration timesteps for gravitational N-body systems.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_simulate(sub)
    c = sub.add_parser("config", help="print the validated config (or the reference of every default)")
    c.add_argument("--config", help="TOML file (default: the embedded default)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    c.add_argument("--markdown", action="store_true", help="print the reference table of every key and default")
    return parser


COMMANDS = {"simulate": cmd_simulate, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    from nbody_dt.config import ConfigError

    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except (UsageError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
