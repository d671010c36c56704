"""Deployment integration test against a real Prefect server on 127.0.0.1.

The module starts `prefect server start` on a free port (its own PREFECT_HOME in a temp dir),
registers the deployment of prefect.yaml with `prefect deploy`, and runs it with a `process`
work-pool worker whose flow runs find the code through the pull step of prefect.yaml
(NBODY_DT_WORKDIR = the repository root, as /app is in the Docker image). It checks:

- a triggered deployment run completes and leaves checkpoints, metrics and the ledger in its
  run directory, and the cron schedule of prefect.yaml produced scheduled runs;
- a deployment run SIGKILLed part-way (NBODY_DT_KILL_AT, through the run's `env` job variable)
  ends Crashed, and `prefect flow-run retry` resumes it from storage: epoch 0 and the completed
  stages of epoch 1 are not redone, and the weights equal those of the uninterrupted run;
- `nbody-dt deploy --interval` (flow.serve) registers an interval-scheduled deployment whose
  runs it executes itself.

Every child process gets PREFECT_API_URL of that server; everything is stopped at the end
(the worker with SIGINT twice before the server, then the server terminated, then killed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
import yaml

from nbody_dt.storage import (
    Run,
    completed,
    list_checkpoints,
    load_latest_checkpoint,
    read_metrics,
)
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
POOL = "nbody-dt"
DEPLOYMENT = "nbody-dt-train/nbody-dt-train"  # <flow name>/<deployment name>, from prefect.yaml
SERVED = "nbody-dt-train/nbody-dt-serve"  # what `nbody-dt deploy` serves
OVERRIDES = tiny_overrides()  # 2 epochs
KILL_AT = "replay:1"  # SIGKILL in epoch 1 after replay trained, before its checkpoint is written
STARTUP_S = 120
RUN_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Live child processes of `pid` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class Service:
    """A long-running child process in its own session, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict, cwd: Path, log: Path):
        self.name, self.log = name, log
        self._out = open(log, "wb")  # noqa: SIM115 - open for the process's lifetime, closed in stop()
        # SIGINT at its default disposition, as under a terminal: a pytest started in the background
        # of a non-interactive shell ignores SIGINT, its children would inherit that, and the
        # Ctrl-C these tests send would do nothing.
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_default_sigint)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, first=signal.SIGINT, second=signal.SIGINT, grace: float = 15.0) -> None:
        """Two signals to the process group (Prefect workers ignore the first), then SIGKILL."""
        try:
            for sig in (first, second):
                if not self.alive():
                    break
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            if self.alive():
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=grace)
        finally:
            self._out.close()

    def tail(self) -> str:
        return f"--- {self.name} log ({self.log}) ---\n{_tail(self.log)}"


