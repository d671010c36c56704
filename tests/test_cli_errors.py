"""Every error path of the CLI ends with one line on stderr and exit code 2; --verbose adds the trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import tiny_overrides

SETS = [arg for o in tiny_overrides(epochs=1) for arg in ("--set", o)]


def _cli(*args: str, server: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if server:
        from prefect.settings import PREFECT_API_URL

        env["PREFECT_API_URL"] = PREFECT_API_URL.value()  # the session's test server
    return subprocess.run([sys.executable, "-m", "nbody_dt.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("overrides, fragment", [
    (["seed=18446744073709551616"], "seed"),
    (["initial_conditions.seed=18446744073709551616"], "initial_conditions.seed"),
    (["device=cuda:abc"], "device"),
])
def test_impossible_config_values(overrides, fragment):
    _one_line_error(_cli("config", *[a for o in overrides for a in ("--set", o)]), fragment)


def test_config_file_that_is_a_directory_or_not_text(tmp_path):
    _one_line_error(_cli("train", "--config", str(tmp_path), "--run-dir", str(tmp_path / "run")), "is a directory")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    _one_line_error(_cli("train", "--config", str(binary), "--run-dir", str(tmp_path / "run")), "not UTF-8")
    assert not (tmp_path / "run").exists()


def test_garbage_checkpoint_file(tmp_path):
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(os.urandom(2000))
    line = _one_line_error(_cli("simulate", "--policy", "learned", "--checkpoint", str(garbage)), "model.pt")
    assert "weights_only=False" not in line


def test_checkpoint_of_a_newer_config(tmp_path):
    import torch

    newer = tmp_path / "newer.pt"
    torch.save({"config": {"model": {"wings": 2}}, "model": {}}, newer)
    _one_line_error(_cli("simulate", "--policy", "learned", "--checkpoint", str(newer)), "newer.pt",
                    "not one this nbody-dt reads", "model.wings: unknown key")


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_flow_errors_are_one_line_and_verbose_adds_the_trace(tmp_path):
    url = str(tmp_path / "run")
    assert _cli("train", "--run-dir", url, *SETS, "--json", server=True).returncode == 0
    _one_line_error(_cli("train", "--run-dir", url, *SETS, server=True), "already exists", "resume")
    _one_line_error(_cli("resume", url, "--set", "replay.batch_size=4", server=True), "replay.batch_size")
    verbose = _cli("--verbose", "resume", url, "--set", "replay.batch_size=4", server=True)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith("error: ")

    # A damaged run: one line naming the object and the way out; nothing changed.
    marker = tmp_path / "run" / "trajectory.zarr" / "zarr.json"
    meta = json.loads(marker.read_text())
    meta["attributes"]["nbody_dt_commit"]["rows"] -= 1
    marker.write_text(json.dumps(meta))
    for args in (["resume", url, "--set", "epochs=2"], ["report", url]):
        _one_line_error(_cli(*args, server=True), "trajectory.zarr/zarr.json", "--from-epoch")
    assert json.loads(marker.read_text()) == meta

    # The explicit way out: --from-epoch 0 starts the run over under its stored config.
    resumed = _cli("resume", url, "--from-epoch", "0", "--set", "epochs=2", "--json", server=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["epochs_completed"] == 2
    _one_line_error(_cli("resume", url, "--from-epoch", "7", server=True), "--from-epoch 7", "0, 1, 2")


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_unreachable_dask_scheduler(tmp_path):
    result = _cli("train", "--run-dir", str(tmp_path / "run"), *SETS, "--set", "compute.evaluator=dask",
                  "--set", "compute.dask_address=tcp://127.0.0.1:9", server=True)
    _one_line_error(result, "127.0.0.1:9")
    assert not (tmp_path / "run").exists()
