"""Many writers break one stale writer lock at the same moment: exactly one may win.

Each round leaves a lock of a dead process of this host in a fresh run, then releases
`--breakers` threads at once through a barrier, each opening the run with break_lock="stale"
(what the deployments do). The winner holds the lock (this process is alive), so every later
breaker must be refused. Locally (os.link exclusive creates) and on S3 (If-None-Match PUTs,
against moto on loopback with --s3).

    python benchmarks/lock_race.py --breakers 200 --rounds 20
    python benchmarks/lock_race.py --breakers 200 --rounds 10 --s3
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections import Counter

from fsspec.core import url_to_fs

from nbody_dt import config
from nbody_dt.storage import Run, RunError


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def one_round(url: str, breakers: int, options: dict | None) -> tuple[int, Counter]:
    """(winners, refusal reasons) of one round."""
    Run.create(url, config.load(), storage_options=options).close()
    fs, root = url_to_fs(url, **(options or {}))  # the lock a killed writer of this host leaves behind
    fs.pipe_file(f"{root}/lock.json", json.dumps({"host": socket.gethostname(), "pid": dead_pid(),
                                                  "time": "2026-01-01T00:00:00+00:00",
                                                  "token": uuid.uuid4().hex}).encode())
    barrier = threading.Barrier(breakers)
    winners: list[Run] = []
    reasons: Counter = Counter()

    def breaker() -> None:
        barrier.wait()
        try:
            winners.append(Run.open(url, break_lock="stale", storage_options=options))
        except RunError as exc:
            text = str(exc)
            reasons["live writer" if "still running" in text else "taken while breaking"
                    if "while it was being broken" in text else "lock file between writers"
                    if "unreadable lock file" in text else text[:80]] += 1

    threads = [threading.Thread(target=breaker) for _ in range(breakers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in winners:
        w.close()
    return len(winners), reasons


def main() -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--breakers", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--s3", action="store_true", help="on a moto S3 server on loopback")
    args = parser.parse_args()
    options, server, base = None, None, tempfile.mkdtemp(prefix="lock-race-")
    if args.s3:
        import boto3
        from moto.server import ThreadedMotoServer

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                     aws_secret_access_key="test").create_bucket(Bucket="runs")
        options = {"endpoint_url": endpoint, "key": "test", "secret": "test",
                   "client_kwargs": {"region_name": "us-east-1"}, "max_concurrency": 1}
        base = "s3://runs"
    wins: Counter = Counter()
    reasons: Counter = Counter()
    for i in range(args.rounds):
        won, why = one_round(f"{base}/round-{i}-{uuid.uuid4().hex[:6]}", args.breakers, options)
        wins[won] += 1
        reasons.update(why)
    if server is not None:
        server.stop()
    where = "s3 (moto)" if args.s3 else "local"
    print(f"{where}: {args.rounds} rounds x {args.breakers} breakers; rounds by number of winners: "
          f"{dict(sorted(wins.items()))}; refusals: {dict(reasons)}")
    sys.exit(0 if set(wins) == {1} else 1)


if __name__ == "__main__":
    main()
