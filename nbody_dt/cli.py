"""The nbody-dt command line: train, resume, simulate, report, deploy, config.

Bad input ends with one line on stderr naming what is wrong and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise UsageError(f"{self.prog}: {message}")


def _checked(name: str, parse, ok, rule: str):
    """An argparse type: `parse` the text, then require `ok(value)`; errors name the argument."""

    def check(text: str):
        try:
            value = parse(text)
        except ValueError:
            kind = "an integer" if parse is int else "a number"
            raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{name} must be {rule}, got {text}")
        return value

    return check


def _positive(name: str):
    return _checked(name, float, lambda v: v > 0 and math.isfinite(v), "positive and finite")


_eccentricity = _checked("--e", float, lambda v: 0 <= v < 1, "in [0, 1)")
_bodies = _checked("--n", int, lambda v: v >= 2, "at least 2")
_nonnegative = _checked("--softening", float, lambda v: v >= 0 and math.isfinite(v), ">= 0")


def _add(sub, name: str, text: str):
    """A subcommand whose one-line help (in `nbody-dt --help`) is also its description (in `nbody-dt NAME --help`)."""
    return sub.add_parser(name, help=text, description=text)


def _add_simulate(sub) -> None:
    from nbody_dt.model.policy import POLICIES
    from nbody_dt.physics.problems import PROBLEMS

    p = _add(sub, "simulate", "integrate one system with a dt policy and report its cost and accuracy")
    p.add_argument("--ic", choices=PROBLEMS, default="kepler", help="initial condition (default kepler)")
    p.add_argument("--policy", choices=POLICIES, default="oracle", help="dt policy (default oracle)")
    p.add_argument("--e", type=_eccentricity, default=0.9, help="Kepler eccentricity (default 0.9)")
    p.add_argument("--a", type=_positive("--a"), default=1.0, help="Kepler semi-major axis (default 1)")
    p.add_argument("--m1", type=_positive("--m1"), default=1.0, help="Kepler primary mass (default 1)")
    p.add_argument("--m2", type=_positive("--m2"), default=1.0, help="Kepler secondary mass (default 1)")
    p.add_argument("--start", choices=("apocentre", "pericentre"), default="apocentre",
                   help="where the Kepler orbit starts (default apocentre)")
    p.add_argument("--n", type=_bodies, default=16, help="Plummer / hierarchical bodies (default 16)")
    p.add_argument("--seed", type=int, default=1, help="Plummer / hierarchical seed (default 1)")
    p.add_argument("--softening", type=_nonnegative, default=0.0,
                   help="Plummer softening length of the gravity (default 0: none)")
    p.add_argument("--G", type=_positive("--G"), default=1.0, help="gravitational constant (default 1)")
    p.add_argument("--periods", type=_positive("--periods"),
                   help="Kepler (default 10) / figure-eight (default 5) periods")
    p.add_argument("--t-end", type=_positive("--t-end"), help="end time (Pythagorean and Plummer default 10)")
    p.add_argument("--dt", type=_positive("--dt"), help="fixed policy: the step")
    p.add_argument("--eta", type=_positive("--eta"), help="freefall policy: dt = eta * min pair free-fall time")
    p.add_argument("--safety", type=_positive("--safety"), default=0.9,
                   help="controller and series safety factor (default 0.9)")
    p.add_argument("--checkpoint", help="learned policy: a checkpoint file or a run URL (its latest checkpoint)")
    p.add_argument("--symmetric", action="store_true",
                   help="learned policy: the time-symmetric (reversible) step, for long integrations")
    p.add_argument("--threshold", type=_positive("--threshold"), default=2e-4,
                   help="per-step relative energy error tolerance (default 2e-4); a learned policy trained at "
                   "another reads its error series at this one, or scales its dt by the dt^3 law")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", help="write orbit, dt(t) and |dE/E|(t) to this PNG")


def cmd_simulate(args) -> int:
    from nbody_dt.model.policy import make_policy, run_problem
    from nbody_dt.physics.problems import make_problem

    if args.policy == "fixed" and args.dt is None:
        raise UsageError("simulate: --policy fixed needs --dt")
    if args.policy == "freefall" and args.eta is None:
        raise UsageError("simulate: --policy freefall needs --eta")
    if args.policy == "learned" and not args.checkpoint:
        raise UsageError("simulate: --policy learned needs --checkpoint PATH|RUN")
    if args.symmetric and args.policy != "learned":
        raise UsageError("simulate: --symmetric applies to --policy learned only")
    problem = make_problem(args.ic, e=args.e, a=args.a, m1=args.m1, m2=args.m2, start=args.start, n=args.n,
                           seed=args.seed, periods=args.periods, t_end=args.t_end, G=args.G, softening=args.softening)
    model = criteria = None
    if args.policy == "learned":
        model, criteria, _ = load_learned(args.checkpoint)
        try:
            model.check_takes(problem.state)
        except ValueError as exc:
            raise UsageError(f"simulate: --checkpoint {args.checkpoint}: {exc}") from None
    policy = make_policy(args.policy, problem, args.threshold, dt=args.dt, eta=args.eta, safety=args.safety,
                         model=model, criteria=criteria, symmetric=args.symmetric)
    result = run_problem(problem, policy, args.threshold, record=bool(args.plot))
    summary = {"ic": args.ic, "policy": args.policy, "symmetric": args.symmetric, "threshold": args.threshold,
               **result.summary()}
    if args.plot:
        from nbody_dt.plots import plot_simulation

        plot_simulation(result, args.plot, f"{args.ic} / {args.policy}")
        summary["plot"] = args.plot
    if args.json:
        print(json.dumps(_json_safe(summary), allow_nan=False))
    else:
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            print(f"{key:<{width}}  {value:.6g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0


def load_learned(source: str):
    """(model, criteria, config) of a checkpoint file or of a run URL's newest intact checkpoint,
    on the CPU; UsageError naming the source when it is none of these."""
    from nbody_dt.config import ConfigError, from_stored
    from nbody_dt.model.evaluate import StepCriteria
    from nbody_dt.storage import read_checkpoint
    from nbody_dt.storage.errors import RunError
    from nbody_dt.training.setup import load_model

    try:
        payload = read_checkpoint(source)
    except RunError as exc:
        raise UsageError(f"--checkpoint {exc}") from None
    try:
        cfg = from_stored({**payload["config"], "device": "cpu"})
    except ConfigError as exc:  # e.g. a key of a newer nbody-dt
        raise UsageError(f"--checkpoint {source}: its config is not one this nbody-dt reads ({exc})") from None
    return load_model(payload, cfg), StepCriteria.from_config(cfg), cfg


def _prepare_prefect(serving: bool = False) -> None:
    """Robust defaults for Prefect. In a terminal session (train, resume) Prefect's own log lines
    are quiet: the progress display says what happens. A serving process (deploy) logs like a
    worker: Prefect's INFO lines, and the nbody_dt logger's records sent to the UI too."""
    import os

    if serving:
        os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "nbody_dt")
    else:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _log_handler(console):
    """A handler that shows records of the nbody_dt logger (warnings and up) as one line each."""
    import logging

    if console.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
    else:
        handler = logging.StreamHandler(console.file)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.setLevel(logging.WARNING)
    return handler


def _start_prefect(console) -> None:
    """Start Prefect's local (ephemeral) server now unless PREFECT_API_URL names one; on a terminal
    a status line says so while it starts (and goes away: output stays one line on an error)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    if not console.is_terminal:
        get_client(sync_client=True)  # the process's one ephemeral server: the flow reuses it
        return
    with console.status("starting Prefect's local server (PREFECT_API_URL is not set) ..."):
        get_client(sync_client=True)


