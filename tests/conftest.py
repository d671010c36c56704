"""Shared test setup: Prefect isolated in a temporary home, one session-scoped test server."""

from __future__ import annotations

import os
import tempfile

import pytest

from nbody_dt.config import BEFORE_GENERAL_DEFAULT, on_top_of

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


KEPLER_MLP = BEFORE_GENERAL_DEFAULT
"""The keys in which the embedded default before the general model (the fixed-N MLP on Kepler orbits)
differs from today's: what the library tests of training, storage and orchestration build on (small and
fast), pinned."""

LEGACY = [f"{section}.{key}={value!r}" for section, keys in KEPLER_MLP.items() for key, value in keys.items()]
"""KEPLER_MLP as --set overrides, to put before a test's own."""


def with_legacy(data: dict) -> dict:
    """A config dict (sections) on top of KEPLER_MLP."""
    return on_top_of(KEPLER_MLP, data)


PINNED = LEGACY + [
    "optimizer.name=adam", "initial_conditions.a_range=[0.5, 2.0]", "physics.G=1.0", "model.output=log_freefall",
    "model.initial_dt=0.01", "model.activation=silu", "model.fourier_features=0", "model.normalization=initial",
    "collect.energy_threshold=2e-4", "collect.accept_lower=2.5e-5", "collect.max_retrain_steps=2000",
    "collect.substeps=1", "collect.accept_safe_after=0", "loss.kind=regression", "loss.lower=6e-5",
    "loss.upper=1.2e-4", "loss.on=all", "loss.exponent=3.0", "replay.min_size=2", "replay.window=all",
    "replay.verify=minibatch"]
"""Training settings the library tests' assertions depend on, pinned rather than taken from the
(evolving) defaults."""


def tiny_overrides(**extra) -> list[str]:
    """A training config small enough for a test: 2 Kepler orbits, a [8] MLP, short epochs (on KEPLER_MLP)."""
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
    return LEGACY + [f"{k}={v}" for k, v in base.items()]
