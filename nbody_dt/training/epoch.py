"""One epoch of the two-phase routine as plain library code: collect, then replay."""

from __future__ import annotations

from functools import partial

import numpy as np

from nbody_dt.config import Config
from nbody_dt.model.trajectory import InMemoryTrajectory, Rows, link_previous, window_bounds
from nbody_dt.training.collect import collect_trajectory
from nbody_dt.training.evaluators import Evaluator
from nbody_dt.training.replay import generalize_on_trajectory, replay_steps
from nbody_dt.training.setup import Training, restart_states


class MemoryRun:
    """All rows of a run held in memory, with their prev links (the library path without storage)."""

    def __init__(self, num_orbits: int, history_len: int):
        self.history_len = history_len
        self.blocks: list[Rows] = []
        self.prev = np.zeros(0, dtype=np.int64)
        self.last_row = np.full(num_orbits, -1, dtype=np.int64)
        self.epoch_start: dict[int, int] = {}

    @property
    def num_rows(self) -> int:
        return len(self.prev)

    def append(self, rows: Rows, epoch: int) -> None:
        self.epoch_start[epoch] = self.num_rows
        prev, self.last_row = link_previous(rows.orbit.cpu().numpy(), self.last_row, self.num_rows)
        self.prev = np.concatenate([self.prev, prev])
        self.blocks.append(Rows(**{k: v.cpu() for k, v in rows.as_dict().items()}))

    def window(self, cfg: Config, epoch: int) -> InMemoryTrajectory:
        # The epoch is the last one appended: its rows run to the end.
        start, _ = window_bounds(cfg.replay.window, (self.epoch_start[epoch], self.num_rows), self.num_rows,
                                 cfg.replay.last_rows)
        return InMemoryTrajectory(Rows.cat(self.blocks), self.prev, self.history_len, start)


def train_epoch(training: Training, run: MemoryRun, cfg: Config, epoch: int,
                evaluator: Evaluator | None = None) -> dict:
    """Part 1 then Part 2 over the configured replay window; one flat dict of all metrics."""
    rows, training.live, collect_metrics = collect_trajectory(training.model, training.optimizer, training.live,
                                                              cfg, epoch, partial(restart_states, cfg))
    run.append(rows, epoch)
    _, _, replay_metrics = generalize_on_trajectory(training.model, run.window(cfg, epoch), training.optimizer, cfg,
                                                    evaluator, steps=replay_steps(cfg, epoch))
    return {"epoch": epoch, **collect_metrics, **replay_metrics}