class _Progress:
    """Training progress: on a terminal a rich bar (epoch, stage, elapsed time, ETA) with one line per
    finished epoch above it; elsewhere one plain line per finished stage."""

    def __init__(self, console):
        self.console = console
        self.bar = None

    def __call__(self, event: dict) -> None:
        from nbody_dt.storage import STAGES
        from nbody_dt.tasks.stages import stage_summary

        if event["event"] == "start":
            self.epochs = event["epochs"]
            line = f"training {event['run_url']}: {event['epochs_done']} of {self.epochs} epochs done"
            if not self.console.is_terminal:
                self.console.print(line, soft_wrap=True)
                return
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("stages"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                console=self.console, speed_estimate_period=3600)
            self.task = self.bar.add_task(line, total=len(STAGES) * self.epochs, completed=event["stages_done"])
            self.bar.start()
            self.bar.console.print(line, highlight=False)
            return
        epoch, stage = event["epoch"], event["stage"]
        line = f"epoch {epoch + 1}/{self.epochs} {stage:<8} {stage_summary(stage, event)}"
        if self.bar is None:
            self.console.print(line, soft_wrap=True)
            return
        # The bar names what runs now: the next stage, or "done" after the last one.
        following = STAGES[(STAGES.index(stage) + 1) % len(STAGES)]
        upcoming = epoch + 1 + (1 if stage == "epoch" else 0)
        now = f"epoch {upcoming}/{self.epochs} {following}" if upcoming <= self.epochs else "done"
        self.bar.update(self.task, advance=1, description=now)
        if stage == "epoch":
            self.bar.console.print(line, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _run_training(args, mode: str) -> int:
    _prepare_prefect()
    from nbody_dt.flows.training import default_run_url, train
    from nbody_dt.tasks import runtime

    console = _console()
    if mode == "create":
        from nbody_dt.config import load

        cfg = load(args.config, args.set)  # a bad config is refused at once, before Prefect's server starts
        if cfg.model.pair_prior:
            _check_pair_prior(cfg)
    run_url = (args.run_dir or default_run_url()) if mode == "create" else args.run
    progress = None if args.json else _Progress(console)
    _start_prefect(console)
    if progress:
        runtime.add_listener(progress)
    try:
        summary = train(run_url=run_url, config_path=getattr(args, "config", None), overrides=args.set, mode=mode,
                        break_lock=args.break_lock, from_epoch=getattr(args, "from_epoch", None))
    finally:
        if progress:
            runtime.remove_listener(progress)
            progress.close()
    if args.json:
        print(json.dumps(_json_safe(summary), allow_nan=False))
    else:
        print(f"run: {summary['run_url']}  ({summary['epochs_completed']} epochs, {summary['rows_stored']} rows, "
              f"replay converged in {summary['replay_converged']} epochs, final pass rate "
              f"{summary['final_pass_rate']}, {summary['wall_s']:.1f} s)")
        print(f"latest checkpoint: {summary['latest_checkpoint']}")
        print("try the model:")
        print(f"  {summary['try']}")
    return 0


def _check_pair_prior(cfg) -> None:
    """UsageError (one line) unless model.pair_prior names a checkpoint this config can take as its prior."""
    from nbody_dt.storage import read_checkpoint
    from nbody_dt.storage.errors import RunError
    from nbody_dt.training.setup import pair_prior_weights

    try:
        pair_prior_weights(cfg, read_checkpoint(cfg.model.pair_prior))
    except RunError as exc:
        raise UsageError(f"model.pair_prior {exc}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_train(args) -> int:
    return _run_training(args, "create")


def cmd_resume(args) -> int:
    return _run_training(args, "resume")


def cmd_report(args) -> int:
    from nbody_dt.plots import write_run_plots
    from nbody_dt.report import report_dict, report_table
    from nbody_dt.storage import Run

    with Run.open(args.run, write=False) as run:
        report = report_dict(run)
        if args.json:
            print(json.dumps(_json_safe(report), allow_nan=False))
        else:
            from rich.console import Console

            from nbody_dt.flows.training import TABLE_KEYS

            console = Console()
            if not console.is_terminal:
                console = Console(width=100_000)  # a file or pipe: the table at its natural width
            console.print(report_table(report, keys=None if args.all else ["rows", *TABLE_KEYS[1:]]))
        if args.plots:
            for path in write_run_plots(run, report["epochs"], args.plots):
                print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_deploy(args) -> int:
    _prepare_prefect(serving=True)
    from nbody_dt.config import load
    from nbody_dt.flows.deploy import serve

    if (args.cron is None) == (args.interval is None):
        raise UsageError("deploy: give exactly one of --cron EXPR or --interval SECONDS")
    load(args.config, args.set)  # validate before serving: a bad config fails here, not at 3 a.m.
    if args.cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=args.cron)
        except ValueError:
            raise UsageError(f"deploy: --cron {args.cron!r} is not a valid cron expression") from None
    serve(args.run_dir, args.config, args.set, cron=args.cron, interval=args.interval)
    return 0


def _json_safe(value):
    """NaN and infinities become null: the output stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def cmd_config(args) -> int:
    from nbody_dt import config

    if args.markdown:
        print(config.defaults_markdown())
        return 0
    print(json.dumps(config.load(args.config, args.set).to_dict(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from nbody_dt import __version__

    parser = _Parser(prog="nbody-dt", description="Learned integration timesteps for gravitational N-body systems.")
    parser.add_argument("--version", action="version", version=f"nbody-dt {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="on an error, print the full traceback (and Prefect's) after the one-line message")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    _add_simulate(sub)
    t = _add(sub, "train", "train a new run (the embedded default config unless --config/--set)")
    t.add_argument("--config", help="TOML config file (default: the embedded default, docs/CONFIG.md)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, e.g. replay.batch_size=256 (repeatable)")
    t.add_argument("--run-dir", help="run URL: a local path or fsspec URL such as s3://bucket/run "
                                     "(default ./runs/run-<time>)")
    t.add_argument("--json", action="store_true", help="print one JSON object at the end, no progress bar")
    t.add_argument("--break-lock", action="store_true", help=argparse.SUPPRESS)
    r = _add(sub, "resume", "continue a run from its last completed stage")
    r.add_argument("run", help="run URL")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="resume-safe overrides only, e.g. epochs=20 (docs/CONFIG.md)")
    r.add_argument("--json", action="store_true", help="print one JSON object at the end, no progress bar")
    r.add_argument("--break-lock", action="store_true",
                   help="take over the writer lock left by a dead process (never that of a running one)")
    r.add_argument("--from-epoch", type=_checked("--from-epoch", int, lambda v: v >= 0, ">= 0"), metavar="K",
                   help="discard every stored stage from epoch K on and continue from there: the explicit "
                        "way out when the run's storage is damaged (the error names the possible K)")
    rep = _add(sub, "report", "per-epoch metrics of a run as a table, JSON or plots")
    rep.add_argument("run", help="run URL")
    rep.add_argument("--json", action="store_true", help="print one JSON object")
    rep.add_argument("--plots", metavar="DIR", help="write PNG figures into DIR")
    rep.add_argument("--all", action="store_true", help="every recorded metric as a column")
    d = _add(sub, "deploy", "serve the training flow on a schedule from this process (flow.serve)")
    d.add_argument("--cron", help="cron schedule, e.g. '0 3 * * *'")
    d.add_argument("--interval", type=_positive("--interval"), help="schedule every SECONDS")
    d.add_argument("--config", help="TOML config file (default: the embedded default)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override")
    d.add_argument("--run-dir", default="runs/scheduled", help="run URL every scheduled run continues "
                                                                "(default runs/scheduled)")
    c = _add(sub, "config", "print the validated config (or the reference of every key)")
    c.add_argument("--config", help="TOML file (default: the embedded default)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    c.add_argument("--markdown", action="store_true", help="print the reference table of every key and default")
    return parser


COMMANDS = {"simulate": cmd_simulate, "train": cmd_train, "resume": cmd_resume, "report": cmd_report,
            "deploy": cmd_deploy, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error ends as one line on stderr and exit code 2 (--verbose adds the
    traceback); warnings of the nbody_dt logger are one line each on stderr."""
    import logging

    from nbody_dt.allocator import retain_freed_memory
    from nbody_dt.config import ConfigError
    from nbody_dt.storage.errors import RunError, one_line

    retain_freed_memory()
    argv = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in argv
    if not verbose:
        _quiet_prefect_terminal()
    logger = logging.getLogger("nbody_dt")
    handler = _log_handler(_console())
    logger.addHandler(handler)
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if verbose:
            import traceback

            traceback.print_exc()
        expected = isinstance(exc, (UsageError, ConfigError, RunError))
        print(f"error: {one_line(exc) if expected else f'{type(exc).__name__}: {one_line(exc)}'}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        logger.removeHandler(handler)


def _quiet_prefect_terminal() -> None:
    """Prefect logs a failed flow's or task's exception (with its traceback) on the terminal before
    our one-line error says the same, and its background services report their flush while the
    process exits; without --verbose those records are dropped."""
    import logging

    class _NoFailureRecords(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return record.exc_info is None

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_NoFailureRecords())
    for service in ("EventsWorker", "APILogWorker"):  # "still processing items" notices while exiting
        logging.getLogger(service).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
