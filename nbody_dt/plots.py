"""PNG figures, all drawn with matplotlib's object API (`Figure`, no pyplot, no global backend):
a run's training figures (`nbody-dt report --plots`) and one simulation (`nbody-dt simulate --plot`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from nbody_dt.physics.simulate import SimulationResult
from nbody_dt.report import is_number
from nbody_dt.storage import Run

_MAX_ORBITS_PLOTTED = 8
_DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["epoch"], r[key]) for r in rows if is_number(r.get(key))]
    return [e for e, _ in pairs], [v for _, v in pairs]


def write_run_plots(run: Run, rows: list[dict], out_dir) -> list[Path]:
    """PNG plots of what the run holds (`rows`: report.epoch_table's): accepted dt over time,
    replay iterations per epoch, pass rates per epoch and the energy-error distribution.
    Returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = run.trajectory.columns(("dt", "time", "rel_dE", "orbit", "warmup"))
    written: list[Path] = []

    keep = ~cols["warmup"]
    if keep.any():
        fig = Figure(figsize=(8, 4))
        ax = fig.subplots()
        orbits = np.unique(cols["orbit"][keep])[:_MAX_ORBITS_PLOTTED]
        for o in orbits:
            sel = keep & (cols["orbit"] == o)
            ax.plot(cols["time"][sel], cols["dt"][sel], lw=0.8, label=f"orbit {o}")
        ax.set(xlabel="time", ylabel="accepted dt", yscale="log",
               title=f"accepted dt over time ({len(orbits)} orbits shown)")
        ax.legend(fontsize="small")
        written.append(_save(fig, out / "dt_over_time.png"))

        err = np.abs(cols["rel_dE"][keep])
        err = err[err > 0]
        if err.size:
            fig = Figure(figsize=(6, 4))
            ax = fig.subplots()
            ax.hist(np.log10(err), bins=60)
            c = run.config.collect
            for edge in (c.accept_lower, c.energy_threshold):
                if edge > 0:
                    ax.axvline(math.log10(edge), color="k", ls="--", lw=1)
            ax.set(xlabel="log10 |relative energy error| of accepted steps", ylabel="rows",
                   title="energy-error distribution (dashed: acceptance band)")
            written.append(_save(fig, out / "energy_error.png"))

    epochs, iters = _series(rows, "replay_iterations")
    if epochs:
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        ax.bar(epochs, iters)
        ax.set(xlabel="epoch", ylabel="replay iterations", title="replay iterations per epoch")
        written.append(_save(fig, out / "replay_iterations.png"))

    rates = {k: _series(rows, k) for k in ("collect_pass_rate", "replay_final_pass_rate")}
    if any(e for e, _ in rates.values()):
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for key, (e, v) in rates.items():
            if e:
                ax.plot(e, v, marker="o", label=key)
        ax.set(xlabel="epoch", ylabel="pass rate", ylim=(0, 1.05), title="pass rate per epoch")
        ax.legend()
        written.append(_save(fig, out / "pass_rate.png"))
    return written


def plot_simulation(result: SimulationResult, path, title: str) -> Path:
    """Orbit, dt(t) and |dE/E|(t) of one simulation in one figure."""
    pos = np.asarray(result.positions)
    fig = Figure(figsize=(15, 4.5))
    orbit, dt, err = fig.subplots(1, 3)
    for body in range(pos.shape[1]):
        orbit.plot(pos[:, body, 0], pos[:, body, 1], lw=0.7)
    orbit.set(aspect="equal", title="orbit")
    dt.semilogy(result.time, result.dt, lw=0.8)
    dt.set(xlabel="t", ylabel="dt")
    err.semilogy(result.time, np.maximum(result.step_rel_dE, 1e-18), lw=0.6, label="per step")
    err.semilogy(result.time, np.maximum(result.total_rel_dE, 1e-18), lw=0.8, label="total |E(t)-E0|/|E0|")
    err.set(xlabel="t")
    err.legend()
    fig.suptitle(title)
    return _save(fig, Path(path))
