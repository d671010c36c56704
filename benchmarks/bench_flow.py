"""Overhead of the Prefect flow over the same epochs run directly through the library.

    python benchmarks/bench_flow.py [--set key=value ...] [--repeats 3]

Both paths train the same config from the same seed (and end with bitwise-identical weights,
which the script checks). The flow's cost over the library is Prefect's task orchestration,
the save/restore of a checkpoint at every stage and the Zarr appends; the one-off start of
Prefect's ephemeral server is reported separately (it does not grow with the run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import torch  # noqa: E402

from nbody_dt import config  # noqa: E402
from nbody_dt.storage import Run, load_latest_checkpoint  # noqa: E402
from nbody_dt.training.epoch import MemoryRun, train_epoch  # noqa: E402
from nbody_dt.training.setup import start_training  # noqa: E402


def library(overrides: list[str]) -> tuple[float, dict]:
    cfg = config.load(None, overrides)
    start = time.perf_counter()
    training = start_training(cfg)
    memory = MemoryRun(cfg.initial_conditions.num_orbits, cfg.model.history_len)
    for epoch in range(cfg.epochs):
        train_epoch(training, memory, cfg, epoch)
    return time.perf_counter() - start, training.model.state_dict()


def flow(overrides: list[str], workdir: str) -> tuple[float, dict]:
    from nbody_dt.flows.training import train

    url = tempfile.mkdtemp(dir=workdir) + "/run"
    start = time.perf_counter()
    train(run_url=url, overrides=overrides, mode="create")
    wall = time.perf_counter() - start
    with Run.open(url, write=False) as run:
        return wall, load_latest_checkpoint(run).payload["model"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], help="config override (default: the embedded default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        with prefect_test_harness(server_startup_timeout=120):
            startup = time.perf_counter() - t0
            flow(args.set + ["epochs=1"], workdir)  # warm-up: imports, first API round trips
            lib_times, flow_times = [], []
            for _ in range(args.repeats):
                t_lib, w_lib = library(args.set)
                t_flow, w_flow = flow(args.set, workdir)
                lib_times.append(t_lib)
                flow_times.append(t_flow)
                same = all(torch.equal(w_lib[k], w_flow[k]) for k in w_lib)
    lib, fl = statistics.median(lib_times), statistics.median(flow_times)
    print(f"config overrides: {args.set or '(embedded default)'}")
    print(f"library  median {lib:8.2f} s   {['%.2f' % t for t in lib_times]}")
    print(f"flow     median {fl:8.2f} s   {['%.2f' % t for t in flow_times]}")
    print(f"overhead {100 * (fl / lib - 1):+.1f} %   (server start-up, once per process: {startup:.1f} s)")
    print(f"identical final weights: {same}")


if __name__ == "__main__":
    main()
