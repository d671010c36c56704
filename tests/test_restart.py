"""SIGKILL a real `nbody-dt train` process at several points; `nbody-dt resume` must end with
weights bitwise identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from nbody_dt.flows.training import train
from nbody_dt.storage import Run, load_latest_checkpoint
from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

OVERRIDES = tiny_overrides(epochs=3)


def _cli(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()  # the session's test server: no ephemeral start-up
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "nbody_dt.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _weights(url: str) -> dict:
    with Run.open(url, write=False) as run:
        epoch, stage, payload = load_latest_checkpoint(run)
    assert (epoch, stage) == (2, "replay")
    return payload["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    url = str(tmp_path_factory.mktemp("reference") / "run")
    train(run_url=url, overrides=OVERRIDES, mode="create")
    return _weights(url)


@pytest.mark.parametrize("point", ["collect", "persist-replay", "replay", "checkpoint-write"])
def test_sigkill_then_resume_gives_identical_weights(tmp_path, reference, point):
    url = str(tmp_path / "run")
    sets = [arg for o in OVERRIDES for arg in ("--set", o)]
    killed = _cli(["train", "--run-dir", url, *sets, "--json"], {"NBODY_DT_KILL_AT": f"{point}:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    refused = _cli(["resume", url, "--json"])
    assert refused.returncode == 2 and "locked" in refused.stderr, refused.stderr[-2000:]
    resumed = _cli(["resume", url, "--json", "--break-lock"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["epochs_completed"] == 3
    weights = _weights(url)
    for name, value in reference.items():
        assert torch.equal(weights[name], value), f"{name} differs after a kill at {point}"