class Prefect:
    """The test's Prefect server: its API URL, the environment of every child process, CLI and client."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "NBODY_DT_"))}
        self.env.update({
            "PREFECT_HOME": str(root / "home"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_WORKER_QUERY_SECONDS": "2",  # workers and flow.serve poll often: quicker pick-up
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            "COLUMNS": "200",
        })
        self.services: list[Service] = []
        self.server: Service | None = None

    def spawn(self, name: str, argv: list[str], cwd: Path | None = None, env_extra: dict | None = None) -> Service:
        svc = Service(name, argv, {**self.env, **(env_extra or {})}, cwd or self.root, self.root / f"{name}.log")
        self.services.append(svc)
        return svc

    def start_server(self) -> None:
        self.server = self.spawn("server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                            "--port", str(self.port)])
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert self.server.alive(), f"prefect server exited\n{self.server.tail()}"
            try:
                with urllib.request.urlopen(f"{self.api}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"prefect server not healthy after {STARTUP_S} s\n{self.server.tail()}")

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop(first=signal.SIGTERM, second=signal.SIGTERM)

    def logs(self) -> str:
        return "\n".join(s.tail() for s in self.services if s is not self.server)

    def cli(self, *args: str, cwd: Path | None = None, timeout: float = 180) -> str:
        """`prefect ARGS` against the server; its output (fails the test on a non-zero exit)."""
        done = subprocess.run([sys.executable, "-m", "prefect", *args], env=self.env, cwd=cwd or self.root,
                              capture_output=True, text=True, timeout=timeout, check=False)
        assert done.returncode == 0, f"prefect {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api)

    def run_deployment(self, params: dict | None = None, job_variables: dict | None = None,
                       name: str = DEPLOYMENT) -> str:
        """`prefect deployment run`; the flow run id."""
        args = ["deployment", "run", name]
        if params is not None:
            args += ["--params", json.dumps(params)]
        for key, value in (job_variables or {}).items():
            args += ["--job-variable", f"{key}={json.dumps(value)}"]
        out = self.cli(*args)
        match = re.search(r"UUID: ([0-9a-f-]{36})", out)
        assert match, out
        return match.group(1)

    def wait(self, flow_run_id: str, *types: str, timeout: float = RUN_S):
        """The flow run once its state type is one of `types`; fails on another final state or a timeout."""
        final = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
        deadline = time.monotonic() + timeout
        state = None
        with self.client() as client:
            while time.monotonic() < deadline:
                flow_run = client.read_flow_run(flow_run_id)
                state = flow_run.state
                if state is not None and state.type.value in types:
                    return flow_run
                if state is not None and state.type.value in final:
                    break
                time.sleep(1)
        pytest.fail(f"flow run {flow_run_id} is {state and state.type.value} ({state and state.message}), "
                    f"expected {'/'.join(types)}\n{self.logs()}")


@pytest.fixture(scope="module")
def prefect(tmp_path_factory):
    """A real Prefect server on a free loopback port, for the whole module."""
    p = Prefect(tmp_path_factory.mktemp("prefect"))
    try:
        p.start_server()
        yield p
    finally:
        for svc in reversed(p.services):  # workers and served flows before the server
            if svc is not p.server and svc.alive():
                svc.stop()
        p.stop_server()


@pytest.fixture(scope="module")
def deployment(prefect):
    """The deployment of prefect.yaml registered from the repository root, as the README says.

    Returns the registered deployment and the scheduled runs its cron schedule produced. The
    schedule is then deactivated and those runs deleted, so that a test running at 03:00 UTC
    does not also run the nightly default training (in the repository's runs/).
    """
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    [entry] = [d for d in spec["deployments"] if d["name"] == DEPLOYMENT.split("/")[1]]
    assert entry["work_pool"]["name"] == POOL
    registered_at = datetime.now(UTC)
    prefect.cli("work-pool", "create", POOL, "--type", "process")
    prefect.cli("--no-prompt", "deploy", "--all", cwd=REPO)

    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    with prefect.client() as client:
        dep = client.read_deployment_by_name(DEPLOYMENT)
        scheduled = []
        deadline = time.monotonic() + 60
        while not scheduled and time.monotonic() < deadline:
            scheduled = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.SCHEDULED]))))
            if not scheduled:
                time.sleep(1)
        for sched in dep.schedules:  # deactivating a schedule also deletes its scheduled runs
            client.update_deployment_schedule(dep.id, sched.id, active=False)
        for flow_run in scheduled:
            with contextlib.suppress(ObjectNotFound):
                client.delete_flow_run(flow_run.id)
    return {"yaml": spec, "spec": entry, "deployment": dep, "scheduled": scheduled, "registered_at": registered_at}


@pytest.fixture(scope="module")
def worker(prefect, deployment, tmp_path_factory):
    """`prefect worker start` on the pool, started outside the repository: the deployment's pull
    step (NBODY_DT_WORKDIR) is what makes its flow runs find nbody_dt/flows/training.py."""
    svc = prefect.spawn("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
                                   "--type", "process", "--prefetch-seconds", "5"],
                        cwd=tmp_path_factory.mktemp("worker-cwd"), env_extra={"NBODY_DT_WORKDIR": str(REPO)})
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def triggered(prefect, deployment, worker, tmp_path_factory):
    """Two deployment runs triggered at once (the deployment's concurrency limit queues the second
    until the first ends): a clean one, and one that SIGKILLs itself in epoch 1. Both have the tiny
    config and a run directory in tmp; otherwise they run with the deployment's parameters."""
    root = tmp_path_factory.mktemp("runs")
    clean_url, crash_url = str(root / "clean"), str(root / "crash")
    # config_path None: the embedded default plus the overrides (not prefect.yaml's config file).
    params = {"config_path": None, "overrides": OVERRIDES}
    clean = prefect.run_deployment({**params, "run_url": clean_url})
    # A SIGKILLed run leaves its writer lock behind, which the retry must take over: with the
    # deployment's own break_lock where prefect.yaml sets one, else with break_lock=True.
    if "break_lock" not in deployment["spec"]["parameters"]:
        params["break_lock"] = True
    crash = prefect.run_deployment({**params, "run_url": crash_url},
                                   job_variables={"env": {"NBODY_DT_KILL_AT": KILL_AT}})
    return {"clean": (clean, clean_url), "crash": (crash, crash_url)}


def _run_log(prefect: Prefect, flow_run_id: str) -> list[str]:
    """The log lines of a flow run as the Prefect UI shows them (read back from the server)."""
    from uuid import UUID

    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs, page = [], 200  # the API returns one page at a time
    with prefect.client() as client:
        while True:
            batch = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_id)])),
                                     limit=page, offset=len(logs))
            logs += batch
            if len(batch) < page:
                break
    return [f"{log.level} {log.message}" for log in logs]


