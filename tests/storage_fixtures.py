"""Helpers and fixtures shared by the storage tests (import them into a test module to use them)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nbody_dt
from nbody_dt import config
from nbody_dt.model.trajectory import Rows
from tests.conftest import LEGACY

REPO = Path(nbody_dt.__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def small_config(*overrides: str) -> config.Config:
    """The default config with small chunks, so that appends straddle chunk boundaries."""
    return config.load(overrides=[*LEGACY, "storage.chunk_rows=5", "initial_conditions.num_orbits=4", *overrides])


def make_rows(epoch: int, orbits: list[int], steps: int, *, first_step: int = 0, warmup_steps: int = 0,
              bodies: int = 2, dim: int = 2, dtype: torch.dtype = torch.float64) -> Rows:
    """Step-major rows of `orbits` for `steps` steps; the first `warmup_steps` steps are warm-up.

    Values are random but reproducible from (epoch, first_step), so a re-run produces the same rows.
    """
    g = torch.Generator().manual_seed(1000 * epoch + first_step)
    step = torch.arange(first_step, first_step + steps).repeat_interleave(len(orbits))
    r = len(step)

    def f(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return Rows(
        position=f(r, bodies, dim), velocity=f(r, bodies, dim), mass=f(r, bodies).abs() + 0.1,
        dt=f(r).abs() * 1e-2, time=step.to(dtype) * 1e-2, energy=f(r) - 1.0, rel_dE=f(r).abs() * 1e-4,
        orbit=torch.tensor(orbits, dtype=torch.int64).repeat(steps), step=step,
        epoch=torch.full((r,), epoch, dtype=torch.int64), warmup=step < warmup_steps,
    )


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python that imports nbody_dt and these helpers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def run_child(code: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], env=child_env(**env))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_options():
    """storage_options of a loopback moto S3 server (session-wide) with a fresh bucket 'runs'."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket="runs")
    yield {"endpoint_url": endpoint, "key": "test", "secret": "test", "client_kwargs": {"region_name": "us-east-1"}}
    server.stop()
