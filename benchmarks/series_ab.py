"""The error series' cost before and after a change: `error_series_dt` of a git revision against the
working tree, in one process, one thread (medians of interleaved calls), with the force evaluation
of the same batch for scale, and how far the two dt differ.

    python benchmarks/series_ab.py --before REV [--allocator retain|default]

--allocator retain calls `nbody_dt.allocator.retain_freed_memory()` first, as the CLI does;
default leaves glibc's allocator as it is (run each in its own process).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

from nbody_dt.allocator import retain_freed_memory  # noqa: E402
from nbody_dt.physics import error_series  # noqa: E402
from nbody_dt.physics import initial_conditions as ics  # noqa: E402
from nbody_dt.physics.gravity import Gravity, accelerations  # noqa: E402

SIZES = ((1, 3), (1, 16), (1, 64), (1, 256), (1, 1024), (256, 16), (4, 64))
"""(batch, N): single systems of growing N, a training batch and a small batch."""


def module_at(revision: str):
    """nbody_dt/physics/error_series.py as it was at `revision`, imported under another name."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{revision}:nbody_dt/physics/error_series.py"], cwd=root,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "error_series_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("error_series_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the git revision to compare against")
    ap.add_argument("--allocator", choices=("retain", "default"), default="retain")
    args = ap.parse_args(argv)
    if args.allocator == "retain" and not retain_freed_memory():
        raise SystemExit("--allocator retain: not glibc, nothing to retain")
    torch.set_num_threads(1)
    before = module_at(args.before)
    g = Gravity(1.0, 0.01)
    print(f"machine: {cpu_model()}, torch {torch.__version__}, 1 thread, allocator {args.allocator}, "
          f"before = {args.before}", flush=True)
    for b, n in SIZES:
        state = ics.plummer_sphere(n, 1_000_003, b)
        calls = {"before": lambda: before.error_series_dt(state, g, 2e-4),
                 "now": lambda: error_series.error_series_dt(state, g, 2e-4),
                 "force": lambda: accelerations(state.position, state.mass, g)}
        times = {k: [] for k in calls}
        with torch.no_grad():
            for call in calls.values():
                call()
            for _ in range(5 if n >= 1024 else 21):
                for k, call in calls.items():
                    t0 = time.perf_counter()
                    call()
                    times[k].append(1e3 * (time.perf_counter() - t0))
            moved = float((calls["now"]() / calls["before"]() - 1).abs().max())
        ms = {k: statistics.median(v) for k, v in times.items()}
        print(f"{b} x {n}: before {ms['before']:.3f} ms, now {ms['now']:.3f} ms ({ms['before'] / ms['now']:.2f}x), "
              f"force {ms['force']:.3f} ms, now / force {ms['now'] / ms['force']:.1f}; "
              f"max |dt now / before - 1| {moved:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
