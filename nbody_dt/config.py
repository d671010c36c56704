"""One validated configuration tree for every layer: defaults, TOML loading, dotted overrides.

Each field carries its allowed range (or choices) and a one-line doc; `defaults_markdown()`
renders them as the single reference table (docs/CONFIG.md). An unknown key or an
out-of-range value raises ConfigError naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import torch


class ConfigError(ValueError):
    """A configuration key is unknown, missing or out of range."""


def _opt(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, choices: tuple | None = None, safe: bool = False) -> Any:
    """A config field: its default, doc line, range or choices, and whether a resumed run may change it."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices, "safe": safe}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class PhysicsConfig:
    G: float = _opt(1.0, "gravitational constant", lo=0.0, lo_open=True)
    softening: float = _opt(0.0, "Plummer softening length epsilon (0 = none)", lo=0.0)
    dim: int = _opt(2, "spatial dimensions", choices=(2, 3))


@dataclass
class InitialConditionsConfig:
    kind: str = _opt("kepler", "training systems: Kepler ensemble, Plummer spheres, free-fall three-body "
                     "ensemble, figure-eight, Pythagorean",
                     choices=("kepler", "plummer", "three_body", "figure8", "pythagorean"))
    num_orbits: int = _opt(64, "independent systems advanced together as one batch", lo=1, hi=1_000_000)
    e_range: list = _opt([0.0, 0.99], "Kepler eccentricity range [lo, hi], uniform", lo=0.0, hi=0.999)
    a_range: list = _opt([0.5, 2.0], "Kepler semi-major axis range [lo, hi], log-uniform", lo=1e-6, hi=1e6)
    m1: float = _opt(1.0, "Kepler primary mass", lo=0.0, lo_open=True)
    m2: float = _opt(1.0, "Kepler secondary mass", lo=0.0, lo_open=True)
    mass_range: list = _opt([1.0, 5.0], "three_body masses [lo, hi], uniform", lo=1e-6, hi=1e6)
    start: str = _opt("apocentre", "where Kepler orbits start", choices=("apocentre", "pericentre"))
    n_bodies: int = _opt(16, "bodies per Plummer sphere", lo=2, hi=4096)
    seed: int = _opt(0, "seed of the initial conditions (a torch generator seed: 64 bits)", lo=0, hi=2**64 - 1)


@dataclass
class ModelConfig:
    hidden: list = _opt([64, 64, 64], "hidden layer widths of the dt MLP", lo=1, hi=65536)
    activation: str = _opt("silu", "hidden activation", choices=("relu", "tanh", "silu", "gelu", "softplus"))
    features: str = _opt("rich", "input features: basic (normalized coordinates), rich (scale-free pair "
                         "features), delta_mag (rich + change against history; needs history_len > 0)",
                         choices=("basic", "rich", "delta_mag"))
    history_len: int = _opt(0, "past accepted states fed to the network (zero-padded before the first step)",
                            lo=0, hi=64)
    normalization: str = _opt("initial", "length/velocity/acceleration/time scales: derived once from the "
                              "initial training states ('initial') or all 1 ('none')",
                              choices=("initial", "none"))
    output: str = _opt("log_freefall", "dt parameterization: dt = t_ff * exp(out) ('log_freefall', "
                       "scale-free) or dt = time_scale * (softplus(out) + floor) ('softplus')",
                       choices=("log_freefall", "softplus"))
    dt_floor: float = _opt(1e-6, "softplus output floor, in units of the time scale", lo=0.0, lo_open=True)
    initial_dt: float = _opt(0.04, "dt of the untrained network, as a fraction of t_ff (log_freefall) or of the "
                             "time scale (softplus)", lo=0.0, hi=100.0, lo_open=True)
    fourier_features: int = _opt(0, "Gaussian Fourier feature pairs (0 = off)", lo=0, hi=4096)
    fourier_sigma: float = _opt(1.0, "std of the Gaussian Fourier frequencies", lo=0.0, lo_open=True)


@dataclass
class CollectConfig:
    energy_threshold: float = _opt(2e-4, "a step passes when its relative energy error is below this",
                                   lo=0.0, hi=1.0, lo_open=True)
    accept_lower: float = _opt(2.5e-5, "and at or above this (0 = the seed's one-sided rule)", lo=0.0, hi=1.0)
    steps_per_epoch: int = _opt(64, "accepted steps per system per epoch", lo=1, hi=10_000_000)
    max_retrain_steps: int = _opt(2000, "consecutive failed tries of one system before giving up (0 = unlimited)",
                                  lo=0)
    substeps: int = _opt(1, "KDK substeps per predicted dt", lo=1, hi=1024)
    accept_safe_after: int = _opt(200, "accept a step below accept_lower (safe, but under the band) after this many "
                                  "consecutive failed tries of its system (0 = never: the band strictly)", lo=0)


