"""The train flow through the real Prefect engine (a session-scoped test server)."""

from __future__ import annotations

import pytest
import torch

from nbody_dt import config as config_mod
from nbody_dt.flows.training import TrainingFailed, train
from nbody_dt.storage import Run, completed, load_latest_checkpoint, read_metrics
from nbody_dt.storage.errors import RunError
from nbody_dt.training.epoch import MemoryRun, train_epoch
from nbody_dt.training.setup import start_training
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.usefixtures("prefect_server")


def _final_weights(run_url: str) -> dict:
    with Run.open(run_url, write=False) as run:
        return load_latest_checkpoint(run).payload["model"]


def test_flow_equals_library_bitwise(tmp_path):
    overrides = tiny_overrides()
    summary = train(run_url=str(tmp_path / "run"), overrides=overrides, mode="create")
    assert summary["epochs_completed"] == 2
    assert summary["rows_stored"] == 2 * 2 * 6
    cfg = config_mod.load(None, overrides)
    training = start_training(cfg)
    memory = MemoryRun(cfg.initial_conditions.num_orbits, cfg.model.history_len)
    for epoch in range(cfg.epochs):
        train_epoch(training, memory, cfg, epoch)
    flow_weights = _final_weights(summary["run_url"])
    for name, value in training.model.state_dict().items():
        assert torch.equal(flow_weights[name], value), name


def test_every_stage_is_in_the_ledger_with_metrics(tmp_path):
    url = str(tmp_path / "run")
    train(run_url=url, overrides=tiny_overrides(epochs=1), mode="create")
    with Run.open(url, write=False) as run:
        assert completed(run) == [(0, "collect"), (0, "persist"), (0, "replay"), (0, "epoch")]
        stages = {r["stage"] for r in read_metrics(run)}
    assert stages == {"collect", "persist", "replay", "epoch"}


def test_train_on_existing_run_is_refused(tmp_path):
    url = str(tmp_path / "run")
    train(run_url=url, overrides=tiny_overrides(epochs=1), mode="create")
    with pytest.raises(RunError, match="resume"):
        train(run_url=url, overrides=tiny_overrides(epochs=1), mode="create")


def test_resume_with_changed_config_is_refused(tmp_path):
    url = str(tmp_path / "run")
    train(run_url=url, overrides=tiny_overrides(epochs=1), mode="create")
    with pytest.raises(RunError, match="replay.batch_size"):
        train(run_url=url, overrides=tiny_overrides(epochs=2, **{"replay.batch_size": 4}), mode="resume")


def test_resume_with_more_epochs_continues(tmp_path):
    url = str(tmp_path / "run")
    train(run_url=url, overrides=tiny_overrides(epochs=1), mode="create")
    summary = train(run_url=url, overrides=["epochs=2"], mode="resume")
    assert summary["epochs_completed"] == 2
    assert _final_weights(url).keys()


def test_flow_exception_names_run_and_resume_command(tmp_path):
    url = str(tmp_path / "run")
    # An impossible acceptance band with a retrain cap stalls collection inside the flow.
    overrides = tiny_overrides(**{"collect.accept_lower": 1.9e-4, "collect.max_retrain_steps": 2})
    with pytest.raises(TrainingFailed) as info:
        train(run_url=url, overrides=overrides, mode="create")
    message = str(info.value)
    assert url in message
    assert f"nbody-dt resume {url}" in message
    assert "epoch 0 stage collect" in message
    # The lock was released: the run can be opened for writing again.
    Run.open(url).close()


def test_flow_parameters_are_typed_and_validated(tmp_path):
    from prefect.exceptions import ParameterTypeError

    # The UI's form for a deployment run comes from this schema: the whole config model, the modes.
    schema = train.parameters.model_dump()
    props = schema["properties"]
    assert props["mode"]["enum"] == ["auto", "create", "resume"]
    config_def = schema["definitions"]["Config"]
    assert config_def["properties"]["epochs"]["description"].startswith("training epochs")
    for bad in ({"mode": "typo"}, {"break_lock": "maybe"}, {"config": {"replay": {"batch_size": 0}}}):
        with pytest.raises(ParameterTypeError):
            train.validate_parameters({"run_url": str(tmp_path / "run"), **bad})
    # Through the engine, a typo in the mode fails the flow run before anything is stored.
    with pytest.raises(ParameterTypeError):
        train(run_url=str(tmp_path / "run"), mode="typo")
    assert not (tmp_path / "run").exists()
    # A config object (or its dict, as a deployment passes it) is accepted as is.
    cfg = config_mod.load(None, tiny_overrides(epochs=1))
    summary = train(run_url=str(tmp_path / "run"), config=cfg.to_dict(), mode="create")
    with Run.open(summary["run_url"], write=False) as run:
        assert run.config == cfg
