"""Fault injection for the crash tests, in one module: production code only names its points.

- `crash_point(point, epoch)`: with `NBODY_DT_KILL_AT=<point>:<epoch>` the process SIGKILLs
  itself when it reaches that point in that epoch (e.g. `replay:1`, `checkpoint-write:0`).
- `pause_point(point)`: with `NBODY_DT_PAUSE_AT=<point>:<path>` the process writes its pid to
  <path> and sleeps there, for a test to kill it at that exact moment (e.g. `before-commit`).

Unset, each costs one environment lookup. (Faults inside Dask workers need no hook: the tests
register a worker plugin, tests/dask_faults.py.)
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

KILL_ENV = "NBODY_DT_KILL_AT"
PAUSE_ENV = "NBODY_DT_PAUSE_AT"


def crash_point(point: str, epoch: int) -> None:
    """Die at once, as from a lost machine, if the environment asks for this point and epoch."""
    if os.environ.get(KILL_ENV) == f"{point}:{epoch}":
        os.kill(os.getpid(), signal.SIGKILL)


def pause_point(point: str) -> None:
    """Stop here (for an hour, i.e. until killed) if the environment asks for this point."""
    name, _, marker = os.environ.get(PAUSE_ENV, "").partition(":")
    if name == point and marker:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(3600)
