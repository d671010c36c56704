"""Part 1: collect a trajectory by predicting dt, stepping, and retraining on failures."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nbody_dt.config import Config
from nbody_dt.model.evaluate import StepCriteria, evaluate_step
from nbody_dt.model.history import History
from nbody_dt.model.losses import select_loss
from nbody_dt.model.network import DtNetwork
from nbody_dt.model.trajectory import Rows
from nbody_dt.physics.gravity import total_energy
from nbody_dt.physics.state import State


@dataclass(frozen=True)
class LiveCollection:
    """Where collection stands: the current state of each system, its history window, its
    integration time and how many accepted steps it has taken since the run began."""

    state: State
    history: History
    time: torch.Tensor
    step: torch.Tensor

    @staticmethod
    def start(state: State, history_len: int) -> LiveCollection:
        b = state.batch_size
        return LiveCollection(state, History.empty(state, history_len),
                              torch.zeros(b, dtype=state.dtype, device=state.device),
                              torch.zeros(b, dtype=torch.int64, device=state.device))

    def _mask(self, orbits: torch.Tensor) -> torch.Tensor:
        """(B,) True for the systems `orbits`."""
        mask = torch.zeros(self.state.batch_size, dtype=torch.bool, device=self.state.device)
        mask[orbits] = True
        return mask

    def advance(self, orbits: torch.Tensor, after: State, dt: torch.Tensor) -> LiveCollection:
        """Systems `orbits` take their accepted step (to `after`, by `dt`); the others stay."""
        mask = self._mask(orbits)
        full_after = _scatter_state(self.state, orbits, after)
        full_dt = torch.zeros_like(self.time).index_copy(0, orbits, dt.to(self.time))
        return LiveCollection(
            full_after.where(mask, self.state),
            self.history.push(self.state).where(mask, self.history),
            self.time + full_dt,
            self.step + mask.to(torch.int64),
        )

    def restart(self, orbits: torch.Tensor, fresh: State) -> LiveCollection:
        """Systems `orbits` start over from `fresh` (one system each): empty history, time 0, step 0."""
        mask = self._mask(orbits)
        full = _scatter_state(self.state, orbits, fresh.to(device=self.state.device, dtype=self.state.dtype))
        return LiveCollection(
            full.where(mask, self.state),
            History.empty(self.state, self.history.length).where(mask, self.history),
            torch.where(mask, torch.zeros_like(self.time), self.time),
            torch.where(mask, torch.zeros_like(self.step), self.step),
        )


Restart = Callable[[torch.Tensor, str], State]
"""Fresh systems for the live systems `orbits`, drawn deterministically from a key."""


def _scatter_state(base: State, index: torch.Tensor, values: State) -> State:
    return State(base.position.index_copy(0, index, values.position),
                 base.velocity.index_copy(0, index, values.velocity),
                 base.mass.index_copy(0, index, values.mass))


class CollectionStalled(RuntimeError):
    """A system failed more than max_retrain_steps tries in a row.

    Carries the rows accepted before the stall and the live collection at that point, so
    that nothing is lost and the caller can persist them and resume.
    """

    def __init__(self, orbit: int, step: int, rel_dE: float, tries: int, rows: Rows, live: LiveCollection):
        super().__init__(
            f"collection stalled: system {orbit} failed {tries} consecutive tries at step {step} "
            f"(last relative energy error {rel_dE:.3e}); raise collect.max_retrain_steps or relax the band"
        )
        self.orbit, self.step, self.rel_dE, self.rows, self.live = orbit, step, rel_dE, rows, live


def collect_trajectory(
    model: DtNetwork,
    optimizer: torch.optim.Optimizer,
    live: LiveCollection,
    cfg: Config,
    epoch: int,
    restart: Restart | None = None,
) -> tuple[Rows, LiveCollection, dict]:
    """Advance every system by collect.steps_per_epoch accepted steps; return the rows, the new live
    collection and the collect metrics.

    Acceptance is per system: all unfinished systems are evaluated together; those inside
    the acceptance band are recorded and advance, and if any failed, one optimizer step is
    taken on the loss of the failing systems (or of all evaluated ones, loss.on = 'all') and
    the failing systems retry from the same state. One hard orbit so never holds the others
    back. With model.history_len K > 0 a system's first K steps are marked warm-up. With
    collect.accept_safe_after N > 0 a system that failed N tries in a row also advances on a
    step below the band (safe, only too small): the network cannot always shape dt to a narrow
    admissible window (near a sign change of the error), and a stall would end the run.
    A system that fails more than collect.max_retrain_steps tries in a row stalls: with
    collect.on_stall = 'restart' (and a `restart` to draw from) it starts over from a fresh system,
    once per epoch, and collects its remaining rows from there; otherwise, or at its second stall
    of the epoch, CollectionStalled is raised.
    """
    criteria = StepCriteria.from_config(cfg)
    need = cfg.collect.steps_per_epoch
    cap = cfg.collect.max_retrain_steps
    safe_after = cfg.collect.accept_safe_after
    k = cfg.model.history_len
    start = time.perf_counter()
    b = live.state.batch_size
    done = torch.zeros(b, dtype=torch.int64)
    fails_in_row = torch.zeros(b, dtype=torch.int64)
    blocks: list[Rows] = []
    restarted = torch.zeros(b, dtype=torch.bool)
    tries = retrain = accepted_below_band = 0
    while bool((done < need).any()):
        orbits = torch.nonzero(done < need)[:, 0]
        state = live.state.select(orbits)
        ev = evaluate_step(model, state, live.history.select(orbits), criteria)
        tries += len(orbits)
        ok = ev.passed
        if safe_after:
            below_band = ~ok & (ev.rel_dE < criteria.energy_threshold) & (fails_in_row[orbits] >= safe_after)
            ok = ok | below_band
            accepted_below_band += int(below_band.sum())
        if bool(ok.any()):
            acc = orbits[ok]
            blocks.append(Rows(
                position=state.position[ok], velocity=state.velocity[ok], mass=state.mass[ok],
                dt=ev.dt[ok].detach(), time=live.time[acc], energy=total_energy(state.select(ok), criteria.gravity),
                rel_dE=ev.rel_dE[ok], orbit=acc, step=live.step[acc],
                epoch=torch.full_like(acc, epoch), warmup=live.step[acc] < k,
            ))
            live = live.advance(acc, ev.next_state.select(ok), ev.dt[ok].detach())
            done[acc] += 1
            fails_in_row[acc] = 0
        if bool((~ok).any()):
            failed = orbits[~ok]
            fails_in_row[failed] += 1
            worst = int(torch.argmax(fails_in_row))
            if cap and int(fails_in_row[worst]) > cap:
                stalled = torch.nonzero(fails_in_row > cap)[:, 0]
                if cfg.collect.on_stall != "restart" or restart is None or bool(restarted[stalled].any()):
                    pos = int(torch.nonzero(orbits == worst)[0, 0])
                    raise CollectionStalled(worst, int(live.step[worst]), float(ev.rel_dE[pos]),
                                            int(fails_in_row[worst]), _concat(blocks, live), live)
                key = f"epoch {epoch} orbits {stalled.tolist()} steps {live.step[stalled].tolist()}"
                live = live.restart(stalled, restart(stalled, key))
                restarted[stalled] = True
                fails_in_row[stalled] = 0
            optimizer.zero_grad(set_to_none=True)
            select_loss(ev.loss, ok, cfg.loss.on).mean().backward()
            optimizer.step()
            retrain += 1
    rows = _concat(blocks, live)
    wall = time.perf_counter() - start
    dt = rows.dt
    metrics = {
        "collect_accepted": len(rows),
        "collect_tries": tries,
        "collect_pass_rate": len(rows) / tries if tries else 0.0,
        "collect_accepted_below_band": accepted_below_band,
        "collect_retrain_iterations": retrain,
        "collect_restarts": int(restarted.sum()),
        "collect_dt_mean": float(dt.mean()),
        "collect_dt_median": float(dt.median()),
        "collect_dt_min": float(dt.min()),
        "collect_dt_max": float(dt.max()),
        "collect_rel_dE_mean": float(rows.rel_dE.mean()),
        "collect_rel_dE_max": float(rows.rel_dE.max()),
        "collect_wall_s": wall,
        "collect_steps_per_s": len(rows) / wall if wall > 0 else 0.0,
    }
    return rows, live, metrics


def _concat(blocks: list[Rows], live: LiveCollection) -> Rows:
    s = live.state
    return Rows.cat(blocks) if blocks else Rows.empty(s.num_bodies, s.dim, s.dtype)
