"""The Dask evaluator against the local one, on one LocalCluster of 2 worker processes.

Checks: bitwise equal results (the run's reduction shards, computed and summed alike by both
evaluators) for one minibatch (float64 and float32), a multi-iteration replay and a whole
2-epoch run, on 1 and 2 workers; per-worker network caching; a worker killed mid-iteration (its
shard is rerun elsewhere, same result); an unreachable scheduler (DaskUnavailable, one line,
fast); an evaluator that starts and closes its own LocalCluster; no Prefect/storage import.
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

from nbody_dt.config import (  # noqa: E402
    Config,
    ConfigError,  # noqa: E402
    from_dict,
)
from nbody_dt.model.evaluate import StepCriteria  # noqa: E402
from nbody_dt.training import dask_evaluator, evaluators  # noqa: E402
from nbody_dt.training.dask_evaluator import (  # noqa: E402
    DaskEvaluator,
    DaskUnavailable,
    cached_networks,
    make_evaluator,
    shard_arrays,
)
from nbody_dt.training.epoch import MemoryRun, train_epoch  # noqa: E402
from nbody_dt.training.evaluators import LocalEvaluator, split_minibatch  # noqa: E402
from nbody_dt.training.replay import generalize_on_trajectory, sample_minibatch  # noqa: E402
from nbody_dt.training.setup import make_optimizer, start_training  # noqa: E402
from tests.conftest import with_legacy  # noqa: E402
from tests.dask_faults import KillWorkerOnTask  # noqa: E402

# A tiny network and a band the untrained network misses often: replay has failing samples
# every iteration (10 iterations per epoch), and collection retrains as well.
SMALL = with_legacy({
    "model": {"hidden": [16, 16]},
    "collect": {"steps_per_epoch": 8, "energy_threshold": 1e-3, "accept_lower": 1e-5},
    "loss": {"lower": 3e-5, "upper": 3e-4},
    "initial_conditions": {"num_orbits": 8},
    "replay": {"steps": 10, "batch_size": 64},
    "epochs": 2,
})


def small_config(**sections) -> Config:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in SMALL.items()}
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return from_dict(data)


def assert_same_result(a, b) -> None:
    """Two MinibatchResults bit for bit: pass masks, errors, loss sums and counts, gradients."""
    assert torch.equal(a.passed, b.passed) and a.passed.dtype == b.passed.dtype == torch.bool
    assert a.rel_dE.dtype == b.rel_dE.dtype and torch.equal(a.rel_dE, b.rel_dE)
    assert a.loss_sum == b.loss_sum and a.loss_count == b.loss_count
    assert (a.grads is None) == (b.grads is None)
    for ga, gb in zip(a.grads or [], b.grads or []):
        assert ga.dtype == gb.dtype and ga.device == gb.device and torch.equal(ga, gb)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def run_two_epochs(cfg: Config, evaluator) -> tuple[dict, list[dict]]:
    training = start_training(cfg)
    run = MemoryRun(cfg.initial_conditions.num_orbits, cfg.model.history_len)
    metrics = [train_epoch(training, run, cfg, epoch, evaluator) for epoch in range(cfg.epochs)]
    return {k: v.detach().clone() for k, v in training.model.state_dict().items()}, metrics


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dask_fault") / "kill-one-worker"


@pytest.fixture(scope="module")
def cluster():
    import dask
    from distributed import LocalCluster

    # as DaskEvaluator starts its own: no Active Memory Manager, which may drop weight replicas
    with dask.config.set({"distributed.scheduler.active-memory-manager.start": False}):
        c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
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
    return run_two_epochs(cfg, LocalEvaluator.from_config(cfg))


@pytest.fixture(scope="module")
def dask_run(cfg, evaluator):
    return run_two_epochs(cfg, evaluator)


def test_split_minibatch_contiguous_and_nonempty(trained):
    _, window = trained
    mb = sample_minibatch(window, 7, torch.Generator().manual_seed(0))
    shards = split_minibatch(mb, 3)
    assert [len(s) for s in shards] == [2, 2, 3]
    assert torch.equal(torch.cat([s.state.position for s in shards]), mb.state.position)
    assert torch.equal(torch.cat([s.rows for s in shards]), mb.rows)
    arrays = [shard_arrays(s) for s in shards]
    assert all(isinstance(a, np.ndarray) and a.flags.c_contiguous for s in arrays for a in s)
    assert np.array_equal(np.concatenate([s[5] for s in arrays]), mb.history.valid.numpy())
    assert len(split_minibatch(mb, 16)) == 7  # never an empty shard


def test_workers_run_the_one_per_shard_function():
    """The worker's per-shard computation is the local evaluator's function, not a copy."""
    import ast
    import inspect

    assert dask_evaluator.evaluate_shard is evaluators.evaluate_shard
    assert dask_evaluator.reduce_shards is evaluators.reduce_shards
    tree = ast.parse(inspect.getsource(dask_evaluator))
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert {"evaluate_shard", "reduce_shards", "split_minibatch"} <= called
    assert "evaluate_step" not in inspect.getsource(dask_evaluator)


@pytest.mark.parametrize("loss_on", ["all", "failures"])
def test_gradients_equal_local(evaluator, trained, cfg, loss_on):
    model, window = trained
    mb = sample_minibatch(window, 64, torch.Generator().manual_seed(3))
    criteria = StepCriteria.from_config(cfg)
    local = LocalEvaluator.from_config(cfg).evaluate(model, mb, criteria, loss_on)
    dask = evaluator.evaluate(model, mb, criteria, loss_on)
    assert evaluator.shards == cfg.compute.reduction_shards == 4  # the config's, not the 2 workers'
    assert 0 < int(local.passed.sum()) < len(mb)  # some samples fail: gradients are not trivial
    assert len(dask.grads) == len(local.grads) == len(list(model.parameters()))
    for g_dask, p in zip(dask.grads, model.parameters()):
        assert g_dask.device.type == "cpu" and g_dask.dtype == p.dtype and g_dask.shape == p.shape
    assert_same_result(local, dask)


def test_no_gradients_when_every_sample_passes(evaluator, trained, cfg):
    model, window = trained
    mb = sample_minibatch(window, 64, torch.Generator().manual_seed(4))
    wide = dataclasses.replace(StepCriteria.from_config(cfg), energy_threshold=float("inf"), accept_lower=0.0)
    for loss_on in ("all", "failures"):
        local = LocalEvaluator.from_config(cfg).evaluate(model, mb, wide, loss_on)
        dask = evaluator.evaluate(model, mb, wide, loss_on)
        assert bool(dask.passed.all()) and local.grads is None and dask.grads is None
        assert_same_result(local, dask)


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
    assert_same_result(LocalEvaluator.from_config(cfg).evaluate(changed, mb, criteria, "all"), result)


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
    expected = LocalEvaluator.from_config(cfg).evaluate(model, mb, criteria, "all")
    flaky = DaskEvaluator.from_client(cfg, LosingClient(evaluator.client, failures=1), max_attempts=2)
    result = flaky.evaluate(model, mb, criteria, "all")
    assert flaky.resubmissions == 1 and flaky.last_timings["attempts"] == 2
    assert_same_result(expected, result)
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
    local = LocalEvaluator.from_config(cfg32).evaluate(model, mb, criteria, "all")
    assert dask.rel_dE.dtype == torch.float32 and all(g.dtype == torch.float32 for g in dask.grads)
    assert_same_result(local, dask)


def replay_weights(cfg: Config, trained, evaluator, iterations: int) -> dict:
    """The weights after `iterations` replay iterations (all with failures) from the trained model."""
    model64, window = trained
    model = type(model64).from_config(cfg, 2)
    model.load_state_dict(model64.state_dict())
    optimizer = make_optimizer(cfg, model)
    short = from_dict({**cfg.to_dict(), "replay": {**cfg.to_dict()["replay"], "steps": iterations}})
    converged, done, _ = generalize_on_trajectory(model, window, optimizer, short, evaluator,
                                                  torch.Generator().manual_seed(11))
    assert not converged and done == iterations
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_multi_iteration_replay_bitwise_equal_on_1_and_2_workers(cluster, evaluator, trained, cfg):
    local = replay_weights(cfg, trained, LocalEvaluator.from_config(cfg), 25)
    assert_same_weights(local, replay_weights(cfg, trained, evaluator, 25))  # 2 workers, 4 shards
    one = from_dict({**SMALL, "compute": {"evaluator": "dask", "dask_workers": 1}})
    with make_evaluator(one) as ev1:
        assert len(ev1.client.nthreads()) == 1 and ev1.shards == 4
        assert_same_weights(local, replay_weights(cfg, trained, ev1, 25))


def test_whole_run_equals_local(cfg, local_run, dask_run):
    weights_local, metrics_local = local_run
    weights_dask, metrics_dask = dask_run
    assert all(m["replay_iterations"] == cfg.replay.steps for m in metrics_local)  # failures all the way
    assert_same_weights(weights_local, weights_dask)
    for ml, md in zip(metrics_local, metrics_dask):
        assert ml["collect_tries"] == md["collect_tries"]
        assert ml["replay_final_pass_rate"] == md["replay_final_pass_rate"]


def test_whole_run_equals_local_on_one_worker_with_loss_on_failures(local_run):
    cfg = small_config(loss={"on": "failures"}, compute={"evaluator": "dask", "dask_workers": 1})
    with make_evaluator(cfg) as ev:
        weights_dask, _ = run_two_epochs(cfg, ev)
    weights_local, _ = run_two_epochs(cfg, LocalEvaluator.from_config(cfg))
    assert_same_weights(weights_local, weights_dask)


def test_worker_killed_mid_iteration_run_goes_on_with_the_same_result(evaluator, cfg, fault_file, local_run,
                                                                       dask_run):
    """The first shard task of the run SIGKILLs its worker; the scheduler reruns that shard on
    the other worker (the nanny restarts the dead one) and the run ends bit-for-bit like the
    run without the fault and the local run."""
    workers_before = set(evaluator.client.nthreads())
    evaluator.client.register_plugin(KillWorkerOnTask(str(fault_file), "shard_task-"))
    fault_file.write_text("kill the first worker that starts a shard\n")
    weights_faulted, _ = run_two_epochs(cfg, evaluator)
    assert not fault_file.exists()  # a shard task claimed the fault and killed its worker
    assert evaluator.resubmissions == 0  # the scheduler itself reran the lost shard
    assert workers_before - set(evaluator.client.nthreads())  # that worker is gone (a new one replaces it)
    assert_same_weights(weights_faulted, dask_run[0])
    assert_same_weights(weights_faulted, local_run[0])


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
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ConfigError)  # the CLI prints it


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
        assert list(ev.client.nthreads().values()) == [1] and ev.shards == own.compute.reduction_shards
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


def test_mixed_n_set_network_shards_equal_local(cluster):
    """A set network on a padded mixed-N window (N = 2, 3 and 5): Dask shards give the local gradients."""
    mixed = small_config(
        model={"kind": "set", "hidden": [8, 8]}, physics={"dim": 3, "softening": 0.01},
        initial_conditions={"kind": "mixture", "num_orbits": 6, "families": ["kepler", "free_fall", "plummer"],
                            "family_n": [2, 3, 5], "family_weights": [1.0, 1.0, 1.0],
                            "family_scale": [100.0, 100.0, 1.0]},
        collect={"steps_per_epoch": 4, "energy_threshold": 1e-3, "accept_lower": 1e-5, "accept_safe_after": 20},
        replay={"steps": 2, "batch_size": 32})
    training = start_training(mixed)
    run = MemoryRun(mixed.initial_conditions.num_orbits, 0)
    train_epoch(training, run, mixed, 0)
    window = run.window(mixed, 0)
    mb = sample_minibatch(window, 32, torch.Generator().manual_seed(5))
    assert sorted(set((mb.state.mass != 0).sum(-1).tolist())) == [2, 3, 5]
    criteria = StepCriteria.from_config(mixed)
    local = LocalEvaluator.from_config(mixed).evaluate(training.model, mb, criteria, "all")
    with DaskEvaluator(mixed, cluster.scheduler_address) as ev:
        dask = ev.evaluate(training.model, mb, criteria, "all")
    assert 0 < int(local.passed.sum()) < len(mb)
    assert_same_result(local, dask)
