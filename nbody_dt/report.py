"""Run reports: per-epoch metrics with totals (JSON-ready dict, text table) and PNG plots.

Metric keys are whatever the training stages recorded; an epoch's records are merged into one
row. A key whose value differs between the stages of an epoch is shown once per stage, as
'<stage>.<key>'. Runs are opened read-only.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from nbody_dt.storage.integrity import check_run
from nbody_dt.storage.metrics import read_metrics
from nbody_dt.storage.run import Run

_MAX_ORBITS_PLOTTED = 8


def _load(run_url, storage_options) -> tuple[Run, list[dict]]:
    """The run (read-only, checked: a damaged run is refused, not reported) and its per-epoch rows."""
    with Run.open(run_url, write=False, storage_options=storage_options) as run:
        check_run(run, deep=False)
        return run, _epoch_rows(read_metrics(run), run.trajectory.epochs())


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _epoch_rows(records: list[dict], epoch_ranges: dict[int, tuple[int, int]]) -> list[dict]:
    """One flat row per epoch: epoch, committed trajectory rows, then every recorded metric."""
    first: dict[tuple[int, str], object] = {}
    conflicting = set()
    for rec in records:
        for key, value in rec.items():
            if first.setdefault((rec["epoch"], key), value) != value and key not in ("epoch", "stage"):
                conflicting.add(key)
    rows: dict[int, dict] = {}
    for epoch in sorted({r["epoch"] for r in records} | set(epoch_ranges)):
        start, stop = epoch_ranges.get(epoch, (0, 0))
        rows[epoch] = {"epoch": epoch, "rows": stop - start}
    for rec in records:
        for key, value in rec.items():
            if key not in ("epoch", "stage"):
                rows[rec["epoch"]][f"{rec['stage']}.{key}" if key in conflicting else key] = value
    return list(rows.values())


def _numeric_keys(rows: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for row in rows:
        keys.update((k, None) for k, v in row.items() if k != "epoch" and _is_number(v))
    return list(keys)


def report_dict(run_url, storage_options: dict | None = None) -> dict:
    """The run's identity and config, one row per epoch, and totals (sum and mean of each numeric
    column over the epochs that have it)."""
    run, rows = _load(run_url, storage_options)
    totals: dict = {"epochs": len(rows), "rows": run.trajectory.num_rows, "sum": {}, "mean": {}}
    for key in _numeric_keys(rows):
        values = [row[key] for row in rows if _is_number(row.get(key))]
        totals["sum"][key] = sum(values)
        totals["mean"][key] = sum(values) / len(values)
    return {"run": run.url, "created": run.created, "package_version": run.package_version,
            "config": run.config.to_dict(), "epochs": rows, "totals": totals}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def report_table(run_url, storage_options: dict | None = None, keys: list[str] | None = None) -> str:
    """A text table: one line per epoch with every numeric metric (or just `keys`), then sum and mean."""
    rep = report_dict(run_url, storage_options)
    keys = _numeric_keys(rep["epochs"]) if keys is None else list(keys)
    lines = [[str(row["epoch"])] + [_fmt(row.get(k)) for k in keys] for row in rep["epochs"]]
    lines += [[label] + [_fmt(rep["totals"][label].get(k)) for k in keys] for label in ("sum", "mean")]
    header = ["epoch", *keys]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    rule = "  ".join("-" * w for w in widths)
    body = [fmt.format(*line) for line in lines]
    t = rep["totals"]
    title = f"run {rep['run']}: {t['epochs']} epochs, {t['rows']} trajectory rows"
    return "\n".join([title, fmt.format(*header), rule, *body[:-2], rule, *body[-2:]])


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["epoch"], r[key]) for r in rows if _is_number(r.get(key))]
    return [e for e, _ in pairs], [v for _, v in pairs]


def write_plots(run_url, out_dir, storage_options: dict | None = None) -> list[Path]:
    """PNG plots of what the run holds: accepted dt over time, replay iterations per epoch, pass
    rates per epoch and the energy-error distribution. Returns the files written."""
    run, rows = _load(run_url, storage_options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = run.trajectory.columns(("dt", "time", "rel_dE", "orbit", "warmup"))
    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        written.append(out / name)

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
        save(fig, "dt_over_time.png")

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
            save(fig, "energy_error.png")

    epochs, iters = _series(rows, "replay_iterations")
    if epochs:
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        ax.bar(epochs, iters)
        ax.set(xlabel="epoch", ylabel="replay iterations", title="replay iterations per epoch")
        save(fig, "replay_iterations.png")

    rates = {k: _series(rows, k) for k in ("collect_pass_rate", "replay_final_pass_rate")}
    if any(e for e, _ in rates.values()):
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for key, (e, v) in rates.items():
            if e:
                ax.plot(e, v, marker="o", label=key)
        ax.set(xlabel="epoch", ylabel="pass rate", ylim=(0, 1.05), title="pass rate per epoch")
        ax.legend()
        save(fig, "pass_rate.png")
    return written
