"""Metrics records and the ledger of completed stages: one small object per (epoch, stage).

One object per record makes every write independent and whole (temp + rename locally, one PUT
on object stores), so a crash loses at most the record being written, never an earlier one.
Every object also names its own (epoch, stage), so a stale copy of another record under this
name is recognized. A ledger mark may carry details of what the stage committed (persist: the
epoch's row range and digests, a second copy of the trajectory's commit for that epoch).
"""

from __future__ import annotations

import json

import numpy as np

from nbody_dt.storage.errors import RunError, one_line
from nbody_dt.storage.run import LEDGER_DIR as LEDGER
from nbody_dt.storage.run import METRICS_DIR as METRICS
from nbody_dt.storage.run import Run, now_iso, parse_stage_key, stage_key


def write_metrics(run: Run, epoch: int, stage: str, record: dict) -> None:
    """Store the flat metrics record of (epoch, stage) (str keys; int, float, bool or str values),
    replacing an earlier one of the same stage."""
    clean = {}
    for key, value in record.items():
        if not isinstance(key, str) or key in ("epoch", "stage"):
            raise ValueError(f"metrics key {key!r}: keys are strings other than 'epoch' and 'stage'")
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"metrics[{key!r}] is a {type(value).__name__}; records hold numbers and strings")
        clean[key] = value
    run.write_bytes(f"{METRICS}/{stage_key(epoch, stage)}.json",
                    json.dumps({**clean, "epoch": epoch, "stage": stage}, sort_keys=True).encode())


def read_metrics(run: Run, epoch: int | None = None) -> list[dict]:
    """Every metrics record (or only `epoch`'s) as {'epoch', 'stage', **record}, ordered by (epoch, stage order)."""
    out = []
    for name in run.listdir(METRICS):
        key = parse_stage_key(name)
        if key is None or key[2] != ".json" or (epoch is not None and key[0] != epoch):
            continue
        record = _read_record(run, f"{METRICS}/{name}", key[0], key[1])
        out.append({"epoch": key[0], "stage": key[1],
                    **{k: v for k, v in record.items() if k not in ("epoch", "stage")}})
    return out


def _read_record(run: Run, rel: str, epoch: int, stage: str) -> dict:
    """A JSON object of the run that names (epoch, stage) itself; RunError naming it if it is
    unreadable, not an object, or a copy of another stage's record (records written before they
    named themselves are taken as they are)."""
    where = f"{run.url}/{rel}"
    try:
        record = json.loads(run.read_bytes(rel))
    except (OSError, ValueError) as exc:
        raise RunError(f"damaged record {where}: {one_line(exc)}") from exc
    if not isinstance(record, dict):
        raise RunError(f"damaged record {where}: not a JSON object")
    if "epoch" in record and (record.get("epoch"), record.get("stage")) != (epoch, stage):
        raise RunError(f"damaged record {where}: it holds the record of epoch {record.get('epoch')} "
                       f"stage {record.get('stage')} (a stale or misplaced copy)")
    return record


def mark_done(run: Run, epoch: int, stage: str, details: dict | None = None) -> None:
    """Record that (epoch, stage) completed, with optional JSON `details`; a restart skips it."""
    mark = {**(details or {}), "time": now_iso(), "epoch": epoch, "stage": stage}
    run.write_bytes(f"{LEDGER}/{stage_key(epoch, stage)}", json.dumps(mark, sort_keys=True).encode())


def read_mark(run: Run, epoch: int, stage: str) -> dict:
    """The ledger mark of a completed (epoch, stage), checked like a metrics record."""
    return _read_record(run, f"{LEDGER}/{stage_key(epoch, stage)}", epoch, stage)
def epoch_rows(records: list[dict]) -> dict[int, dict]:
    """One flat row per epoch ({epoch: {'epoch': epoch, **metrics}}) from read_metrics' records.

    A key recorded with different values by two stages of an epoch appears once per stage, as
    '<stage>.<key>'; no stage's value hides another's."""
    first: dict[tuple[int, str], object] = {}
    conflicting = set()
    for rec in records:
        for key, value in rec.items():
            if first.setdefault((rec["epoch"], key), value) != value and key not in ("epoch", "stage"):
                conflicting.add(key)
    rows: dict[int, dict] = {}
    for rec in records:
        row = rows.setdefault(rec["epoch"], {"epoch": rec["epoch"]})
        for key, value in rec.items():
            if key not in ("epoch", "stage"):
                row[f"{rec['stage']}.{key}" if key in conflicting else key] = value
    return rows


def is_done(run: Run, epoch: int, stage: str) -> bool:
    return run.exists(f"{LEDGER}/{stage_key(epoch, stage)}")


def completed(run: Run) -> list[tuple[int, str]]:
    """The completed (epoch, stage) pairs, ordered by (epoch, stage order)."""
    keys = (parse_stage_key(name) for name in run.listdir(LEDGER))
    return [(k[0], k[1]) for k in keys if k is not None and k[2] == ""]