def _wait_for_logs(prefect: Prefect, flow_run_id: str, found, timeout: float = 60) -> list[str]:
    """The run's log lines once found(lines) holds or after `timeout` s: the worker ships its log
    records in batches, also after the run has ended."""
    deadline = time.monotonic() + timeout
    while True:
        lines = _run_log(prefect, flow_run_id)
        if found(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(2)


def _weights(url: str) -> dict:
    with Run.open(url, write=False) as run:
        epoch, stage, payload = load_latest_checkpoint(run)
    assert (epoch, stage) == (1, "replay")
    return payload["model"]


def _fingerprints(url: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every ledger mark and metrics record: unchanged if not rewritten."""
    out = {}
    for folder in ("ledger", "metrics"):
        for path in sorted((Path(url) / folder).iterdir()):
            st = path.stat()
            out[f"{folder}/{path.name}"] = (st.st_ino, st.st_mtime_ns)
    return out


def test_deployment_registered_with_schedule(deployment):
    dep, entry = deployment["deployment"], deployment["spec"]
    assert dep.work_pool_name == POOL
    assert dep.entrypoint == entry["entrypoint"]
    # Stored unresolved: the worker's environment (NBODY_DT_WORKDIR) picks the directory at run time.
    assert dep.pull_steps == entry.get("pull", deployment["yaml"]["pull"])
    assert dep.parameters["mode"] == "auto" and dep.parameters["run_url"] == entry["parameters"]["run_url"]
    [yaml_schedule] = entry["schedules"]
    [schedule] = dep.schedules
    assert schedule.schedule.cron == yaml_schedule["cron"] and schedule.active

    # The cron schedule produced scheduled runs, at the schedule's times.
    scheduled = deployment["scheduled"]
    assert scheduled, "the cron schedule created no scheduled runs"
    from prefect.server.schemas.schedules import CronSchedule

    cron = CronSchedule(cron=yaml_schedule["cron"], timezone=yaml_schedule.get("timezone", "UTC"))
    expected = asyncio.run(cron.get_dates(n=len(scheduled) + 5, start=deployment["registered_at"] - timedelta(days=1)))
    expected = {d.timestamp() for d in expected}
    times = sorted(r.expected_start_time for r in scheduled)
    assert all(t.timestamp() in expected for t in times), times
    assert times[0] > deployment["registered_at"] - timedelta(minutes=1)
    assert all(r.parameters == {} or r.parameters.get("run_url") == entry["parameters"]["run_url"] for r in scheduled)


def test_deployment_run_completes_and_fills_storage(prefect, triggered):
    flow_run_id, url = triggered["clean"]
    flow_run = prefect.wait(flow_run_id, "COMPLETED")
    assert flow_run.parameters["run_url"] == url
    # One line per finished stage reaches the run's logs on the server (the Prefect UI).
    wanted = [f"epoch {epoch}/2 {stage}: " for epoch in (1, 2) for stage in ("collect", "persist", "replay", "epoch")]
    lines = _wait_for_logs(prefect, flow_run_id, lambda lines: all(any(w in line for line in lines) for w in wanted))
    missing = [w for w in wanted if not any(w in line for line in lines)]
    assert not missing, (missing, lines[-20:])

    stages = {(e, s) for e in (0, 1) for s in ("collect", "persist", "replay", "epoch")}
    with Run.open(url, write=False) as run:
        assert list_checkpoints(run)[-1] == (1, "replay")
        assert set(completed(run)) == stages
        records = {(r["epoch"], r["stage"]): r for r in read_metrics(run)}
        assert set(records) == stages
        assert all(records[(e, "collect")]["collect_accepted"] > 0 for e in (0, 1))
        assert run.trajectory.num_rows > 0
    assert not (Path(url) / "lock.json").exists(), "the finished run left its writer lock"


def test_crashed_deployment_run_retry_resumes_from_storage(prefect, worker, triggered):
    clean_id, clean_url = triggered["clean"]
    flow_run_id, url = triggered["crash"]
    crashed = prefect.wait(flow_run_id, "CRASHED")
    assert crashed.run_count == 1
    clean = prefect.wait(clean_id, "COMPLETED")
    # prefect.yaml's concurrency limit (1, ENQUEUE): the second run waited for the first.
    first, second = sorted((clean, crashed), key=lambda r: r.start_time)
    assert second.start_time >= first.end_time, (first.start_time, first.end_time, second.start_time)
    # After the crash the worker still runs the flow's on_crashed hooks in a subprocess (which
    # imports the flow: many seconds) and then reports the crash once more: a retry issued before
    # that is overwritten by that late Crashed state. So wait until the worker is idle.
    deadline = time.monotonic() + RUN_S
    while _children(worker.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _children(worker.proc.pid), f"the worker is still busy\n{prefect.logs()}"
    time.sleep(2)

    # Killed in epoch 1's replay: epoch 0 and epoch 1's collect and persist are in storage.
    with Run.open(url, write=False) as run:
        done = set(completed(run))
        assert {(0, "epoch"), (1, "collect"), (1, "persist")} <= done and (1, "replay") not in done
        rows_before = run.trajectory.num_rows
    assert (Path(url) / "lock.json").exists()  # the dead process's lock
    before = _fingerprints(url)

    # The cause goes away (the run's kill switch is removed) and the run is retried. The pool is
    # paused meanwhile so the worker cannot take the retried run before its job variables change.
    from prefect.client.schemas.actions import WorkPoolUpdate

    with prefect.client() as client:
        client.update_work_pool(POOL, WorkPoolUpdate(is_paused=True))
        try:
            out = prefect.cli("flow-run", "retry", flow_run_id)
            assert "scheduled for retry" in out, out
            client.update_flow_run(flow_run_id, job_variables={})
            assert "NBODY_DT_KILL_AT" not in json.dumps(client.read_flow_run(flow_run_id).job_variables or {})
        finally:
            client.update_work_pool(POOL, WorkPoolUpdate(is_paused=False))
    retried = prefect.wait(flow_run_id, "COMPLETED")
    assert retried.run_count == 2
    # The nbody_dt logger's warning about the lock it took over is in the run's logs on the server.
    def broke_lock(lines: list[str]) -> bool:
        return any(line.startswith("30 breaking the lock of run") for line in lines)

    lines = _wait_for_logs(prefect, flow_run_id, broke_lock)
    assert broke_lock(lines), lines

    # Nothing that was in storage was redone: its ledger marks and metrics records are the same
    # files, no rows were appended twice, and only epoch 1's replay and epoch stages were added.
    after = _fingerprints(url)
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["ledger/e0000001-2-replay", "ledger/e0000001-3-epoch",
                                                "metrics/e0000001-2-replay.json", "metrics/e0000001-3-epoch.json"]
    with Run.open(url, write=False) as run:
        assert {(0, "epoch"), (1, "epoch")} <= set(completed(run))
        assert run.trajectory.num_rows == rows_before
    assert not (Path(url) / "lock.json").exists()

    # ... and it ends where the uninterrupted run ends.
    reference = _weights(clean_url)
    weights = _weights(url)
    for name, value in reference.items():
        assert torch.equal(weights[name], value), f"{name} differs from the uninterrupted run"


def test_nbody_dt_deploy_serves_on_an_interval(prefect, deployment, tmp_path):
    """`nbody-dt deploy --interval` registers the deployment with an interval schedule and runs
    its flow runs itself (here one triggered by hand: the first interval run is an hour away)."""
    from prefect.exceptions import ObjectNotFound

    url = str(tmp_path / "served")
    sets = [arg for o in OVERRIDES for arg in ("--set", o)]
    serve = prefect.spawn("serve", [sys.executable, "-m", "nbody_dt.cli", "deploy", "--interval", "3600",
                                    "--run-dir", url, *sets], cwd=tmp_path)
    try:
        dep = None
        deadline = time.monotonic() + STARTUP_S
        with prefect.client() as client:
            while time.monotonic() < deadline:
                assert serve.alive(), f"nbody-dt deploy exited {serve.proc.returncode}\n{serve.tail()}"
                try:
                    dep = client.read_deployment_by_name(SERVED)
                except ObjectNotFound:
                    time.sleep(1)
                    continue
                if dep.parameters.get("run_url") == url and dep.schedules:
                    break
                time.sleep(1)
            else:
                pytest.fail(f"nbody-dt deploy did not register its deployment\n{serve.tail()}")
            # Served by this process, beside (not over) prefect.yaml's work-pool deployment.
            assert client.read_deployment_by_name(DEPLOYMENT).work_pool_name == "nbody-dt"
        [schedule] = dep.schedules
        assert schedule.schedule.interval == timedelta(seconds=3600) and schedule.active
        assert dep.work_pool_name is None
        assert dep.parameters["overrides"] == OVERRIDES and dep.parameters["mode"] == "auto"

        flow_run_id = prefect.run_deployment(name=SERVED)  # the served defaults: run_url and overrides above
        prefect.wait(flow_run_id, "COMPLETED")
        with Run.open(url, write=False) as run:
            assert list_checkpoints(run)[-1] == (1, "replay")
            assert {(0, "epoch"), (1, "epoch")} <= set(completed(run))
    finally:
        serve.stop(grace=30)  # one SIGINT ends `nbody-dt deploy` (it pauses its deployment first)
    assert serve.proc.returncode == 0, serve.tail()
