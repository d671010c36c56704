"""The four stages of an epoch as Prefect tasks: collect, persist, replay, epoch.

Each task starts from storage (the latest intact checkpoint, the trajectory) and ends by
writing its results to storage: its checkpoint (collect, replay), its metrics record, then
its ledger mark. So a process killed anywhere resumes from the last completed stage, and an
uninterrupted run goes through exactly the same save/restore path as a resumed one.
"""

from __future__ import annotations

import errno
import logging
import time
from functools import partial

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from nbody_dt.faults import crash_point
from nbody_dt.model.trajectory import Rows
from nbody_dt.storage import (
    is_done,
    load_latest_checkpoint,
    mark_done,
    read_checkpoint,
    read_metrics,
    save_checkpoint,
    write_metrics,
)
from nbody_dt.storage.errors import RunError
from nbody_dt.tasks import runtime
from nbody_dt.training.collect import collect_trajectory
from nbody_dt.training.replay import generalize_on_trajectory, replay_steps
from nbody_dt.training.setup import Training, restart_states, restore, snapshot, start_training

_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.EBUSY}


def _transient_io(task_, task_run, state) -> bool:
    """Retry only I/O that may succeed a moment later (network, object store hiccups)."""
    try:
        state.result()
    except (ConnectionError, TimeoutError):
        return True
    except OSError as exc:
        return exc.errno in _TRANSIENT_ERRNOS
    except Exception:
        return False
    return False


def _stage_task(stage: str):
    """A stage as a task. The ledger, not Prefect, decides what is done: no cache and no persisted
    results (a retried or new flow run derives its plan from storage)."""
    return task(name=f"{stage}", cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=2,
                retry_condition_fn=_transient_io, task_run_name=f"{stage}-e{{epoch}}")


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a task or flow run (its lines reach the Prefect UI), else nbody_dt's."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def stage_summary(stage: str, metrics: dict) -> str:
    """What a finished stage did, in a few words."""
    if stage == "collect":
        return (f"collected {metrics.get('collect_accepted')} steps "
                f"(pass rate {metrics.get('collect_pass_rate', 0):.2f})")
    if stage == "persist":
        return f"stored {metrics.get('persist_total_rows')} rows"
    if stage == "replay":
        return (f"replay {'converged' if metrics.get('replay_converged') else 'capped'} after "
                f"{metrics.get('replay_iterations')} it (pass rate {metrics.get('replay_final_pass_rate', 0):.3f})")
    return f"epoch done in {metrics.get('epoch_wall_s', 0):.1f} s"


def _training_state(url: str) -> Training:
    """The training objects of the newest intact checkpoint, or a fresh start."""
    run = runtime.run(url)
    latest = load_latest_checkpoint(run, map_location=run.config.device)
    if latest is not None:
        return restore(latest.payload, run.config)
    prior = run.config.model.pair_prior
    return start_training(run.config, read_checkpoint(prior) if prior else None)


def _checkpoint_and_finish(url: str, epoch: int, stage: str, training: Training, metrics: dict,
                           **extra) -> dict:
    """The stage's checkpoint (training objects, its metrics and `extra` entries), then its record and mark."""
    run = runtime.run(url)
    payload = snapshot(training, run.config)
    payload.update(extra, metrics=metrics)
    save_checkpoint(run, epoch, stage, payload)
    return _finish(url, epoch, stage, metrics)


def _finish(url: str, epoch: int, stage: str, metrics: dict, details: dict | None = None) -> dict:
    run = runtime.run(url)
    write_metrics(run, epoch, stage, metrics)
    mark_done(run, epoch, stage, details)
    _logger().info("epoch %d/%d %s: %s", epoch + 1, run.config.epochs, stage, stage_summary(stage, metrics))
    runtime.notify({"event": "stage", "epoch": epoch, "stage": stage, **metrics})
    return metrics


@_stage_task("collect")
def collect(run_url: str, epoch: int) -> dict:
    """Part 1 from the latest checkpoint; checkpoint the trained network, the new live states and
    the accepted rows (pending until persisted)."""
    run = runtime.run(run_url)
    training = _training_state(run_url)
    rows, training.live, metrics = collect_trajectory(training.model, training.optimizer, training.live, run.config,
                                                      epoch, partial(restart_states, run.config))
    crash_point("collect", epoch)
    pending = {k: v.cpu() for k, v in rows.as_dict().items()}
    return _checkpoint_and_finish(run_url, epoch, "collect", training, metrics, pending_rows=pending)


@_stage_task("persist")
def persist(run_url: str, epoch: int) -> dict:
    """Append the epoch's rows from the collect checkpoint to the trajectory store (idempotent)."""
    run = runtime.run(run_url)
    start = time.perf_counter()
    latest = load_latest_checkpoint(run)
    if latest is None or latest[:2] != (epoch, "collect"):
        found = "none" if latest is None else f"epoch {latest.epoch} {latest.stage}"
        raise RunError(f"run {run.url}: persist of epoch {epoch} needs that epoch's collect checkpoint, found {found}")
    rows = Rows(**latest.payload["pending_rows"])
    total = run.trajectory.append(rows, epoch)
    wall = time.perf_counter() - start
    metrics = {"persist_rows": len(rows), "persist_total_rows": total, "persist_wall_s": wall,
               "persist_rows_per_s": len(rows) / wall if wall > 0 else 0.0}
    committed = {"rows": list(run.trajectory.epoch_range(epoch)), "digests": run.trajectory.epoch_digests(epoch)}
    return _finish(run_url, epoch, "persist", metrics, committed)


@_stage_task("replay")
def replay(run_url: str, epoch: int) -> dict:
    """Part 2 over the stored replay window, from the collect checkpoint; checkpoint the result."""
    run = runtime.run(run_url)
    cfg = run.config
    crash_point("persist-replay", epoch)
    training = _training_state(run_url)
    window = run.trajectory.window(cfg.replay.window, epoch=epoch, last_rows=cfg.replay.last_rows,
                                   history_len=cfg.model.history_len)
    _, _, metrics = generalize_on_trajectory(training.model, window, training.optimizer, cfg,
                                             runtime.evaluator(run_url), steps=replay_steps(cfg, epoch))
    crash_point("replay", epoch)
    return _checkpoint_and_finish(run_url, epoch, "replay", training, metrics)


@_stage_task("epoch")
def finish_epoch(run_url: str, epoch: int) -> dict:
    """The epoch's own record (its wall time, rows stored), then its ledger mark: the epoch is done."""
    run = runtime.run(run_url)
    stage_records = [r for r in read_metrics(run, epoch) if r["stage"] != "epoch"]
    wall = sum(r.get(f"{r['stage']}_wall_s", 0.0) for r in stage_records)
    return _finish(run_url, epoch, "epoch", {"epoch_wall_s": wall, "rows_stored": run.trajectory.num_rows})


def resume_point(run_url: str) -> tuple[int, str] | None:
    """(epoch, stage) of the newest intact checkpoint, the point a (re)started flow continues from.

    A checkpoint is committed before its ledger mark; if the process died in between, its
    metrics record and mark are written now from the copy the checkpoint carries.
    """
    run = runtime.run(run_url)
    latest = load_latest_checkpoint(run)
    if latest is None:
        return None
    if not is_done(run, latest.epoch, latest.stage):
        _finish(run_url, latest.epoch, latest.stage, latest.payload["metrics"])
    return latest.epoch, latest.stage
