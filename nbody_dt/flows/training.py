"""The `train` flow: open or create a run, find where it stands, and run the remaining stages
collect -> persist -> replay -> epoch of every remaining epoch.

The CLI (`nbody-dt train`, `nbody-dt resume`), Prefect deployments and the Docker image all
run this one flow. A failure is re-raised as TrainingFailed naming the run and the command
that continues it.
"""

# No `from __future__ import annotations`: the flow's parameter types must be real objects when
# Prefect builds its parameter model, also where a runner loads this file by its path.
import time
from pathlib import Path
from typing import Literal

from prefect import flow
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from nbody_dt import config as config_mod
from nbody_dt.config import Config
from nbody_dt.storage import STAGES, Run, completed, epoch_rows, is_done, list_checkpoints, read_metrics
from nbody_dt.storage.errors import RunError, RunNotFound
from nbody_dt.storage.integrity import check_run, rollback
from nbody_dt.storage.run import stage_key
from nbody_dt.tasks import runtime, stages
from nbody_dt.training.dask_evaluator import make_evaluator
from nbody_dt.training.evaluators import Evaluator

STAGE_TASKS = {"collect": stages.collect, "persist": stages.persist, "replay": stages.replay,
               "epoch": stages.finish_epoch}

Mode = Literal["auto", "create", "resume"]
BreakLock = bool | Literal["stale"]


class TrainingFailed(RuntimeError):
    """Training stopped with an error; the message names the run and how to resume it."""


def default_run_url() -> str:
    """./runs/<timestamp>: a fresh local run directory."""
    return str(Path("runs") / time.strftime("run-%Y%m%d-%H%M%S"))


def resolve_config(config: Config | dict | None, config_path: str | None, overrides: list[str] | None) -> Config:
    """`config` (a Config or its dict) or the TOML file (None: the embedded default), with overrides."""
    if config is not None:
        data = config.to_dict() if isinstance(config, Config) else config
        return config_mod.from_dict(config_mod.apply_overrides(data, overrides or []))
    return config_mod.load(config_path, overrides or [])


def _remaining(run: Run, point: tuple[int, str] | None, epochs: int) -> list[tuple[int, str]]:
    """Stages still to run after the resume point; persist and epoch also skip when the ledger has them."""
    todo = []
    for epoch in range(epochs):
        for stage in STAGES:
            if point is not None and (epoch, STAGES.index(stage)) <= (point[0], STAGES.index(point[1])):
                continue
            if stage in ("persist", "epoch") and is_done(run, epoch, stage):
                continue
            todo.append((epoch, stage))
    return todo


def open_run(run_url: str, config: Config | None, config_path: str | None, overrides: list[str] | None,
             mode: Mode, break_lock: BreakLock, from_epoch: int | None = None) -> tuple[Run, Config, Evaluator]:
    """The run, opened once for writing and checked (integrity.check_run), the config it runs
    with (adopted by the run, not stored yet: save_config) and its evaluator, reached (e.g. a
    remote Dask scheduler) before a new run is created or an existing run's config changes.

    mode 'create': a new run; 'resume': an existing one; 'auto': whichever applies. On an existing
    run, no config and no config_path mean its stored config (plus overrides). `from_epoch`
    (resume only) first discards everything from that epoch on, the explicit way out of damage."""
    if from_epoch is not None and mode != "resume":
        raise RunError("--from-epoch rolls back an existing run: use it with resume")
    if mode != "create":
        try:
            run = Run.open(run_url, break_lock=break_lock)
        except RunNotFound:
            if mode == "resume":
                raise
        else:
            try:
                given = config is not None or config_path is not None
                cfg = resolve_config(config if given else run.config, config_path, overrides)
                run.adopt_config(cfg)  # refuses a change of anything but resume-safe keys
                if from_epoch == 0:
                    run.reset()
                elif from_epoch:
                    rollback(run, from_epoch)
                check_run(run, deep=True)
                return run, cfg, make_evaluator(cfg)
            except BaseException:
                run.close()
                raise
    cfg = resolve_config(config, config_path, overrides)
    evaluator = make_evaluator(cfg)
    try:
        return Run.create(run_url, cfg), cfg, evaluator
    except BaseException:
        evaluator.close()
        raise


