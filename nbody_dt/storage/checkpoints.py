"""Checkpoints at stage boundaries: checksummed, committed by a sidecar, pruned to the last K.

`checkpoints/<stage_key>.pt` is a `torch.save` of the payload (loadable with weights_only=True);
`<stage_key>.pt.json`, written after it, holds its sha256 and size and is the commit marker: a
checkpoint without it does not exist. Names sort by (epoch, stage order).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path
from typing import NamedTuple

import torch

from nbody_dt.faults import crash_point
from nbody_dt.storage.errors import RunError, one_line
from nbody_dt.storage.run import CHECKPOINTS_DIR as FOLDER
from nbody_dt.storage.run import Run, now_iso, parse_stage_key, stage_key

SIDECAR = ".json"


class Checkpoint(NamedTuple):
    """A loaded checkpoint: the stage boundary it was taken at and its payload."""

    epoch: int
    stage: str
    payload: dict


def save_checkpoint(run: Run, epoch: int, stage: str, payload: dict) -> str:
    """Store `payload` (nested dicts/lists of tensors, numbers, strings) as the (epoch, stage)
    checkpoint, then prune to `storage.keep_checkpoints`. Returns its object name.

    A payload that `torch.load(weights_only=True)` could not read back is refused (ValueError)
    before anything is written.
    """
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"checkpoint payload is not loadable with weights_only=True: {exc}") from None
    name = stage_key(epoch, stage) + ".pt"
    run.remove(f"{FOLDER}/{name}{SIDECAR}")  # uncommit an older copy before replacing its data
    run.write_bytes(f"{FOLDER}/{name}", data)
    crash_point("checkpoint-write", epoch)  # restart tests: die with the data written, not committed
    sidecar = {"epoch": epoch, "stage": stage, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
               "created": now_iso()}
    run.write_bytes(f"{FOLDER}/{name}{SIDECAR}", json.dumps(sidecar).encode())
    _prune(run, run.config.storage.keep_checkpoints)
    return name


def list_checkpoints(run: Run) -> list[tuple[int, str]]:
    """(epoch, stage) of the committed checkpoints, oldest first."""
    return [(e, s) for e, s, _ in _committed(run)]


def load_latest_checkpoint(run: Run, map_location="cpu") -> Checkpoint | None:
    """The newest committed checkpoint, or None if there is none.

    A committed checkpoint whose data is missing, fails its checksum, is a copy of another
    checkpoint or cannot be loaded is damage, not a crash (the data is written before its
    sidecar): RunError naming it, never a silent fall-back to an older one.
    """
    committed = _committed(run)
    if not committed:
        return None
    epoch, stage, _ = committed[-1]
    return Checkpoint(epoch, stage, load_checkpoint(run, epoch, stage, map_location))


def read_checkpoint(source: str) -> dict:
    """The payload of a checkpoint file, or of a run URL's newest intact checkpoint, on the CPU;
    RunError naming the source when it is none of these."""
    if Path(source).is_file():
        try:
            payload = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch's messages span lines and advise weights_only=False: never that
            reason = "not loadable with weights_only=True" if "weights_only" in str(exc) else one_line(exc)
            raise RunError(f"{source}: not a readable nbody-dt checkpoint ({reason})") from None
    else:
        with Run.open(source, write=False) as run:
            latest = load_latest_checkpoint(run)
        if latest is None:
            raise RunError(f"{source}: the run has no checkpoint yet")
        payload = latest.payload
    if not isinstance(payload, dict) or "config" not in payload or "model" not in payload:
        raise RunError(f"{source}: not an nbody-dt checkpoint (no config or model)")
    return payload


def load_checkpoint(run: Run, epoch: int, stage: str, map_location="cpu") -> dict:
    """The payload of the committed (epoch, stage) checkpoint; RunError naming it if it is not
    committed or damaged."""
    data = verified_checkpoint_bytes(run, epoch, stage)
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        if not isinstance(payload, dict):
            raise ValueError("not a checkpoint payload")
    except Exception as exc:  # torch's own messages span many lines
        raise RunError(f"damaged checkpoint {run.url}/{FOLDER}/{stage_key(epoch, stage)}.pt: "
                       f"{one_line(exc)}") from exc
    return payload


def verified_checkpoint_bytes(run: Run, epoch: int, stage: str) -> bytes:
    """The data of the committed (epoch, stage) checkpoint after checking it against its sidecar
    (its name, size and sha256); RunError naming it otherwise."""
    name = stage_key(epoch, stage) + ".pt"
    try:
        sidecar = json.loads(run.read_bytes(f"{FOLDER}/{name}{SIDECAR}"))
        if not isinstance(sidecar, dict) or (sidecar.get("epoch"), sidecar.get("stage")) != (epoch, stage):
            raise ValueError(f"its sidecar {name}{SIDECAR} describes another checkpoint")
        data = run.read_bytes(f"{FOLDER}/{name}")
        if hashlib.sha256(data).hexdigest() != sidecar.get("sha256"):
            raise ValueError("sha256 checksum mismatch")
    except Exception as exc:
        raise RunError(f"damaged checkpoint {run.url}/{FOLDER}/{name}: {one_line(exc)}") from exc
    return data


def _committed(run: Run) -> list[tuple[int, str, str]]:
    """(epoch, stage, data object name) of every checkpoint whose commit sidecar exists, oldest first."""
    out = []
    for name in run.listdir(FOLDER):
        key = parse_stage_key(name)
        if key is not None and key[2] == ".pt" + SIDECAR:
            out.append((key[0], key[1], name.removesuffix(SIDECAR)))
    return out  # listdir is sorted, and stage keys sort by (epoch, stage order)


def _prune(run: Run, keep: int) -> None:
    """Delete everything in the folder but the newest `keep` committed checkpoints (sidecars first,
    so an interrupted prune leaves uncommitted data, never a commit without data)."""
    kept = {name for _, _, name in _committed(run)[-keep:]}
    doomed = [n for n in run.listdir(FOLDER) if n.removesuffix(SIDECAR) not in kept]
    for name in sorted(doomed, key=lambda n: not n.endswith(SIDECAR)):
        run.remove(f"{FOLDER}/{name}")
