"""The Dask evaluator against the local one, on one LocalCluster of 2 worker processes.

Checks: equal gradients (1e-10 relative, float64) for one minibatch and equal weights after a
whole 2-epoch run; per-worker network caching; a worker killed mid-iteration (its shard is
rerun elsewhere, same result); an unreachable scheduler (DaskUnavailable, fast); an evaluator
that starts and closes its own LocalCluster; no Prefect/storage import.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

distributed = pytest.importorskip("distributed")

from nbody_dt.config import Config, from_dict  # noqa: E402
from nbody_dt.model.evaluate import StepCriteria  # noqa: E402
from nbody_dt.training.dask_evaluator import (  # noqa: E402
    FAULT_FILE_ENV,
    DaskEvaluator,
    DaskUnavailable,
    cached_networks,
    make_evaluator,
    split_minibatch,
)
from nbody_dt.training.epoch import MemoryRun, train_epoch  # noqa: E402
from nbody_dt.training.evaluators import LocalEvaluator  # noqa: E402
from nbody_dt.training.replay import sample_minibatch  # noqa: E402
from nbody_dt.training.setup import start_training  # noqa: E402

# A tiny network and a band the untrained network misses often: replay has failing samples
# every iteration (10 iterations per epoch), and collection retrains as well.
SMALL = {
    "model": {"hidden": [16, 16]},
    "collect": {"steps_per_epoch": 8, "energy_threshold": 1e-3, "accept_lower": 1e-5},
    "loss": {"lower": 3e-5, "upper": 3e-4},
    "initial_conditions": {"num_orbits": 8},
    "replay": {"steps": 10, "batch_size": 64},
    "epochs": 2,
}


def small_config(**sections) -> Config:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in SMALL.items()}
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return from_dict(data)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))


def run_two_epochs(cfg: Config, evaluator) -> tuple[dict, list[dict]]:
    training = start_training(cfg)
    run = MemoryRun(cfg.initial_conditions.num_orbits, cfg.model.history_len)
    metrics = [train_epoch(training, run, cfg, epoch, evaluator) for epoch in range(cfg.epochs)]
    return {k: v.detach().clone() for k, v in training.model.state_dict().items()}, metrics


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dask_fault") / "kill-one-worker"


@pytest.fixture(scope="module")
def cluster(fault_file):
    import dask
    from distributed import LocalCluster

    # as DaskEvaluator starts its own: no Active Memory Manager, which may drop weight replicas
    with dask.config.set({"distributed.scheduler.active-memory-manager.start": False}):
        c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                         env={FAULT_FILE_ENV: str(fault_file)})
    with c:
        yield c


@pytest.fixture(scope="module")
def cfg() -> Config:
    return small_config()


@pytest.fixture(scope="module")
def evaluator(cluster, cfg):
    with DaskEvaluator(cfg, cluster.scheduler_address) as ev:
        assert set(ev.warm_up().values()) == {"cpu"}
        yield ev


@pytest.fixture(scope="module")
def trained(cfg):
    """A model after one local epoch and its replay window (minibatches with failures)."""
    training = start_training(cfg)
    run = MemoryRun(cfg.initial_conditions.num_orbits, cfg.model.history_len)
    train_epoch(training, run, cfg, 0)
    return training.model, run.window(cfg, 0)


@pytest.fixture(scope="module")
def local_run(cfg):
    return run_two_epochs(cfg, LocalEvaluator())


@pytest.fixture(scope="module")
def dask_run(cfg, evaluator):
    return run_two_epochs(cfg, evaluator)


def test_split_minibatch_contiguous_and_nonempty(trained):
    _, window = trained
    mb = sample_minibatch(window, 7, torch.Generator().manual_seed(0))
    shards = split_minibatch(mb, 3)
    assert [len(s[0]) for s in shards] == [2, 2, 3]
    assert np.array_equal(np.concatenate([s[0] for s in shards]), mb.state.position.numpy())
    assert all(isinstance(a, np.ndarray) for s in shards for a in s)
    assert len(split_minibatch(mb, 16)) == 7  # never an empty shard


@pytest.mark.parametrize("loss_on", ["all", "failures"])
def test_gradients_equal_local(evaluator, trained, cfg, loss_on):
    model, window = trained
    mb = sample_minibatch(window, 64, torch.Generator().manual_seed(3))
    criteria = StepCriteria.from_config(cfg)
    local = LocalEvaluator().evaluate(model, mb, criteria, loss_on)
    dask = evaluator.evaluate(model, mb, criteria, loss_on)
    assert evaluator.shards == 2
    assert 0 < int(local.passed.sum()) < len(mb)  # some samples fail: gradients are not trivial
    assert torch.equal(dask.passed, local.passed) and dask.passed.dtype == torch.bool
    assert dask.rel_dE.dtype == local.rel_dE.dtype and rel_diff(local.rel_dE, dask.rel_dE) < 1e-10
    assert dask.loss_count == local.loss_count
    assert dask.loss_sum == pytest.approx(local.loss_sum, rel=1e-10)
    assert len(dask.grads) == len(local.grads) == len(list(model.parameters()))
    for g_local, g_dask, p in zip(local.grads, dask.grads, model.parameters()):
        assert g_dask.device.type == "cpu" and g_dask.dtype == p.dtype and g_dask.shape == p.shape
        assert rel_diff(g_local, g_dask) < 1e-10


def test_no_gradients_when_every_sample_passes(evaluator, trained, cfg):
    model, window = trained
    mb = sample_minibatch(window, 64, torch.Generator().manual_seed(4))
    wide = dataclasses.replace(StepCriteria.from_config(cfg), energy_threshold=float("inf"), accept_lower=0.0)
    for loss_on in ("all", "failures"):
        local = LocalEvaluator().evaluate(model, mb, wide, loss_on)
        dask = evaluator.evaluate(model, mb, wide, loss_on)
        assert bool(dask.passed.all()) and local.grads is None and dask.grads is None
        assert dask.loss_count == local.loss_count
        assert dask.loss_sum == pytest.approx(local.loss_sum, rel=1e-10)


def test_workers_cache_the_network_and_load_new_weights(evaluator, trained, cfg):
    model, window = trained
    criteria = StepCriteria.from_config(cfg)
    mb = sample_minibatch(window, 64, torch.Generator().manual_seed(5))
    evaluator.evaluate(model, mb, criteria, "all")
    before = evaluator.client.run(cached_networks)
    changed = type(model).from_config(cfg, 2)
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in changed.parameters():
            p.mul_(1.01)
    result = evaluator.evaluate(changed, mb, criteria, "all")
    after = evaluator.client.run(cached_networks)
    assert set(before) == set(after) and len(after) == 2
    for worker in after:
        assert len(after[worker]) == 1 and after[worker][0]["device"] == "cpu"
        assert after[worker][0]["network_id"] == before[worker][0]["network_id"]  # not rebuilt
        assert after[worker][0]["weights_key"] != before[worker][0]["weights_key"]  # new weights loaded
    expected = LocalEvaluator().evaluate(changed, mb, criteria, "all")
    assert all(rel_diff(a, b) < 1e-10 for a, b in zip(expected.grads, result.grads))


class LosingClient:
    """A real client whose first `failures` gathers report the iteration's futures as lost."""

    def __init__(self, client, failures: int):
        self._client, self.failures, self.gathers = client, failures, 0

    def __getattr__(self, name):
        return getattr(self._client, name)

    def gather(self, futures):
        from distributed.client import FutureCancelledError

        self.gathers += 1
        if self.gathers <= self.failures:
            raise FutureCancelledError(futures[0].key, reason="lost dependencies")
        return self._client.gather(futures)


