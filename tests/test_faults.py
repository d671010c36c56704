"""Fault injection: every kind of stored object x every fault, locally and on S3 (moto).

A run trained for 2 epochs is damaged in one object (deleted, truncated, garbage, or replaced by
its stale copy from epoch 0), then resumed to 3 epochs and reported. Each case must either
continue to a result bitwise equal to the uninterrupted run (weights, trajectory rows, metrics
other than timings), or refuse with one line naming the damaged object and leave every stored
byte as it was. The expected outcome of each case is pinned below; the table it prints (-s) is
the one in benchmarks/README.md ("Reliability").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import fsspec
import fsspec.config
import pytest
import torch
from storage_fixtures import s3_options  # noqa: F401  (a fixture)

from nbody_dt.flows.training import train
from nbody_dt.report import report_dict
from nbody_dt.storage import Run, RunError, load_latest_checkpoint, read_metrics
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

OVERRIDES = tiny_overrides(epochs=1, **{"storage.chunk_rows": 8})
POSITION_CHUNK = "trajectory.zarr/position/c/1/0/0"

# object -> path in the run (a '{marker}' object is the commit attribute inside the group metadata)
OBJECTS = {
    "run.json": "run.json",
    "lock": "lock.json",
    "group metadata": "trajectory.zarr/zarr.json",
    "commit marker": "{marker}",
    "array metadata": "trajectory.zarr/position/zarr.json",
    "chunk (position)": POSITION_CHUNK,
    "chunk (orbit)": "trajectory.zarr/orbit/c/1",
    "newest checkpoint": "checkpoints/e0000001-2-replay.pt",
    "newest checkpoint sidecar": "checkpoints/e0000001-2-replay.pt.json",
    "older checkpoint": "checkpoints/e0000000-2-replay.pt",
    "metrics record": "metrics/e0000001-2-replay.json",
    "ledger mark (persist)": "ledger/e0000001-1-persist",
    "ledger mark (epoch 0)": "ledger/e0000000-0-collect",
}
FAULTS = ("deleted", "truncated", "garbage", "stale")

REFUSE, CONTINUE = "refuse", "continue"
# (object, fault) -> expected outcome; a refusal names the object by this fragment.
EXPECTED = {
    ("run.json", "deleted"): (REFUSE, "run.json"),
    ("run.json", "truncated"): (REFUSE, "run.json"),
    ("run.json", "garbage"): (REFUSE, "run.json"),
    ("run.json", "stale"): (CONTINUE, None),  # epochs=1 instead of 2: resume-safe, overridden by epochs=3
    ("lock", "deleted"): (CONTINUE, None),  # no writer holds it: nothing to fence
    ("lock", "truncated"): (REFUSE, "locked"),
    ("lock", "garbage"): (REFUSE, "locked"),
    ("lock", "stale"): (REFUSE, "locked"),  # a dead writer's lock needs --break-lock
    **{(obj, fault): (REFUSE, "trajectory.zarr/zarr.json") for obj in ("group metadata", "commit marker")
       for fault in FAULTS},
    **{("array metadata", fault): (REFUSE, "trajectory.zarr/position") for fault in FAULTS},
    **{("chunk (position)", fault): (REFUSE, "trajectory.zarr/position/c/") for fault in FAULTS},
    **{("chunk (orbit)", fault): (REFUSE, "trajectory.zarr/orbit/c/") for fault in FAULTS},
    **{("newest checkpoint", fault): (REFUSE, "e0000001-2-replay.pt") for fault in FAULTS},
    **{("newest checkpoint sidecar", fault): (REFUSE, "e0000001-2-replay.pt") for fault in FAULTS},
    **{("older checkpoint", fault): (CONTINUE, None) for fault in FAULTS},  # never read again
    **{("metrics record", fault): (REFUSE, "metrics/e0000001-2-replay.json") for fault in FAULTS},
    ("ledger mark (persist)", "deleted"): (REFUSE, "ledger/e0000001-1-persist"),
    ("ledger mark (persist)", "truncated"): (REFUSE, "ledger/e0000001-1-persist"),
    ("ledger mark (persist)", "garbage"): (REFUSE, "ledger/e0000001-1-persist"),
    ("ledger mark (persist)", "stale"): (REFUSE, "ledger/e0000001-1-persist"),
    ("ledger mark (epoch 0)", "deleted"): (REFUSE, "ledger/e0000000-0-collect"),
    ("ledger mark (epoch 0)", "truncated"): (REFUSE, "ledger/e0000000-0-collect"),
    ("ledger mark (epoch 0)", "garbage"): (REFUSE, "ledger/e0000000-0-collect"),
}
TIMINGS = ("wall_s", "per_s")
# Damage confined to epoch 1: the way out, --from-epoch 1, must then reach the uninterrupted result.
ROLLED_BACK = {("commit marker", "garbage"), ("chunk (position)", "stale"), ("newest checkpoint", "garbage"),
               ("metrics record", "deleted"), ("ledger mark (persist)", "stale")}


class Store:
    """The run's objects through fsspec (local folder or s3:// prefix)."""

    def __init__(self, url: str, options: dict | None):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url, **(options or {}))

    def files(self) -> dict[str, bytes]:
        self.fs.invalidate_cache()
        paths = self.fs.find(self.root)
        return {p[len(self.root) + 1:]: data for p, data in self.fs.cat(paths).items()} if paths else {}

    def write(self, files: dict[str, bytes]) -> None:
        if self.fs.protocol == "file" or "file" in self.fs.protocol:
            for rel, data in files.items():
                self.put(rel, data)
        else:  # object stores: one concurrent batch of PUTs
            self.fs.pipe({f"{self.root}/{rel}": data for rel, data in files.items()})

    def put(self, rel: str, data: bytes) -> None:
        path = f"{self.root}/{rel}"
        self.fs.makedirs(self.fs._parent(path), exist_ok=True)
        self.fs.pipe_file(path, data)

    def delete(self, rel: str) -> None:
        self.fs.rm_file(f"{self.root}/{rel}")


