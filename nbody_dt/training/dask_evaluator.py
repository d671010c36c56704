"""The Dask evaluator: replay minibatches sharded over the workers of a `distributed` cluster.

One `evaluate` call (one replay iteration) does, from the driver only (no task per shard in
any orchestrator):

1. split the minibatch into the run's `compute.reduction_shards` contiguous shards
   (`evaluators.split_minibatch`, the cut every evaluator makes; the number of workers only
   decides where the shards run);
2. broadcast the weights once to every worker (`client.scatter([weights], broadcast=True)`);
3. submit one task per shard: `shard_task` rebuilds the network once per worker (a
   module-level cache keyed by the architecture), loads the broadcast weights into it, moves
   it and the shard to the worker's GPU when it has one, runs `evaluators.evaluate_shard` (the
   per-shard computation `LocalEvaluator` runs too) and returns its loss-sum gradients, pass
   mask and rel_dE as NumPy arrays (never CUDA tensors);
4. sum the shards' results in shard order with `evaluators.reduce_shards` (the reduction
   `LocalEvaluator` uses) into one `MinibatchResult` on the CPU: on CPU workers, bitwise what
   `LocalEvaluator` returns for the same config, whatever the number of workers.

The network's spec (the run's config dict and the number of bodies) is sent once, with the
first minibatch, as a task whose result the workers share (Dask recomputes it if lost); the
criteria and the loss selection travel with each (small) task. A shard's data travels inside
its task, so when a worker dies mid-iteration the scheduler reruns that shard elsewhere (the
broadcast weights survive on the other workers); should the scheduler give up on a shard
anyway (`KilledWorker`, lost data), the whole iteration is resubmitted, up to `max_attempts`
times. This module never imports Prefect or storage.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
import warnings
from concurrent.futures import CancelledError as FuturesCancelledError
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nbody_dt.config import Config, ConfigError, from_dict
from nbody_dt.errors import one_line
from nbody_dt.model.evaluate import StepCriteria
from nbody_dt.model.history import History
from nbody_dt.model.network import DtNetwork
from nbody_dt.model.set_network import build_network
from nbody_dt.model.trajectory import Minibatch
from nbody_dt.physics.state import State
from nbody_dt.training.evaluators import (
    Evaluator,
    LocalEvaluator,
    MinibatchResult,
    ShardResult,
    evaluate_shard,
    reduce_shards,
    split_minibatch,
)

"""Test hook: when set in a worker's environment and the file it names exists, the first shard
task that manages to delete the file kills its own worker process (SIGKILL), mid-iteration."""


class DaskUnavailable(ConfigError, RuntimeError):
    """The Dask scheduler cannot be reached (or has no workers) within the timeout.

    A ConfigError (the configured `compute.dask_address` does not work), so that the command
    line prints its one-line message like any other config error."""


# ---------------------------------------------------------------------------------------------
# Worker side. Everything here is module level: workers are spawned processes that import it.
# ---------------------------------------------------------------------------------------------


@dataclass
class _CachedNetwork:
    model: DtNetwork
    device: torch.device
    weights_key: str | None = None


_NETWORKS: dict[tuple[str, int], _CachedNetwork] = {}
"""(architecture key, thread id) -> the network rebuilt on this worker; one per worker thread so
that threads of a multi-threaded worker never load weights into a network another one uses.
Insertion ordered; at most _MAX_CACHED (a long-lived cluster may serve several runs)."""
_MAX_CACHED = 8


def architecture_key(config: dict, num_bodies: int) -> str:
    """What fixes the network's parameter shapes and its forward computation (canonical JSON)."""
    return json.dumps({"model": config["model"], "physics": config["physics"], "dtype": config["dtype"],
                       "num_bodies": num_bodies}, sort_keys=True)


def network_spec(config: dict, num_bodies: int) -> dict:
    """What a worker needs to rebuild the network: the run's config dict and the number of bodies.

    Submitted once per evaluator as a task (not scattered), so that Dask recomputes it should
    every worker holding it die."""
    return {"key": architecture_key(config, num_bodies), "config": config, "num_bodies": num_bodies}


