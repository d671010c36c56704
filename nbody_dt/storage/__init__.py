"""Run storage: run metadata and writer lock, the Zarr trajectory, checkpoints, metrics, ledger.

A run is addressed by one URL (a local path or any fsspec URL). Nothing here imports Prefect;
reports and plots of a run live above, in `nbody_dt.report` and `nbody_dt.plots`.
"""

from nbody_dt.storage.checkpoints import (
    Checkpoint,
    list_checkpoints,
    load_latest_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from nbody_dt.storage.errors import RunError
from nbody_dt.storage.metrics import completed, epoch_rows, is_done, mark_done, read_metrics, write_metrics
from nbody_dt.storage.run import STAGES, Run
from nbody_dt.storage.trajectory_store import StoredWindow, TrajectoryStore

__all__ = [
    "Checkpoint",
    "STAGES",
    "Run",
    "RunError",
    "StoredWindow",
    "TrajectoryStore",
    "completed",
    "epoch_rows",
    "is_done",
    "list_checkpoints",
    "load_latest_checkpoint",
    "read_checkpoint",
    "mark_done",
    "read_metrics",
    "save_checkpoint",
    "write_metrics",
]