@flow(name="nbody-dt-train", log_prints=True, validate_parameters=True)
def train(run_url: str = "", config: Config | None = None, config_path: str | None = None,
          overrides: list[str] | None = None, mode: Mode = "auto", break_lock: BreakLock = False,
          from_epoch: int | None = None) -> dict:
    """Train (or continue training) the run at run_url; returns the run summary.

    config: the whole config, or config_path + overrides (TOML file, dotted key=value); none of
    them on an existing run means its stored config. Resume-safe keys (epochs, compute, ...)
    may change on resume; any other difference is refused. mode: 'create' a new run, 'resume'
    an existing one, 'auto' whichever applies. break_lock: take over the writer lock of a dead
    writer; 'stale': only if that writer ran on this host and is gone (what the deployments use,
    so that a killed run does not lock out its retry and the runs after it). from_epoch (resume
    only): discard everything from that epoch on first (the explicit way out when the run's
    storage is damaged; a damaged run is otherwise refused, never repaired).
    """
    start = time.perf_counter()
    run, cfg, evaluator = open_run(run_url or default_run_url(), config, config_path, overrides, mode, break_lock,
                                   from_epoch)
    try:
        run.save_config()
    except BaseException:
        run.close()
        evaluator.close()
        raise
    stage = (None, None)
    try:
        runtime.register(run, evaluator)
        point = stages.resume_point(run.url)
        todo = _remaining(run, point, run.config.epochs)
        runtime.notify({"event": "start", "run_url": run.url, "epochs": run.config.epochs,
                        "epochs_done": sum(1 for _, s in completed(run) if s == "epoch"),
                        "stages_done": len(STAGES) * run.config.epochs - len(todo)})
        progress_id = create_progress_artifact(progress=0.0, description=f"nbody-dt training of {run.url}")
        table = epoch_rows(read_metrics(run))
        for epoch, name in todo:
            stage = (epoch, name)
            table.setdefault(epoch, {"epoch": epoch}).update(STAGE_TASKS[name](run.url, epoch))
            if name == "epoch":
                _publish_epoch(run, progress_id, epoch, table)
        summary = summarize(run, time.perf_counter() - start)
        create_markdown_artifact(markdown=_summary_markdown(summary), key="nbody-dt-summary",
                                 description="nbody-dt training summary")
        return summary
    except RunError:
        raise  # damage, a lost lock, unreachable storage: the message names the object and the way out
    except Exception as exc:
        where = f" at epoch {stage[0]} stage {stage[1]}" if stage[0] is not None else ""
        raise TrainingFailed(f"training failed{where}: {type(exc).__name__}: {exc}. The run is at {run.url}; "
                             f"continue it with: nbody-dt resume {run.url}") from exc
    finally:
        runtime.release(run.url)
        run.close()
        evaluator.close()


TABLE_KEYS = ("epoch", "collect_accepted", "collect_pass_rate", "collect_retrain_iterations", "collect_dt_median",
              "replay_iterations", "replay_converged", "replay_final_pass_rate", "epoch_wall_s")


def _publish_epoch(run: Run, progress_id, epoch: int, table: dict[int, dict]) -> None:
    """Progress and the per-epoch metrics table as Prefect artifacts."""
    update_progress_artifact(progress_id, 100.0 * (epoch + 1) / run.config.epochs)
    rows = [{k: table[e].get(k) for k in TABLE_KEYS} for e in sorted(table)]
    create_table_artifact(table=rows, key="nbody-dt-epochs", description=f"per-epoch metrics of {run.url}")


def summarize(run: Run, wall_s: float) -> dict:
    """The one-object result of a training run."""
    table = epoch_rows(read_metrics(run))
    done = sorted(e for e, s in completed(run) if s == "epoch")
    last = table[done[-1]] if done else {}
    ckpts = list_checkpoints(run)
    return {
        "run_url": run.url,
        "epochs_completed": len(done),
        "epochs": run.config.epochs,
        "rows_stored": run.trajectory.num_rows,
        "replay_converged": int(sum(table[e].get("replay_converged", 0) for e in done)),
        "final_pass_rate": last.get("replay_final_pass_rate"),
        "wall_s": wall_s,
        "latest_checkpoint": f"{run.url}/checkpoints/{stage_key(*ckpts[-1])}.pt" if ckpts else None,
        "try": try_command(run),
    }


def try_command(run: Run) -> str:
    """The `nbody-dt simulate` command that tries the run's model: a set network (any N) on a held-out-like
    Plummer sphere of 64 bodies, the fixed-N MLP on a Kepler orbit."""
    head = f"nbody-dt simulate --policy learned --checkpoint {run.url}"
    if run.config.model.kind == "set":
        return f"{head} --ic plummer --n 64 --softening {run.config.physics.softening:g} --t-end 0.5"
    return f"{head} --ic kepler --e 0.9 --periods 10"


def _summary_markdown(summary: dict) -> str:
    lines = ["# nbody-dt training summary", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.items() if k != "try"]
    lines += ["", f"Try the model: `{summary['try']}`"]
    return "\n".join(lines)
