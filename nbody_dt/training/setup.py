"""Everything a run starts from: seeded initial conditions, network, optimizer, live collection,
and the checkpoint payload (plain tensors, numbers and strings) that restores them exactly."""

from __future__ import annotations

import copy
import hashlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from nbody_dt.config import Config, ConfigError, from_stored
from nbody_dt.model.history import History
from nbody_dt.model.network import DtNetwork
from nbody_dt.model.set_network import build_network
from nbody_dt.physics import initial_conditions as ics
from nbody_dt.physics.state import State
from nbody_dt.training.collect import LiveCollection


def initial_states(cfg: Config) -> State:
    """The training systems the config describes, in the run's dtype."""
    ic, dtype, dim = cfg.initial_conditions, cfg.torch_dtype, cfg.physics.dim
    if ic.kind == "kepler":
        state, _ = ics.kepler_ensemble(ic.num_orbits, e_range=ic.e_range, a_range=ic.a_range, seed=ic.seed, m1=ic.m1,
                                       m2=ic.m2, G=cfg.physics.G, start=ic.start, dim=dim, dtype=dtype)
        return state
    if ic.kind == "plummer":
        return ics.plummer_sphere(ic.n_bodies, ic.seed, ic.num_orbits, dim, dtype)
    if ic.kind == "three_body":
        return ics.free_fall_three_body(ic.num_orbits, ic.seed, ic.mass_range, dim, dtype)
    if ic.kind == "figure8":
        return ics.figure_eight(dim, dtype)
    if ic.kind == "mixture":
        return mixture_states(cfg)
    return ics.pythagorean(dim, dtype)


def restart_states(cfg: Config, orbits: torch.Tensor, key: str) -> State:
    """Fresh systems for the live systems `orbits` (collect.on_stall = 'restart'): the config's
    initial conditions drawn at a seed derived from initial_conditions.seed and `key`, each orbit
    from its own entry, so a mixture's system keeps its family and N."""
    digest = hashlib.sha256(f"{cfg.initial_conditions.seed}:{key}".encode()).digest()
    ic = cfg.initial_conditions.model_copy(update={"seed": int.from_bytes(digest[:8], "little") >> 1})
    return initial_states(cfg.model_copy(update={"initial_conditions": ic})).select(orbits.cpu())


def mixture_counts(weights: list[float], total: int) -> list[int]:
    """Systems per mixture entry: total split by weight (largest remainders), then at least one each
    (taken from the largest entry)."""
    w = np.asarray(weights, dtype=np.float64)
    share = w / w.sum() * total
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(-(share - counts), kind="stable")[: total - int(counts.sum())]] += 1
    while (counts == 0).any():
        counts[int(np.argmax(counts))] -= 1
        counts[int(np.argmin(counts))] += 1
    return counts.tolist()


def mixture_states(cfg: Config) -> State:
    """The systems of an initial_conditions mixture, entry after entry, padded to the largest N
    (zero-mass bodies). Entry k draws from seed initial_conditions.seed + 7919 k."""
    ic, dtype, dim, G = cfg.initial_conditions, cfg.torch_dtype, cfg.physics.dim, cfg.physics.G
    parts = []
    counts = mixture_counts(ic.family_weights, ic.num_orbits)
    for k, (family, n, count, scale) in enumerate(zip(ic.families, ic.family_n, counts, ic.family_scale)):
        seed = ic.seed + 7919 * k
        if family == "kepler":
            s, _ = ics.kepler_ensemble(count, e_range=ic.e_range, a_range=ic.a_range, seed=seed, m1=ic.m1, m2=ic.m2,
                                       G=G, start=ic.start, dim=dim, dtype=dtype)
        elif family == "hierarchical":
            s = ics.hierarchical(count, n, seed, G=G, dim=dim, dtype=dtype)
        elif family == "figure8":
            s = ics.perturbed_figure_eights(count, seed, dim=dim, dtype=dtype)
        elif family == "free_fall":
            s = ics.free_fall(count, n, seed, tuple(ic.mass_range), dim, dtype)
        else:
            s = ics.plummer_sphere(n, seed, count, dim, dtype)
        parts.append(ics.scaled(s, scale))
    return ics.pad_bodies(parts, max(ic.family_n))


def make_optimizer(cfg: Config, model: DtNetwork) -> torch.optim.Optimizer:
    """Adam or AdamW; the fused kernel (one pass over all parameters: 3x faster steps of a large
    network on the CPU, benchmarks/README.md)."""
    opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer.name]
    return opt(model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay, fused=True)