def test_driver_resubmits_an_iteration_whose_inputs_were_lost(evaluator, trained, cfg):
    model, window = trained
    mb = sample_minibatch(window, 32, torch.Generator().manual_seed(9))
    criteria = StepCriteria.from_config(cfg)
    expected = LocalEvaluator().evaluate(model, mb, criteria, "all")
    flaky = DaskEvaluator.from_client(cfg, LosingClient(evaluator.client, failures=1), max_attempts=2)
    result = flaky.evaluate(model, mb, criteria, "all")
    assert flaky.resubmissions == 1 and flaky.last_timings["attempts"] == 2
    assert all(rel_diff(a, b) < 1e-10 for a, b in zip(expected.grads, result.grads))
    hopeless = DaskEvaluator.from_client(cfg, LosingClient(evaluator.client, failures=5), max_attempts=2)
    with pytest.raises(RuntimeError, match="failed 2 times"):
        hopeless.evaluate(model, mb, criteria, "all")
    hopeless.close()
    assert evaluator.client.status == "running"  # from_client: close() leaves the client open


def test_float32_run_dtype(cluster, trained):
    cfg32 = small_config(dtype="float32")
    model64, window = trained
    model = type(model64).from_config(cfg32, 2)
    model.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    mb = sample_minibatch(window, 64, torch.Generator().manual_seed(6)).to(dtype=torch.float32)
    criteria = StepCriteria.from_config(cfg32)
    with DaskEvaluator(cfg32, cluster.scheduler_address) as ev:
        dask = ev.evaluate(model, mb, criteria, "all")
    local = LocalEvaluator().evaluate(model, mb, criteria, "all")
    assert dask.rel_dE.dtype == torch.float32 and all(g.dtype == torch.float32 for g in dask.grads)
    assert all(rel_diff(a, b) < 1e-4 for a, b in zip(local.grads, dask.grads))


