"""Run reports: per-epoch metrics with totals, as a JSON-ready dict or a rich table.

Metric keys are whatever the training stages recorded; an epoch's records are merged into one
row by `storage.epoch_rows`. The caller opens the run (read-only) once and passes it in.
"""

from __future__ import annotations

from rich.table import Table

from nbody_dt.storage import Run, epoch_rows, read_metrics
from nbody_dt.storage.integrity import check_run


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def epoch_table(run: Run) -> list[dict]:
    """One flat row per epoch: epoch, committed trajectory rows, then every recorded metric."""
    merged = epoch_rows(read_metrics(run))
    ranges = run.trajectory.epochs()
    rows = []
    for epoch in sorted(set(merged) | set(ranges)):
        start, stop = ranges.get(epoch, (0, 0))
        rows.append({"epoch": epoch, "rows": stop - start,
                     **{k: v for k, v in merged.get(epoch, {}).items() if k != "epoch"}})
    return rows


def numeric_keys(rows: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for row in rows:
        keys.update((k, None) for k, v in row.items() if k != "epoch" and is_number(v))
    return list(keys)


def report_dict(run: Run) -> dict:
    """The run's identity and config, one row per epoch, and totals (sum and mean of each numeric
    column over the epochs that have it). A damaged run is refused (RunError), not reported."""
    check_run(run, deep=False)
    rows = epoch_table(run)
    totals: dict = {"epochs": len(rows), "rows": run.trajectory.num_rows, "sum": {}, "mean": {}}
    for key in numeric_keys(rows):
        values = [row[key] for row in rows if is_number(row.get(key))]
        totals["sum"][key] = sum(values)
        totals["mean"][key] = sum(values) / len(values)
    return {"run": run.url, "created": run.created, "package_version": run.package_version,
            "config": run.config.to_dict(), "epochs": rows, "totals": totals}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def report_table(report: dict, keys: list[str] | None = None) -> Table:
    """A table of report_dict's rows: one per epoch with every numeric metric (or just `keys`),
    then sum and mean."""
    keys = numeric_keys(report["epochs"]) if keys is None else list(keys)
    totals = report["totals"]
    table = Table(title=f"run {report['run']}: {totals['epochs']} epochs, {totals['rows']} trajectory rows",
                  title_justify="left")
    for header in ("epoch", *keys):
        table.add_column(header, justify="right")
    for i, row in enumerate(report["epochs"]):
        table.add_row(str(row["epoch"]), *(_fmt(row.get(k)) for k in keys),
                      end_section=i == len(report["epochs"]) - 1)
    for label in ("sum", "mean"):
        table.add_row(label, *(_fmt(totals[label].get(k)) for k in keys), style="bold")
    return table