@dataclass
class LossConfig:
    kind: str = _opt("margin", "band: band loss on log(err) through the KDK step; regression: regress "
                     "log dt to the detached target log dt - (distance outside the band in log err) / exponent; "
                     "margin: regress log dt into dt_fraction_range x the threshold dt, extrapolated with the local "
                     "exponent that a probe step at probe_ratio x dt measures",
                     choices=("band", "regression", "margin"))
    lower: float = _opt(1e-4, "loss band lower edge on the relative energy error", lo=0.0, hi=1.0, lo_open=True)
    upper: float = _opt(1.3e-4, "loss band upper edge", lo=0.0, hi=1.0, lo_open=True)
    exponent: float = _opt(3.0, "local power law err ~ dt^exponent assumed by the regression loss (margin: the "
                           "smallest exponent it uses)", lo=0.5, hi=10.0)
    dt_fraction_range: list = _opt([0.84, 0.9], "margin: the loss band on dt, as fractions of the threshold dt "
                                   "(the dt whose error would reach collect.energy_threshold)", lo=0.01, hi=1.0)
    probe_ratio: float = _opt(1.1, "margin: dt ratio of the probe step that measures the local exponent", lo=1.0,
                              hi=2.0, lo_open=True)
    on: str = _opt("all", "samples that carry loss: every evaluated sample or only the failing ones (the seed)",
                   choices=("all", "failures"))
    nonfinite_penalty: float = _opt(10.0, "loss of a sample whose energy error is not finite", lo=0.0,
                                    lo_open=True)
    overshoot_weight: float = _opt(1.0, "weight of a sample above the band relative to one below it (> 1: "
                                   "cautious where dt is uncertain; 1: symmetric, the seed)", lo=0.0, hi=1000.0,
                                   lo_open=True)


@dataclass
class ReplayConfig:
    batch_size: int = _opt(512, "minibatch size", lo=1, hi=10_000_000)
    steps: int = _opt(1000, "iteration cap per replay stage", lo=0, hi=100_000_000)
    min_size: int = _opt(2, "skip replay while the window holds fewer rows", lo=1)
    window: str = _opt("all", "rows replayed: this epoch's, all, or the last `last_rows`",
                       choices=("epoch", "all", "last"))
    last_rows: int = _opt(100_000, "rows in the 'last' window", lo=1)
    verify: str = _opt("minibatch", "convergence: the last minibatch passes, or every window row passes",
                       choices=("minibatch", "full"))


@dataclass
class OptimizerConfig:
    name: str = _opt("adam", "optimizer", choices=("adam", "adamw"))
    lr: float = _opt(1e-3, "learning rate", lo=0.0, hi=10.0, lo_open=True)
    weight_decay: float = _opt(0.0, "weight decay", lo=0.0, hi=1.0)


@dataclass
class ComputeConfig:
    evaluator: str = _opt("local", "replay evaluator: in-process or a Dask cluster", choices=("local", "dask"),
                          safe=True)
    dask_address: str = _opt("", "scheduler address (empty: start a LocalCluster)", safe=True)
    dask_workers: int = _opt(2, "LocalCluster workers when no address is given", lo=1, hi=1024, safe=True)
    torch_threads: int = _opt(1, "torch intra-op threads of the training process (0 = torch's default)", lo=0,
                              hi=1024, safe=True)
    # Not resume-safe: the shards fix the order in which gradients are summed, hence the run's bits.
    reduction_shards: int = _opt(4, "replay minibatch shards, each evaluated on its own and their loss-sum "
                                 "gradients summed in shard order; every evaluator (local, Dask with any number of "
                                 "workers) computes the same shards, so its results are bitwise equal", lo=1, hi=65536)


@dataclass
class StorageConfig:
    keep_checkpoints: int = _opt(3, "checkpoints kept (older ones are pruned)", lo=1, hi=10_000, safe=True)
    chunk_rows: int = _opt(16384, "trajectory rows per Zarr chunk (measured: benchmarks/README.md)", lo=1,
                           hi=10_000_000)


