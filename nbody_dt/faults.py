"""Named crash points for restart tests.

`NBODY_DT_KILL_AT=<point>:<epoch>` makes the process SIGKILL itself when it reaches that
point in that epoch (e.g. `replay:1`, `checkpoint-write:0`). Unset, it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "NBODY_DT_KILL_AT"


def crash_point(point: str, epoch: int) -> None:
    """Die at once, as from a lost machine, if the environment asks for this point and epoch."""
    if os.environ.get(ENV) == f"{point}:{epoch}":
        os.kill(os.getpid(), signal.SIGKILL)
