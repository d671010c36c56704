"""Trajectory rows and the replay-source contract shared by in-memory and stored trajectories.

A row is one system at one accepted step: the state the step started from, the accepted
dt, the time and energy of that state, the step's relative energy error, the orbit id,
its step index, the epoch, a warm-up flag, and `prev`, the row index of the previous
accepted state of the same orbit (-1 for none). History windows are gathered through
`prev`, so any row's window is found without scanning.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np
import torch

from nbody_dt.model.history import History
from nbody_dt.physics.state import State

FLOAT_COLUMNS = ("dt", "time", "energy", "rel_dE")
INT_COLUMNS = ("orbit", "step", "epoch")
WINDOWS = ("epoch", "all", "last")


def window_bounds(kind: str, epoch_range: tuple[int, int], total_rows: int, last_rows: int) -> tuple[int, int]:
    """Rows [start, stop) that a replay window holds (config replay.window): the epoch's rows
    (`epoch_range`), all `total_rows`, or the `last_rows` last ones."""
    if kind == "epoch":
        return epoch_range
    if kind == "last":
        return max(0, total_rows - last_rows), total_rows
    if kind == "all":
        return 0, total_rows
    raise ValueError(f"unknown window {kind!r} (expected one of {', '.join(WINDOWS)})")


@dataclass(frozen=True)
class Rows:
    """A block of trajectory rows. position, velocity: (R, N, D); mass: (R, N); the rest (R,).

    dt, time, energy, rel_dE are floating point; orbit, step, epoch int64; warmup bool.
    """

    position: torch.Tensor
    velocity: torch.Tensor
    mass: torch.Tensor
    dt: torch.Tensor
    time: torch.Tensor
    energy: torch.Tensor
    rel_dE: torch.Tensor
    orbit: torch.Tensor
    step: torch.Tensor
    epoch: torch.Tensor
    warmup: torch.Tensor

    def __len__(self) -> int:
        return self.dt.shape[0]

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def cat(blocks: list[Rows]) -> Rows:
        return Rows(**{f.name: torch.cat([getattr(b, f.name) for b in blocks]) for f in fields(Rows)})

    @staticmethod
    def empty(num_bodies: int, dim: int, dtype: torch.dtype) -> Rows:
        f = torch.zeros(0, dtype=dtype)
        i = torch.zeros(0, dtype=torch.int64)
        return Rows(torch.zeros(0, num_bodies, dim, dtype=dtype), torch.zeros(0, num_bodies, dim, dtype=dtype),
                    torch.zeros(0, num_bodies, dtype=dtype), f, f, f, f, i, i, i, torch.zeros(0, dtype=torch.bool))

    def state(self) -> State:
        return State(self.position, self.velocity, self.mass)


def link_previous(orbit: np.ndarray, last_row_of_orbit: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """prev links for rows start.. start+R-1 and the updated per-orbit last row.

    last_row_of_orbit[o] is the global index of orbit o's latest row so far (-1 for none).
    """
    orbit = np.asarray(orbit, dtype=np.int64)
    last = np.array(last_row_of_orbit, dtype=np.int64, copy=True)
    prev = np.empty(len(orbit), dtype=np.int64)
    for i, o in enumerate(orbit):
        prev[i] = last[o]
        last[o] = start + i
    return prev, last


@dataclass(frozen=True)
class Minibatch:
    """States to evaluate with their history windows; `rows` are their trajectory row indices."""

    state: State
    history: History
    rows: torch.Tensor

    def __len__(self) -> int:
        return self.state.batch_size

    def select(self, index: torch.Tensor) -> Minibatch:
        return Minibatch(self.state.select(index), self.history.select(index), self.rows[index])

    def to(self, device=None, dtype=None) -> Minibatch:
        return Minibatch(self.state.to(device, dtype), self.history.to(device, dtype), self.rows)


class ReplaySource(Protocol):
    """What Part 2 replays: the replayable rows of one window (warm-up rows excluded)."""

    def __len__(self) -> int:
        """Number of replayable rows."""
        ...

    def gather(self, positions: torch.Tensor) -> Minibatch:
        """The replayable rows at `positions` (each in [0, len)), in that order, with history."""
        ...


def gather_history(rows: np.ndarray, prev: np.ndarray, history_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (B, K) of each row's K previous states through the prev links, and validity (B, K)."""
    b = len(rows)
    idx = np.full((b, history_len), -1, dtype=np.int64)
    cur = np.asarray(rows, dtype=np.int64)
    for k in range(history_len):
        has = cur >= 0
        cur = np.where(has, prev[np.where(has, cur, 0)], -1)
        idx[:, k] = cur
    return idx, idx >= 0


class InMemoryTrajectory:
    """A trajectory held in memory (tests, the library without storage).

    `window_start` drops older rows from replay (the 'epoch' and 'last' windows); warm-up
    rows are never replayed. History may reach back before the window.
    """

    def __init__(self, rows: Rows, prev: np.ndarray, history_len: int, window_start: int = 0):
        self.rows = rows
        self.prev = np.asarray(prev, dtype=np.int64)
        self.history_len = history_len
        warm = rows.warmup.numpy()
        self.replayable = np.nonzero(~warm & (np.arange(len(rows)) >= window_start))[0]

    @staticmethod
    def from_blocks(blocks: list[Rows], num_orbits: int, history_len: int, window_start: int = 0) -> InMemoryTrajectory:
        rows = Rows.cat(blocks)
        prev, _ = link_previous(rows.orbit.numpy(), np.full(num_orbits, -1), 0)
        return InMemoryTrajectory(rows, prev, history_len, window_start)

    def __len__(self) -> int:
        return len(self.replayable)

    def gather(self, positions: torch.Tensor) -> Minibatch:
        rows = self.replayable[np.asarray(positions, dtype=np.int64)]
        return minibatch_from_arrays(rows, self.rows, self.prev, self.history_len)


def _take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for an index of any shape, as one index_select (advanced indexing with a 2-D
    index is multi-threaded and 100x slower under CPU contention)."""
    return table.index_select(0, index.reshape(-1)).reshape(index.shape + table.shape[1:])


def minibatch_from_arrays(rows: np.ndarray, table: State | Rows, prev: np.ndarray, history_len: int) -> Minibatch:
    """Assemble a Minibatch for `rows` of a table of states (Rows or State) indexed by row."""
    r = torch.as_tensor(rows, dtype=torch.int64)
    state = State(_take(table.position, r), _take(table.velocity, r), _take(table.mass, r))
    hidx, valid = gather_history(rows, prev, history_len)
    safe = torch.as_tensor(np.where(valid, hidx, 0))
    vmask = torch.as_tensor(valid)
    pos = _take(table.position, safe) * vmask[..., None, None]
    vel = _take(table.velocity, safe) * vmask[..., None, None]
    return Minibatch(state, History(pos, vel, vmask), r)