@dataclass
class Config:
    epochs: int = _opt(24, "training epochs (may be raised when resuming)", lo=1, hi=1_000_000, safe=True)
    seed: int = _opt(0, "seed of weights, sampling and everything random in training (numpy's legacy seed: "
                     "32 bits)", lo=0, hi=2**32 - 1)
    dtype: str = _opt("float64", "floating point type of physics and network", choices=("float64", "float32"))
    device: str = _opt("cpu", "torch device of the driver (cpu, cuda, cuda:1, ...)", safe=True)
    physics: PhysicsConfig = field(default_factory=PhysicsConfig)
    initial_conditions: InitialConditionsConfig = field(default_factory=InitialConditionsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _describe_range(meta: dict, kind: type) -> str:
    if meta["choices"]:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    lo, hi = meta["lo"], meta["hi"]
    name = "an integer" if kind is int else "a number"
    if lo is None and hi is None:
        return name if kind in (int, float) else "a string"
    left = "(" if meta["lo_open"] else "["
    lo_s = "-inf" if lo is None else str(lo) if isinstance(lo, int) else f"{lo:g}"
    hi_s = "inf" if hi is None else str(hi) if isinstance(hi, int) else f"{hi:g}"
    return f"{name} in {left}{lo_s}, {hi_s}" + ("]" if hi is not None else ")")


def _coerce(key: str, value: Any, kind: type, meta: dict, default: Any) -> Any:
    """Check one leaf value against its declared type and range; returns the coerced value."""
    allowed = _describe_range(meta, kind)
    if isinstance(default, list):
        if not isinstance(value, (list, tuple)) or len(value) == 0:
            raise ConfigError(f"{key}: expected a non-empty list, got {value!r}")
        item_kind = type(default[0])
        items = [_coerce(f"{key}[{i}]", v, item_kind, meta, v) for i, v in enumerate(value)]
        if key.rsplit(".", 1)[-1].endswith("_range") and (len(items) != 2 or items[0] > items[1]):
            raise ConfigError(f"{key}: expected [lo, hi] with lo <= hi, got {value!r}")
        return items
    if kind is bool or isinstance(value, bool):
        raise ConfigError(f"{key}: expected {allowed}, got {value!r}")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ConfigError(f"{key}: expected {allowed}, got {value!r}")
    elif kind is float:
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected {allowed}, got {value!r}")
        value = float(value)
    elif kind is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected {allowed}, got {value!r}")
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{key}: expected {allowed}, got {value!r}")
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and (value < lo or (meta["lo_open"] and value == lo)):
        raise ConfigError(f"{key}: {value!r} is out of range, expected {allowed}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} is out of range, expected {allowed}")
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, f in known.items():
        key = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            sub = data.get(name, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"{key}: expected a table")
            kwargs[name] = _build(hints[name], sub, key + ".")
        elif name in data:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            kwargs[name] = _coerce(key, data[name], hints[name], f.metadata, default)
    return cls(**kwargs)


def _check_consistency(cfg: Config) -> None:
    if cfg.collect.accept_lower >= cfg.collect.energy_threshold:
        raise ConfigError("collect.accept_lower: must be below collect.energy_threshold "
                          f"({cfg.collect.accept_lower:g} >= {cfg.collect.energy_threshold:g})")
    if cfg.loss.lower >= cfg.loss.upper:
        raise ConfigError(f"loss.lower: must be below loss.upper ({cfg.loss.lower:g} >= {cfg.loss.upper:g})")
    if cfg.model.features == "delta_mag" and cfg.model.history_len == 0:
        raise ConfigError("model.features: 'delta_mag' needs model.history_len >= 1")
    ic = cfg.initial_conditions
    if ic.kind == "plummer" and cfg.physics.dim != 3:
        raise ConfigError("physics.dim: Plummer spheres need dim = 3")
    if ic.kind in ("figure8", "pythagorean") and ic.num_orbits != 1:
        raise ConfigError(f"initial_conditions.num_orbits: {ic.kind!r} is a single system, set it to 1")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"device: expected 'cpu', 'cuda', 'cuda:N' (N a device number) or 'mps', got {cfg.device!r}")


def from_dict(data: dict) -> Config:
    """Validate a plain nested dict (as read from TOML) into a Config."""
    cfg = _build(Config, data, "")
    _check_consistency(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """'replay.batch_size=256' -> ('replay.batch_size', 256); the value is read as TOML, else as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of `data` with dotted key=value overrides applied."""
    out = _deep_copy(data)
    for text in overrides:
        key, value = parse_override(text)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is not a table")
        node[parts[-1]] = value
    return out


def _deep_copy(data: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The embedded default (path None) or a TOML file, with overrides, validated."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {p} is a directory") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {p} is not UTF-8 text (TOML)") from None
        except OSError as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    return from_dict(apply_overrides(data, overrides or []))


def diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = sorted(set(old) | set(new))
    out: list[str] = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(prefix + k)
    return out


def safe_keys() -> set[str]:
    """Dotted keys a resumed run may change (epoch count, compute placement, retention)."""
    out = set()
    hints = get_type_hints(Config)
    for f in fields(Config):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= {f"{f.name}.{g.name}" for g in fields(hints[f.name]) if g.metadata.get("safe")}
        elif f.metadata.get("safe"):
            out.add(f.name)
    return out


def defaults_markdown() -> str:
    """The reference table of every key, its default, what is allowed and what it means."""
    lines = ["# Configuration reference", "",
             "Generated by `nbody-dt config --markdown` from `nbody_dt/config.py`; do not edit by hand.",
             "Keys marked *resume-safe* may differ when a run is resumed; any other change is refused.", ""]
    hints = get_type_hints(Config)

    def rows(cls: type, prefix: str) -> list[str]:
        out = []
        h = get_type_hints(cls)
        for f in fields(cls):
            if dataclasses.is_dataclass(h[f.name]):
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            safe = " *resume-safe*" if f.metadata.get("safe") else ""
            out.append(f"| `{prefix}{f.name}` | `{default!r}` | {_describe_range(f.metadata, h[f.name])} | "
                       f"{f.metadata['doc']}{safe} |")
        return out

    head = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    lines += ["## top level", ""] + head + rows(Config, "") + [""]
    for f in fields(Config):
        if dataclasses.is_dataclass(hints[f.name]):
            lines += [f"## [{f.name}]", ""] + head + rows(hints[f.name], f"{f.name}.") + [""]
    return "\n".join(lines)
