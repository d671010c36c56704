"""Storage benchmark: trajectory append throughput and replay-gather cost against one replay iteration.

    python benchmarks/storage_bench.py [--rows 1000000] [--chunks 1024,4096,16384,65536]

For each chunk size it builds a store of `--rows` two-body rows (N=2, D=2, float64, 16 orbits,
smooth orbit-like values so compression is realistic) in a temporary directory and measures:
append throughput for epochs of 1024 rows (the default 16 orbits x 64 steps) and of 65536 rows;
opening the 'all' replay window with history 4 (the one read per replay stage); gathering 512
random rows with history 4 from it; the same 512 rows read straight from Zarr (the design not
taken); and the store's size. It also times one replay iteration proxy: an MLP 8-200-1000-1000-200-1
in float64 on 512 samples, forward + backward + Adam step. Figures are medians of repeats.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nbody_dt import config
from nbody_dt.model.trajectory import Rows
from nbody_dt.storage import Run

ORBITS = 16
HISTORY = 4
BATCH = 512


def median_time(fn, repeats: int) -> float:
    """Median wall time of `fn()` in seconds."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def orbit_rows(epoch: int, first_step: int, steps: int) -> Rows:
    """ORBITS circular-ish two-body orbits for `steps` steps, step-major, float64."""
    rng = np.random.default_rng(epoch)
    step = np.repeat(np.arange(first_step, first_step + steps), ORBITS)
    orbit = np.tile(np.arange(ORBITS), steps)
    phase = 0.01 * step * (1 + orbit / ORBITS)
    r = len(step)
    pos = np.stack([np.cos(phase), np.sin(phase)], -1)[:, None, :] * np.array([1.0, -1.0])[None, :, None]
    vel = np.stack([-np.sin(phase), np.cos(phase)], -1)[:, None, :] * np.array([1.0, -1.0])[None, :, None]

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a))

    return Rows(t(pos), t(vel), torch.ones(r, 2, dtype=torch.float64), t(rng.lognormal(-5, 0.3, r)),
                t(step * 0.01), t(-0.5 + rng.normal(0, 1e-6, r)), t(rng.uniform(2.5e-5, 2e-4, r)),
                t(orbit), t(step), torch.full((r,), epoch), torch.zeros(r, dtype=torch.bool))


def build(url: str, rows: int, chunk_rows: int, epoch_rows: int) -> Run:
    run = Run.create(url, config.load(overrides=[f"storage.chunk_rows={chunk_rows}",
                                                 f"initial_conditions.num_orbits={ORBITS}"]))
    steps = epoch_rows // ORBITS
    for e in range(rows // epoch_rows):
        run.trajectory.append(orbit_rows(e, e * steps, steps), e)
    return run


def append_rate(root: Path, chunk_rows: int, epoch_rows: int, epochs: int) -> float:
    """Rows/s of appending `epochs` epochs of `epoch_rows` rows to a fresh store."""
    steps = epoch_rows // ORBITS
    blocks = [orbit_rows(e, e * steps, steps) for e in range(epochs)]
    run = Run.create(root / f"append-{chunk_rows}-{epoch_rows}", config.load(
        overrides=[f"storage.chunk_rows={chunk_rows}", f"initial_conditions.num_orbits={ORBITS}"]))
    times = []
    for e, b in enumerate(blocks):
        t = time.perf_counter()
        run.trajectory.append(b, e)
        times.append(time.perf_counter() - t)
    run.close()
    return epoch_rows / statistics.median(times)


def direct_zarr_gather(store, rows: np.ndarray) -> None:
    """The design not taken: read the rows and their history straight from Zarr on every gather."""
    need = [rows]
    cur = rows
    for _ in range(HISTORY):  # follow the prev links one hop at a time
        cur = np.unique(cur[cur >= 0])
        cur = store.take(("prev",), cur)["prev"]
        need.append(cur[cur >= 0])
    store.take(("position", "velocity", "mass"), np.unique(np.concatenate(need)))


def mlp_iteration_time(repeats: int) -> float:
    torch.manual_seed(0)
    widths = [8, 200, 1000, 1000, 200, 1]
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [torch.nn.Linear(a, b, dtype=torch.float64), torch.nn.SiLU()]
    net = torch.nn.Sequential(*layers[:-1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(BATCH, 8, dtype=torch.float64)

    def step():
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()

    step()
    return median_time(step, repeats)


def measure(root: Path, chunk: int, rows: int, repeats: int) -> tuple:
    """All figures of one chunk size (see the module doc)."""
    rng = np.random.default_rng(0)
    small = append_rate(root, chunk, 1024, repeats)
    big = append_rate(root, chunk, 65536, 5)
    t = time.perf_counter()
    run = build(str(root / f"store-{chunk}"), rows, chunk, 65536)
    build_s = time.perf_counter() - t
    store = run.trajectory
    open_s = median_time(lambda: store.window("all", history_len=HISTORY), 3)
    window = store.window("all", history_len=HISTORY)
    gather_s = median_time(lambda: window.gather(torch.from_numpy(rng.integers(0, len(window), BATCH))), repeats)
    direct_s = median_time(lambda: direct_zarr_gather(store, rng.integers(0, store.num_rows, BATCH)), 3)
    size = du(root / f"store-{chunk}" / "trajectory.zarr")
    run.close()
    shutil.rmtree(root / f"store-{chunk}")
    return chunk, small, big, build_s, open_s, gather_s, direct_s, size


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunks", default="1024,4096,16384,65536")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)
    iteration = mlp_iteration_time(args.repeats)
    root = Path(tempfile.mkdtemp(prefix="nbody-dt-storage-bench-"))
    try:
        results = [measure(root, int(chunk), args.rows, args.repeats) for chunk in args.chunks.split(",")]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"rows={args.rows:,}  two-body float64  history={HISTORY}  batch={BATCH}  repeats={args.repeats}  "
          f"cpus={os.cpu_count()}  load average at the end: {load}")
    print(f"replay iteration proxy (MLP 8-200-1000-1000-200-1, fwd+bwd+Adam, 512 x float64): "
          f"{iteration * 1e3:.1f} ms")
    head = ("chunk_rows", "append 1024-row epochs", "append 65536-row epochs", "build",
            "open 'all' window", "gather 512+h4", "gather / iteration", "direct Zarr gather", "store size")
    print(" | ".join(head))
    for chunk, small, big, build_s, open_s, gather_s, direct_s, size in results:
        print(" | ".join([f"{chunk}", f"{small:,.0f} rows/s", f"{big:,.0f} rows/s", f"{build_s:.1f} s",
                          f"{open_s * 1e3:.0f} ms", f"{gather_s * 1e3:.2f} ms", f"{gather_s / iteration:.1%}",
                          f"{direct_s * 1e3:.0f} ms", f"{size / 2**20:.1f} MiB"]))


if __name__ == "__main__":
    main()