def apply_compute_settings(cfg: Config) -> None:
    """Torch's intra-op threads for this process (compute.torch_threads; 0 keeps torch's choice).

    One thread by default: the networks and batches here are small, and on a 2-core machine
    shared with anything else two threads made an epoch 10x slower (benchmarks/README.md).
    """
    if cfg.compute.torch_threads:
        torch.set_num_threads(cfg.compute.torch_threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Training:
    """The mutable training objects of a run: network, optimizer and live collection."""

    model: DtNetwork
    optimizer: torch.optim.Optimizer
    live: LiveCollection


def pair_prior_weights(cfg: Config, payload: dict) -> dict[str, torch.Tensor]:
    """The network weights of a pair-prior checkpoint payload (model.pair_prior), after checking that
    it is a set network trained on two-body systems with this config's hidden widths and activation
    (ValueError, one line, otherwise)."""
    source = cfg.model.pair_prior
    try:
        prior = from_stored(payload["config"]).model
    except ConfigError as exc:
        raise ValueError(f"model.pair_prior {source}: its config is not one this nbody-dt reads ({exc})") from None
    bodies = payload["live"]["mass"].shape[1] if isinstance(payload.get("live"), dict) else None
    if prior.kind != "set" or prior.pair_prior or bodies != 2:
        raise ValueError(f"model.pair_prior {source}: not a set network trained on two-body systems without a "
                         f"prior of its own (kind {prior.kind!r}, {bodies} bodies)")
    if (tuple(prior.hidden), prior.activation) != (tuple(cfg.model.hidden), cfg.model.activation):
        raise ValueError(f"model.pair_prior {source}: hidden {list(prior.hidden)} / {prior.activation}, this "
                         f"config has {list(cfg.model.hidden)} / {cfg.model.activation}: they must be the same")
    return payload["model"]


def start_training(cfg: Config, pair_prior: dict | None = None) -> Training:
    """A fresh run: seed, build the systems and the network, derive normalization once; a config
    with model.pair_prior takes that checkpoint's payload, whose network becomes the frozen prior."""
    apply_compute_settings(cfg)
    seed_everything(cfg.seed)
    state = initial_states(cfg).to(device=cfg.device)
    model = build_network(cfg, state.num_bodies).to(cfg.device)
    if cfg.model.pair_prior:
        if pair_prior is None:
            raise ValueError(f"model.pair_prior {cfg.model.pair_prior}: its checkpoint was not loaded")
        model.prior.load_network(pair_prior_weights(cfg, pair_prior))
    if cfg.model.normalization == "initial":
        model.set_scales(state)
    return Training(model, make_optimizer(cfg, model), LiveCollection.start(state, cfg.model.history_len))


def snapshot(training: Training, cfg: Config) -> dict:
    """A checkpoint payload: weights, optimizer, live collection, RNG states and the config."""
    live = training.live
    py_state = random.getstate()
    np_state = np.random.get_state()
    return {
        "config": cfg.to_dict(),
        "model": {k: v.detach().clone() for k, v in training.model.state_dict().items()},
        "optimizer": copy.deepcopy(training.optimizer.state_dict()),
        "live": {
            "position": live.state.position, "velocity": live.state.velocity, "mass": live.state.mass,
            "history_position": live.history.position, "history_velocity": live.history.velocity,
            "history_valid": live.history.valid, "time": live.time, "step": live.step,
        },
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]],
        },
    }


def restore(payload: dict, cfg: Config) -> Training:
    """Rebuild the training objects of a snapshot, RNG states included (bit-for-bit resume)."""
    apply_compute_settings(cfg)
    live_d = payload["live"]
    state = State(live_d["position"], live_d["velocity"], live_d["mass"]).to(device=cfg.device)
    model = build_network(cfg, state.num_bodies).to(cfg.device)
    model.load_state_dict(payload["model"])
    optimizer = make_optimizer(cfg, model)
    optimizer.load_state_dict(copy.deepcopy(payload["optimizer"]))  # the payload stays untouched
    history = History(live_d["history_position"], live_d["history_velocity"], live_d["history_valid"]).to(cfg.device)
    live = LiveCollection(state, history, live_d["time"].to(cfg.device), live_d["step"].to(cfg.device))
    rng = payload["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    kind, key, *rest = rng["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    return Training(model, optimizer, live)


def load_model(payload: dict, cfg: Config) -> DtNetwork:
    """Only the network of a checkpoint payload (for simulation), in eval mode."""
    model = build_network(cfg, payload["live"]["mass"].shape[1]).to(cfg.device)
    model.load_state_dict(payload["model"])
    return model.eval()
