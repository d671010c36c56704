"""Shared test setup: Prefect isolated in a temporary home, one session-scoped test server."""

from __future__ import annotations

import os
import tempfile

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="nbody-dt-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for every test that runs a flow through the engine."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_overrides(**extra) -> list[str]:
    """A training config small enough for a test: 2 orbits, a [8] network, short epochs."""
    base = {
        "epochs": 2,
        "initial_conditions.num_orbits": 2,
        "collect.steps_per_epoch": 6,
        "collect.accept_lower": 0.0,
        "replay.steps": 8,
        "replay.batch_size": 8,
        "model.hidden": "[8]",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