def worker_device() -> torch.device:
    """The worker's GPU when it has one (a `dask cuda worker` sees one device: cuda:0), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _cached_network(spec: dict) -> _CachedNetwork:
    key = (spec["key"], threading.get_ident())
    entry = _NETWORKS.get(key)
    if entry is None:
        cfg = from_dict(spec["config"])
        device = worker_device()
        entry = _CachedNetwork(build_network(cfg, spec["num_bodies"]).to(device), device)
        while len(_NETWORKS) >= _MAX_CACHED:
            _NETWORKS.pop(next(iter(_NETWORKS)))
        _NETWORKS[key] = entry
    return entry


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    with warnings.catch_warnings():  # deserialized arrays may be read-only; nothing here writes to them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).to(device)


def shard_task(spec: dict, weights: dict[str, np.ndarray], weights_key: str, shard: tuple[np.ndarray, ...],
               criteria: StepCriteria, loss_on: str) -> dict[str, Any]:
    """Runs on a worker: `evaluators.evaluate_shard` on one shard with the broadcast weights.

    shard = (position, velocity, mass, history position, history velocity, history valid).
    Returns passed (bool), rel_dE (the run's dtype), loss_sum, loss_count and grads (float64
    arrays in parameter order, or None when no sample of the shard carried loss), all on the
    CPU, and compute_s (the task's own time, for profiling).
    """
    start = time.perf_counter()
    entry = _cached_network(spec)
    device = entry.device
    if entry.weights_key != weights_key:
        entry.model.load_state_dict({k: _tensor(v, device) for k, v in weights.items()})
        entry.weights_key = weights_key
    pos, vel, mass, hpos, hvel, hvalid = (_tensor(a, device) for a in shard)
    minibatch = Minibatch(State(pos, vel, mass), History(hpos, hvel, hvalid), torch.zeros(0, dtype=torch.int64))
    res = evaluate_shard(entry.model, minibatch, criteria, loss_on)
    grads = None if res.grads is None else [g.detach().cpu().numpy() for g in res.grads]
    return {"passed": res.passed.numpy(), "rel_dE": res.rel_dE.numpy(), "loss_sum": res.loss_sum,
            "loss_count": res.loss_count, "grads": grads, "compute_s": time.perf_counter() - start}


def worker_warm_up() -> str:
    """Runs on a worker: import torch and this package now (seconds) rather than in the first
    replay iteration; returns the device the worker evaluates on."""
    return str(worker_device())


def cached_networks() -> list[dict]:
    """This worker's cached networks (diagnostics: `client.run(cached_networks)`)."""
    return [{"architecture": key, "thread": thread, "network_id": id(e.model), "device": str(e.device),
             "weights_key": e.weights_key} for (key, thread), e in _NETWORKS.items()]


def clear_worker_cache() -> int:
    """Drop this worker's cached networks (returns how many); `client.run(clear_worker_cache)`."""
    n = len(_NETWORKS)
    _NETWORKS.clear()
    return n


# ---------------------------------------------------------------------------------------------
# Driver side.
# ---------------------------------------------------------------------------------------------


def shard_arrays(shard: Minibatch) -> tuple[np.ndarray, ...]:
    """A shard as the CPU NumPy arrays a shard task takes (see shard_task)."""
    s, h = shard.state, shard.history
    return tuple(np.ascontiguousarray(t.detach().cpu().numpy())
                 for t in (s.position, s.velocity, s.mass, h.position, h.velocity, h.valid))


def shard_result(out: dict) -> ShardResult:
    """A shard task's output as the ShardResult `evaluate_shard` returned on the worker."""
    grads = None
    if out["grads"] is not None:
        grads = [torch.from_numpy(g if g.flags.writeable else g.copy()) for g in out["grads"]]
    return ShardResult(torch.from_numpy(out["passed"].copy()), torch.from_numpy(out["rel_dE"].copy()),
                       out["loss_sum"], out["loss_count"], grads)


def start_local_cluster(n_workers: int, **kwargs):
    """The cluster of an evaluator without an address: dask-cuda's LocalCUDACluster where this
    machine has GPUs (one worker per device, each pinned to its own; LocalCluster's workers would
    all use cuda:0), else distributed's LocalCluster. GPUs without dask-cuda (the `cuda` extra)
    are refused rather than silently shared."""
    if not torch.cuda.is_available():
        from distributed import LocalCluster

        return LocalCluster(n_workers=n_workers, **kwargs)
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise DaskUnavailable("local Dask workers on GPUs need dask-cuda (pip install 'nbody-dt[cuda]'); "
                              "without it every worker would use cuda:0") from None
    return LocalCUDACluster(n_workers=min(n_workers, torch.cuda.device_count()), **kwargs)


class DaskEvaluator:
    """Replay evaluation sharded over a Dask cluster; the driver keeps the optimizer.

    address: a scheduler to join (e.g. one that `dask cuda worker` processes joined); None or ""
    starts a LocalCluster of `n_workers` (default compute.dask_workers) single-threaded worker
    processes for this evaluator, closed by `close()` (also a context manager). An unreachable
    scheduler, or one without a worker after `worker_timeout` seconds, raises DaskUnavailable
    here, before any training step.
    The minibatch is cut into the run's `compute.reduction_shards` shards, one task each,
    whatever the number of workers (which only decides where the shards run).
    direct_to_workers: move weights and results between the driver and the workers directly
    rather than through the scheduler; default yes for the evaluator's own LocalCluster, Dask's
    default (through the scheduler) for an address, whose workers the driver may not reach.
    max_attempts: times one iteration is submitted when the scheduler gives up on a shard
    (KilledWorker, after distributed.scheduler.allowed-failures worker deaths) or its inputs
    are lost; a worker dying mid-task is otherwise handled by the scheduler (the shard reruns
    on a worker that holds the broadcast weights). The evaluator's own LocalCluster runs without
    the Active Memory Manager, which would drop weight replicas no waiting task needs; on a
    cluster at an address with it running, a worker dying right after such a drop loses the
    iteration's weights, and the driver resubmits the iteration.
    """

    def __init__(self, cfg: Config, address: str | None = None, n_workers: int | None = None, *,
                 connect_timeout: float = 5.0, worker_timeout: float = 60.0,
                 max_attempts: int = 3, direct_to_workers: bool | None = None, cluster_kwargs: dict | None = None):
        import dask
        from distributed import Client

        address = address or None
        cluster = client = None
        if address is None:
            # no dashboard; its bare HTTP server on a free loopback port, not 8787 (another run may hold it)
            kwargs = dict(n_workers=n_workers or cfg.compute.dask_workers, threads_per_worker=1, processes=True,
                          dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
            kwargs.update(cluster_kwargs or {})
            # Keep the broadcast weights on every worker (the Active Memory Manager would drop
            # replicas that no waiting task needs, and a worker dying then loses the last copy).
            # Leave glibc's malloc as in the driver: Dask's MALLOC_TRIM_THRESHOLD_ also freezes
            # the mmap threshold, so every large autograd buffer is mmap'ed and page-faulted
            # afresh (twice the page faults of a replay iteration, measured).
            with dask.config.set({"distributed.scheduler.active-memory-manager.start": False,
                                  "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
                cluster = start_local_cluster(**kwargs)
            try:
                direct = True if direct_to_workers is None else direct_to_workers
                client = Client(cluster, timeout=f"{connect_timeout}s", direct_to_workers=direct)
            except BaseException:
                cluster.close()
                raise
        else:
            try:
                client = Client(address, timeout=f"{connect_timeout}s", direct_to_workers=direct_to_workers)
            except Exception as exc:
                raise DaskUnavailable(f"Dask scheduler at {address} is unreachable within {connect_timeout:g} s "
                                      f"({one_line(exc, with_type=True)})") from None
            try:
                client.wait_for_workers(1, timeout=worker_timeout)
            except Exception:
                client.close()
                raise DaskUnavailable(
                    f"Dask scheduler at {address} has no workers after {worker_timeout:g} s") from None
        self._setup(cfg, client, cluster, address, max_attempts, owns_client=True)

    @classmethod
    def from_client(cls, cfg: Config, client, *, max_attempts: int = 3) -> DaskEvaluator:
        """An evaluator on an existing distributed.Client, which `close()` leaves open."""
        self = cls.__new__(cls)
        self._setup(cfg, client, None, None, max_attempts, owns_client=False)
        return self

    def _setup(self, cfg: Config, client, cluster, address, max_attempts, owns_client) -> None:
        self._config = cfg.to_dict()
        self._client, self._cluster, self._owns_client = client, cluster, owns_client
        self.address = address
        self.max_attempts = max(1, max_attempts)
        self.shards = cfg.compute.reduction_shards
        self._spec = None  # (num_bodies, future of the scattered network spec)
        self.resubmissions = 0
        """Iterations submitted again by the driver (the scheduler gave up on a shard, or lost data)."""
        self.last_timings: dict[str, float] = {}
        """Seconds spent in the last evaluate: prepare (split the minibatch, copy the weights),
        scatter (the weights, to every worker), tasks (submit to gathered), combine, and
        worker_compute (the slowest shard's own time on its worker)."""

    @property
    def client(self):
        """The distributed.Client (for diagnostics; evaluate is the interface); None once closed."""
        return self._client

    def __enter__(self) -> DaskEvaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the client and, when this evaluator started it, the LocalCluster. Idempotent."""
        client, cluster = self._client, self._cluster
        self._client, self._cluster, self._spec = None, None, None
        if client is not None and self._owns_client:
            client.close()
        if cluster is not None:
            cluster.close()

    def warm_up(self) -> dict[str, str]:
        """Import torch and the package on every worker (they otherwise do it in the first
        iteration); returns each worker's evaluation device."""
        return self._client.run(worker_warm_up)

    def _spec_future(self, num_bodies: int):
        if self._spec is None or self._spec[0] != num_bodies:
            future = self._client.submit(network_spec, self._config, num_bodies, pure=False,
                                         key=f"nbody-dt-network-spec-{uuid.uuid4().hex}")
            self._spec = (num_bodies, future)
        return self._spec[1]

    def evaluate(self, model: DtNetwork, minibatch: Minibatch, criteria: StepCriteria, loss_on: str) -> MinibatchResult:
        """One replay iteration's evaluation, sharded; see the module docstring."""
        if self._client is None:
            raise RuntimeError("DaskEvaluator is closed")
        from distributed import KilledWorker

        t0 = time.perf_counter()
        shards = [shard_arrays(s) for s in split_minibatch(minibatch, self.shards)]
        # CPU weights are not copied: scatter returns once the workers hold their own copy, and the
        # optimizer changes them only after this call
        weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        for attempt in range(1, self.max_attempts + 1):
            wfuture, futures = None, []
            try:
                t1 = time.perf_counter()
                spec = self._spec_future(minibatch.state.num_bodies)
                [wfuture] = self._client.scatter([weights], broadcast=True, hash=False)
                t2 = time.perf_counter()
                futures = [self._client.submit(shard_task, spec, wfuture, wfuture.key, shard, criteria, loss_on,
                                               key=f"shard_task-{wfuture.key}-{i}", pure=False)
                           for i, shard in enumerate(shards)]
                outs = self._client.gather(futures)
                break
            except (KilledWorker, FuturesCancelledError) as exc:
                # the scheduler gave up on a shard, or scattered inputs were lost with every worker
                # holding them: scatter again and resubmit the whole iteration
                self._spec = None
                if attempt == self.max_attempts:
                    raise RuntimeError(f"Dask replay iteration failed {attempt} times: "
                                       f"{one_line(exc, with_type=True)}") from exc
                self.resubmissions += 1
                time.sleep(0.5 * attempt)
            finally:
                for f in futures + ([wfuture] if wfuture is not None else []):
                    f.release()
        t3 = time.perf_counter()
        result = reduce_shards([shard_result(o) for o in outs], [p.dtype for p in model.parameters()])
        self.last_timings = {"prepare": t1 - t0, "scatter": t2 - t1, "tasks": t3 - t2,
                             "combine": time.perf_counter() - t3,
                             "worker_compute": max(o["compute_s"] for o in outs), "attempts": attempt}
        return result


def make_evaluator(cfg: Config) -> Evaluator:
    """The evaluator `compute.evaluator` names: LocalEvaluator, or a DaskEvaluator on
    `compute.dask_address` (a LocalCluster of `compute.dask_workers` workers when empty)."""
    if cfg.compute.evaluator == "local":
        return LocalEvaluator.from_config(cfg)
    if cfg.compute.evaluator == "dask":
        return DaskEvaluator(cfg, cfg.compute.dask_address or None, cfg.compute.dask_workers)
    raise ValueError(f"unknown compute.evaluator {cfg.compute.evaluator!r}")
