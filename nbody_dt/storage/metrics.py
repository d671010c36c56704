"""Metrics records and the ledger of completed stages: one small object per (epoch, stage).

One object per record makes every write independent and whole (temp + rename locally, one PUT
on object stores), so a crash loses at most the record being written, never an earlier one.
"""

from __future__ import annotations

import json

import numpy as np

from nbody_dt.storage.errors import RunError, one_line
from nbody_dt.storage.run import Run, now_iso, parse_stage_key, stage_key

METRICS = "metrics"
LEDGER = "ledger"


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
    run.write_bytes(f"{METRICS}/{stage_key(epoch, stage)}.json", json.dumps(clean, sort_keys=True).encode())


def read_metrics(run: Run, epoch: int | None = None) -> list[dict]:
    """Every metrics record (or only `epoch`'s) as {'epoch', 'stage', **record}, ordered by (epoch, stage order)."""
    out = []
    for name in run.listdir(METRICS):
        key = parse_stage_key(name)
        if key is None or key[2] != ".json" or (epoch is not None and key[0] != epoch):
            continue
        try:
            record = json.loads(run.read_bytes(f"{METRICS}/{name}"))
        except (OSError, ValueError) as exc:
            raise RunError(f"corrupt metrics record {run.url}/{METRICS}/{name}: {one_line(exc)}") from exc
        out.append({"epoch": key[0], "stage": key[1], **record})
    return out


def mark_done(run: Run, epoch: int, stage: str) -> None:
    """Record that (epoch, stage) completed; a restart skips it."""
    run.write_bytes(f"{LEDGER}/{stage_key(epoch, stage)}", json.dumps({"time": now_iso()}).encode())


def is_done(run: Run, epoch: int, stage: str) -> bool:
    return run.exists(f"{LEDGER}/{stage_key(epoch, stage)}")


def completed(run: Run) -> list[tuple[int, str]]:
    """The completed (epoch, stage) pairs, ordered by (epoch, stage order)."""
    keys = (parse_stage_key(name) for name in run.listdir(LEDGER))
    return [(k[0], k[1]) for k in keys if k is not None and k[2] == ""]
