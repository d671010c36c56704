"""The same training run on the local evaluator and on Dask LocalClusters of several sizes:
do the final weights agree bit for bit?

    PYTHONPATH=. python benchmarks/evaluator_equality.py --out /tmp/equality            # the default run
    PYTHONPATH=. python benchmarks/evaluator_equality.py --out /tmp/eq --workers 1,2,3 --set epochs=2

Runs `nbody-dt train` (the CLI, Prefect flow included) one after the other: once with
`compute.evaluator=local`, then with `compute.evaluator=dask` and `compute.dask_workers=W` for
each W, all with the same `--set` overrides, into OUT/local, OUT/dask1, ... A run with a
finished summary (OUT/NAME.json) is reused and an unfinished one is resumed (`nbody-dt resume`),
so an interrupted comparison continues where it stopped. Prints a Markdown table: wall time,
per-stage metric records equal to the local run's (wall-time fields left out), and whether
every tensor of the final checkpoint's model state_dict is `torch.equal` to the local run's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nbody_dt.storage import Run  # noqa: E402
from nbody_dt.storage.checkpoints import load_latest_checkpoint  # noqa: E402

TIMING = ("wall", "per_s", "_s", "time")


def train(out: Path, name: str, overrides: list[str]) -> dict:
    summary_path = out / f"{name}.json"
    if summary_path.exists() and summary_path.read_text().strip():
        return json.loads(summary_path.read_text().strip().splitlines()[-1])
    if (out / name).exists():  # interrupted: continue it with its stored config
        cmd = [sys.executable, "-m", "nbody_dt.cli", "resume", str(out / name), "--json"]
    else:
        cmd = [sys.executable, "-m", "nbody_dt.cli", "train", "--run-dir", str(out / name), "--json"]
        for o in overrides:
            cmd += ["--set", o]
    start = time.perf_counter()
    with open(out / f"{name}.err", "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: nbody-dt train failed (exit {proc.returncode}); see {out / name}.err")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    summary["process_wall_s"] = time.perf_counter() - start
    summary_path.write_text(json.dumps(summary) + "\n")
    return summary


def metric_records(run_dir: Path) -> dict[str, dict]:
    return {f.name: {k: v for k, v in json.loads(f.read_text()).items() if not any(t in k for t in TIMING)}
            for f in sorted((run_dir / "metrics").glob("*.json"))}


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    with Run.open(str(run_dir), write=False) as run:
        _, _, payload = load_latest_checkpoint(run)
    return payload["model"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the runs (created)")
    ap.add_argument("--workers", default="1,2,3", help="Dask LocalCluster sizes, comma separated")
    ap.add_argument("--set", action="append", default=[], help="config override for every run, e.g. epochs=2")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [("local", ["compute.evaluator=local"])]
    runs += [(f"dask{w}", ["compute.evaluator=dask", f"compute.dask_workers={w}"])
             for w in (int(x) for x in args.workers.split(","))]
    summaries = {name: train(out, name, [*args.set, *extra]) for name, extra in runs}
    ref_metrics, ref_model = metric_records(out / "local"), final_model(out / "local")
    print(f"# {os.uname().nodename}: {os.cpu_count()} cores, torch {torch.__version__}, overrides {args.set or 'none'}")
    print("| run | epochs | wall | metric records equal to local | final weights torch.equal to local |")
    print("|---|---:|---:|---:|---|")
    for name, _ in runs:
        records, model = metric_records(out / name), final_model(out / name)
        same = sum(records.get(k) == v for k, v in ref_metrics.items())
        equal = model.keys() == ref_model.keys() and all(torch.equal(model[k], ref_model[k]) for k in model)
        s = summaries[name]
        print(f"| {name} | {s['epochs_completed']} | {s.get('process_wall_s', s['wall_s']) / 60:.1f} min | "
              f"{same}/{len(ref_metrics)} | {'**yes**' if equal else 'NO'} |")


if __name__ == "__main__":
    main()
