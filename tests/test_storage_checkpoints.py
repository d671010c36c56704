"""Checkpoints: weights_only round trip, commit sidecars, corruption fallback, ordering and pruning."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from storage_fixtures import small_config

from nbody_dt.storage import Run, RunError, list_checkpoints, load_latest_checkpoint, save_checkpoint


def training_payload(seed: int) -> dict:
    """What the training flow stores: model, optimizer, RNG states, live collection state, scalars."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8, dtype=torch.float64), torch.nn.SiLU(),
                              torch.nn.Linear(8, 1, dtype=torch.float64))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    opt.step()
    return {"model": net.state_dict(), "optimizer": opt.state_dict(), "rng": {"torch": torch.get_rng_state(),
            "sampler": torch.Generator().manual_seed(seed).get_state()},
            "collect": {"position": torch.randn(3, 2, 2, dtype=torch.float64), "steps": [1, 2, 3]},
            "epoch": 2, "stage": "replay", "loss": 0.25, "normalization": {"length": 1.5, "kind": "initial"}}


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


@pytest.fixture
def run(tmp_path):
    with Run.create(tmp_path / "run", small_config("storage.keep_checkpoints=3")) as r:
        yield r


def ckpt_dir(run):
    return run.url + "/checkpoints"


def test_round_trip_loads_with_weights_only(run):
    payload = training_payload(0)
    name = save_checkpoint(run, 2, "replay", payload)
    epoch, stage, loaded = load_latest_checkpoint(run)
    assert (epoch, stage) == (2, "replay")
    assert_same(loaded, payload)
    assert_same(torch.load(f"{ckpt_dir(run)}/{name}", weights_only=True), payload)
    sidecar = json.loads(Path(f"{ckpt_dir(run)}/{name}.json").read_text())
    assert sidecar["epoch"] == 2 and sidecar["stage"] == "replay" and len(sidecar["sha256"]) == 64


def test_payload_that_weights_only_cannot_load_is_refused(run):
    with pytest.raises(ValueError, match="weights_only"):
        save_checkpoint(run, 0, "collect", {"array": np.zeros(3, dtype=np.float32)})
    assert list_checkpoints(run) == []


def test_names_sort_by_epoch_then_stage_order(run):
    for epoch, stage in [(9, "epoch"), (10, "collect"), (10, "persist"), (10, "replay"), (10, "epoch")]:
        save_checkpoint(run, epoch, stage, {"at": f"{epoch}-{stage}"})
    assert list_checkpoints(run) == [(10, "persist"), (10, "replay"), (10, "epoch")]
    assert load_latest_checkpoint(run)[:2] == (10, "epoch")


def test_keep_last_k_prunes_data_and_sidecars(run):
    for epoch in range(6):
        save_checkpoint(run, epoch, "epoch", {"epoch": epoch})
    assert list_checkpoints(run) == [(3, "epoch"), (4, "epoch"), (5, "epoch")]
    files = sorted(p.split("/")[-1] for p in run._fs.ls(ckpt_dir(run), detail=False))
    assert files == [f"e000000{e}-3-epoch.pt{s}" for e in (3, 4, 5) for s in ("", ".json")]


def test_corrupted_newest_is_refused_not_skipped(run):
    """A committed checkpoint whose data changed is damage: refused naming it, never a silent
    fall-back to an older one (which would quietly redo or lose work)."""
    save_checkpoint(run, 1, "epoch", training_payload(1))
    newest = save_checkpoint(run, 2, "collect", training_payload(2))
    path = Path(f"{ckpt_dir(run)}/{newest}")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RunError, match=f"damaged checkpoint .*{newest}: sha256 checksum mismatch$"):
        load_latest_checkpoint(run)
    path.write_bytes(b"")
    with pytest.raises(RunError, match=f"damaged checkpoint .*{newest}"):
        load_latest_checkpoint(run)


def test_checkpoint_without_commit_marker_does_not_count(run):
    save_checkpoint(run, 1, "epoch", {"x": 1})
    newest = save_checkpoint(run, 2, "collect", {"x": 2})
    run.remove(f"checkpoints/{newest}.json")  # as if the writer died before the commit
    assert list_checkpoints(run) == [(1, "epoch")]
    assert load_latest_checkpoint(run).payload == {"x": 1}


def test_rewriting_a_stage_replaces_it(run):
    save_checkpoint(run, 1, "replay", {"x": 1})
    save_checkpoint(run, 1, "replay", {"x": 2})
    assert list_checkpoints(run) == [(1, "replay")]
    assert load_latest_checkpoint(run).payload == {"x": 2}


def test_no_checkpoint_and_read_only(run):
    assert load_latest_checkpoint(run) is None
    with Run.open(run.url, write=False) as reader, pytest.raises(RunError, match="not open for writing"):
        save_checkpoint(reader, 0, "collect", {})
    with pytest.raises(ValueError, match="unknown stage"):
        save_checkpoint(run, 0, "train", {})