def test_whole_run_equals_local(cfg, local_run, dask_run):
    weights_local, metrics_local = local_run
    weights_dask, metrics_dask = dask_run
    assert all(m["replay_iterations"] == cfg.replay.steps for m in metrics_local)  # failures all the way
    for name in weights_local:
        assert rel_diff(weights_local[name], weights_dask[name]) < 1e-10, name
    for ml, md in zip(metrics_local, metrics_dask):
        assert ml["collect_tries"] == md["collect_tries"]
        assert ml["replay_final_pass_rate"] == md["replay_final_pass_rate"]


def test_whole_run_equals_local_with_loss_on_failures(evaluator):
    cfg = small_config(loss={"on": "failures"})
    with DaskEvaluator(cfg, evaluator.address) as ev:
        weights_dask, _ = run_two_epochs(cfg, ev)
    weights_local, _ = run_two_epochs(cfg, LocalEvaluator())
    for name in weights_local:
        assert rel_diff(weights_local[name], weights_dask[name]) < 1e-10, name


def test_worker_killed_mid_iteration_run_goes_on_with_the_same_result(evaluator, cfg, fault_file, local_run,
                                                                       dask_run):
    """The first shard task of the run SIGKILLs its worker; the scheduler reruns that shard on
    the other worker (the nanny restarts the dead one) and the run ends bit-for-bit like the
    run without the fault, i.e. like the local run to 1e-10."""
    workers_before = set(evaluator.client.nthreads())
    fault_file.write_text("kill the first worker that starts a shard\n")
    weights_faulted, _ = run_two_epochs(cfg, evaluator)
    assert not fault_file.exists()  # a shard task claimed the fault and killed its worker
    assert evaluator.resubmissions == 0  # the scheduler itself reran the lost shard
    assert workers_before - set(evaluator.client.nthreads())  # that worker is gone (a new one replaces it)
    weights_dask, weights_local = dask_run[0], local_run[0]
    for name in weights_local:
        assert torch.equal(weights_faulted[name], weights_dask[name]), name
        assert rel_diff(weights_local[name], weights_faulted[name]) < 1e-10, name


def test_unreachable_scheduler_fails_fast(cfg):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    start = time.perf_counter()
    with pytest.raises(DaskUnavailable) as info:
        DaskEvaluator(cfg, address, connect_timeout=1.0)
    assert time.perf_counter() - start < 15
    message = str(info.value)
    assert address in message and "\n" not in message
    assert isinstance(info.value, RuntimeError)


def test_make_evaluator(cluster, cfg):
    assert isinstance(make_evaluator(cfg), LocalEvaluator)
    dcfg = from_dict({**SMALL, "compute": {"evaluator": "dask", "dask_address": cluster.scheduler_address}})
    ev = make_evaluator(dcfg)
    try:
        assert isinstance(ev, DaskEvaluator) and ev.address == cluster.scheduler_address
    finally:
        ev.close()
    ev.close()  # idempotent


def test_own_local_cluster_started_and_closed(trained):
    own = from_dict({**SMALL, "compute": {"evaluator": "dask", "dask_workers": 1}})
    model, window = trained
    mb = sample_minibatch(window, 8, torch.Generator().manual_seed(7))
    with make_evaluator(own) as ev:
        cluster = ev._cluster
        assert cluster is not None and ev.address is None
        assert list(ev.client.nthreads().values()) == [1] and ev.shards == 1
    assert cluster.status.name == "closed" and ev.client is None
    with pytest.raises(RuntimeError, match="closed"):
        ev.evaluate(model, mb, StepCriteria.from_config(own), "all")


def test_module_imports_neither_prefect_nor_storage():
    import ast

    import nbody_dt.training.dask_evaluator as module

    tree = ast.parse(Path(module.__file__).read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(n.split(".")[0] == "prefect" or n.startswith(("nbody_dt.storage", "nbody_dt.tasks",
                                                                   "nbody_dt.flows")) for n in names), names