def _dead_lock() -> bytes:
    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                             text=True, check=True).stdout)
    import socket

    return json.dumps({"host": socket.gethostname(), "pid": pid, "time": "2026-01-01T00:00:00+00:00",
                       "token": uuid.uuid4().hex}).encode()


def _inject(files: dict[str, bytes], earlier: dict[str, bytes], obj: str,
            fault: str) -> dict[str, bytes | None] | None:
    """The changed objects of one fault ({rel: new bytes, or None to delete}); None where the
    object has no distinct earlier copy (epoch 0's first ledger mark)."""
    rel = OBJECTS[obj]
    if obj == "commit marker":
        rel = "trajectory.zarr/zarr.json"
        meta = json.loads(files[rel])
        attrs = meta["attributes"]
        marker = attrs["nbody_dt_commit"]
        if fault == "deleted":
            del attrs["nbody_dt_commit"]
        elif fault == "truncated":  # the last epoch dropped from the marker
            marker["epochs"] = marker["epochs"][:-1]
            marker["rows"] = marker["epochs"][-1][2]
        elif fault == "garbage":  # a count edited down by 4 rows
            marker["rows"] -= 4
            marker["epochs"][-1][2] -= 4
        else:
            attrs["nbody_dt_commit"] = json.loads(earlier[rel])["attributes"]["nbody_dt_commit"]
        return {rel: json.dumps(meta).encode()}
    if obj == "lock":
        return {rel: None if fault == "deleted" else b'{"host": "h' if fault == "truncated"
                else os.urandom(64) if fault == "garbage" else _dead_lock()}
    data = files[rel]
    if fault == "deleted":
        return {rel: None}
    if fault == "truncated":
        return {rel: data[:len(data) // 2]}
    if fault == "garbage":
        return {rel: os.urandom(len(data))}
    older = (rel, rel.replace("e0000001", "e0000000"), rel.replace("2-replay", "0-collect"))
    stale = next((earlier[p] for p in older if p in earlier and earlier[p] != data), None)
    return None if stale is None else {rel: stale}


def _result(url: str) -> dict:
    with Run.open(url, write=False) as run:
        weights = load_latest_checkpoint(run).payload["model"]
        rows = run.trajectory.rows().as_dict()
        metrics = [{k: v for k, v in r.items() if not k.endswith(TIMINGS)} for r in read_metrics(run)]
    return {"weights": weights, "rows": rows, "metrics": metrics}


def _assert_equal(got: dict, want: dict, case) -> None:
    for name, value in want["weights"].items():
        assert torch.equal(got["weights"][name], value), f"{case}: weights {name} differ"
    for name, value in want["rows"].items():
        assert torch.equal(got["rows"][name], value), f"{case}: trajectory column {name} differs"
    assert got["metrics"] == want["metrics"], f"{case}: metrics differ"


def _report_rows(url: str) -> list[dict]:
    with Run.open(url, write=False) as run:
        return [{k: v for k, v in r.items() if not k.endswith(TIMINGS)} for r in report_dict(run)["epochs"]]


def _matrix(base: str, options: dict | None) -> list[tuple]:
    """Run every case; returns (object, fault, outcome, message) rows, asserting each."""
    earlier_url, partial_url, reference_url = (f"{base}/{name}" for name in ("earlier", "partial", "reference"))
    train(run_url=earlier_url, overrides=OVERRIDES, mode="create")
    earlier = Store(earlier_url, options).files()
    partial = Store(partial_url, options)
    partial.write(earlier)
    train(run_url=partial_url, overrides=["epochs=2"], mode="resume")
    files = partial.files()
    reference = Store(reference_url, options)
    reference.write(files)
    train(run_url=reference_url, overrides=["epochs=3"], mode="resume")
    want = _result(reference_url)
    want_report = _report_rows(partial_url)

    rows = []
    cases = [(obj, fault) for obj in OBJECTS for fault in FAULTS if not (obj == "lock" and fault == "deleted")]
    for obj, fault in [("(none)", "(none)"), *cases]:
        case = f"{obj} / {fault}"
        url = f"{base}/case-{uuid.uuid4().hex[:8]}"
        store = Store(url, options)
        store.write(files)
        changes = {} if obj == "(none)" else _inject(files, earlier, obj, fault)
        if changes is None:
            assert (obj, fault) not in EXPECTED, case
            rows.append((obj, fault, "n/a", "no earlier copy of this object exists"))
            continue
        for rel, data in changes.items():
            store.delete(rel) if data is None else store.put(rel, data)
        before = store.files()
        expected, fragment = (CONTINUE, None) if obj == "(none)" else EXPECTED[(obj, fault)]
        try:
            report = _report_rows(url)
        except RunError as exc:
            report = exc
        try:
            train(run_url=url, overrides=["epochs=3"], mode="resume")
        except RunError as exc:
            message = str(exc)
            assert expected == REFUSE, f"{case}: refused, expected to continue: {message}"
            assert "\n" not in message and fragment in message, f"{case}: {message}"
            assert store.files() == before, f"{case}: a refused resume changed stored objects"
            assert isinstance(report, RunError) or report == want_report, f"{case}: report shows damaged data"
            if (obj, fault) in ROLLED_BACK:
                assert "(K one of 0, 1, 2)" in message, message
                train(run_url=url, overrides=["epochs=3"], mode="resume", from_epoch=1)
                _assert_equal(_result(url), want, f"{case} after --from-epoch 1")
                message += "; --from-epoch 1 then gives the uninterrupted result bitwise"
            rows.append((obj, fault, REFUSE, message))
            continue
        assert expected == CONTINUE, f"{case}: continued, expected a refusal naming {fragment}"
        _assert_equal(_result(url), want, case)
        assert isinstance(report, RunError) or report == want_report, f"{case}: report shows damaged data"
        rows.append((obj, fault, CONTINUE, "bitwise equal to the uninterrupted run"))
    return rows


def _print_table(rows: list[tuple], where: str) -> None:
    print(f"\nfault matrix ({where}): {sum(r[2] != 'n/a' for r in rows) - 1} cases, "
          f"{sum(r[2] == REFUSE for r in rows)} refused, {sum(r[2] == CONTINUE for r in rows) - 1} continued")
    for obj, fault, outcome, message in rows:
        text = message.split("; to discard")[0].split("; the explicit way out")[0]
        tail = "; --from-epoch 1 then gives the uninterrupted result bitwise" if "then gives" in message else ""
        print(f"| {obj} | {fault} | {outcome} | {text[-100:]}{tail} |")


def test_fault_matrix_local(tmp_path):
    _print_table(_matrix(str(tmp_path), None), "local")


def test_fault_matrix_s3(s3_options, monkeypatch):  # noqa: F811
    conf = {"s3": {"endpoint_url": s3_options["endpoint_url"], "key": "test", "secret": "test",
                   "client_kwargs": s3_options["client_kwargs"]}}
    monkeypatch.setattr(fsspec.config, "conf", conf)  # what FSSPEC_S3_* variables give the CLI
    _print_table(_matrix(f"s3://runs/{uuid.uuid4().hex}", s3_options), "s3 (moto)")
