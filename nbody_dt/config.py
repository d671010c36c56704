"""One validated configuration tree for every layer: pydantic models, TOML loading, dotted overrides.

Each field carries its range (or choices, as a Literal), a description and, where a resumed run
may change it, a `resume_safe` mark; `defaults_markdown()` renders them from the models' JSON
schema as the single reference table (docs/CONFIG.md). The models are frozen. An unknown key or
an out-of-range value raises ConfigError: one line naming the key and what is allowed.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from annotated_types import Interval
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A configuration key is unknown, missing or out of range."""


def _number(value: Any) -> Any:
    """Numbers only: pydantic's lax mode would take True for 1 and the text '1e-3' for 0.001."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("not_a_number", "not a number")
    return value


Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number)]


def opt(default: Any, doc: str, *, safe: bool = False, **constraints: Any) -> Any:
    """A config field: its default, description, constraints, and whether a resumed run may change it."""
    return Field(default, description=doc, json_schema_extra={"resume_safe": True} if safe else None, **constraints)


class Section(BaseModel):
    """A frozen table of the config: unknown keys, NaN and infinities are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, validate_default=True)


def _ordered_pair(value: tuple) -> tuple:
    if value[0] > value[1]:
        raise ValueError(f"expected [lo, hi] with lo <= hi, got {list(value)!r}")
    return value


def _pair(lo: float, hi: float) -> Any:
    """The type of a [lo, hi] range whose ends both lie in [lo, hi]."""
    end = Annotated[float, Interval(ge=lo, le=hi), BeforeValidator(_number)]
    return tuple[end, end]


class PhysicsConfig(Section):
    G: Float = opt(1.0, "gravitational constant", gt=0)
    softening: Float = opt(0.01, "Plummer softening length epsilon (0 = none)", ge=0)
    dim: Literal[2, 3] = opt(3, "spatial dimensions")


Family = Literal["kepler", "hierarchical", "figure8", "free_fall", "plummer"]


class InitialConditionsConfig(Section):
    kind: Literal["kepler", "plummer", "three_body", "figure8", "pythagorean", "mixture"] = opt(
        "mixture", "training systems: Kepler ensemble, Plummer spheres, free-fall three-body ensemble, figure-eight, "
                  "Pythagorean, or a mixture of families and N (the families/family_* keys; needs model.kind = "
                  "'set')")
    num_orbits: Int = opt(64, "independent systems advanced together as one batch", ge=1, le=1_000_000)
    e_range: _pair(0.0, 0.999) = opt((0.0, 0.99), "Kepler eccentricity range [lo, hi], uniform")
    a_range: _pair(1e-6, 1e6) = opt((0.5, 2.0), "Kepler semi-major axis range [lo, hi], log-uniform")
    m1: Float = opt(1.0, "Kepler primary mass", gt=0)
    m2: Float = opt(1.0, "Kepler secondary mass", gt=0)
    mass_range: _pair(1e-6, 1e6) = opt((1.0, 5.0), "three_body masses [lo, hi], uniform")
    start: Literal["apocentre", "pericentre"] = opt("apocentre", "where Kepler orbits start")
    n_bodies: Int = opt(16, "bodies per Plummer sphere", ge=2, le=4096)
    families: tuple[Family, ...] = opt(
        ("kepler", "hierarchical", "hierarchical", "figure8", "free_fall", "free_fall", "plummer"),
        "mixture: one family per entry: kepler (N = 2, e and a stratified over e_range and a_range), hierarchical "
        "(inner binary + outer companions), figure8 (perturbed figure-eights, N = 3), free_fall (cold collapses, "
        "masses in mass_range), plummer (virialized spheres, dim = 3)", min_length=1)
    family_n: tuple[Annotated[int, Interval(ge=2, le=4096), BeforeValidator(_number)], ...] = opt(
        (2, 3, 4, 3, 3, 5, 16), "mixture: bodies of each entry's systems", min_length=1)
    family_weights: tuple[Annotated[float, Interval(gt=0, le=1e6), BeforeValidator(_number)], ...] = opt(
        (0.3, 0.15, 0.1, 0.1, 0.1, 0.05, 0.2), "mixture: share of num_orbits of each entry (normalized; at least "
                                               "one system each)", min_length=1)
    family_scale: tuple[Annotated[float, Interval(gt=1e-6, le=1e6), BeforeValidator(_number)], ...] = opt(
        (100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 1.0), "mixture: length scale of each entry's systems (scale-free "
        "orbits; a large scale makes physics.softening negligible for point-mass families while Plummer spheres "
        "keep it)", min_length=1)
    seed: Int = opt(0, "seed of the initial conditions (a torch generator seed: 64 bits)", ge=0, le=2**64 - 1)

    _ranges_ordered = field_validator("e_range", "a_range", "mass_range")(_ordered_pair)


class ModelConfig(Section):
    kind: Literal["mlp", "set"] = opt(
        "set", "dt network: 'mlp' (the flattened features of one fixed N) or 'set' (one encoder shared by every "
               "pair, pooled permutation-invariantly: any N, mixed-N batches)")
    hidden: tuple[Annotated[int, Interval(ge=1, le=65536), BeforeValidator(_number)], ...] = opt(
        (48, 48), "hidden layer widths of the dt MLP (set: of the shared pair encoder; its head has one hidden "
                      "layer of the last width)", min_length=1)
    pairs: Literal["all", "per_body", "system"] = opt(
        "system", "set: pairs encoded: all N(N-1)/2, the pair_k tightest (smallest free-fall time) of each body, or "
               "the pair_k tightest of the system")
    pair_k: Int = opt(8, "set: k of model.pairs = 'per_body' or 'system'", ge=1, le=1_000_000)
    pooling: Literal["attention", "error_sum"] = opt(
        "attention", "set: how the pair encodings become one dt: a softmin attention keyed by the pair timescale "
                     "plus an energy-weighted mean, into one head ('attention'), or a dt per pair whose errors add, "
                     "dt = (sum_p dt_p^-k)^(-1/k) with the order k learned ('error_sum'; measured less precise, "
                     "benchmarks/README.md)")
    pair_prior: str = opt(
        "", "set: a run URL or checkpoint file of a set network trained on two-body systems (configs/kepler_set.toml) "
            "with the same hidden widths and activation: its dt of each pair alone, the pairs' errors added by "
            "energy share, is the base this network learns to correct; copied into this run's checkpoints at the "
            "fresh start and never trained. Empty: the base is the smallest pair free-fall time")
    error_series: Int = opt(
        12, "set: order (>= 3) of the Taylor series in dt of the KDK step's energy error, computed from the start "
           "state alone (no trial step): the dt at which it reaches collect.energy_threshold is the base, which the "
           "network may only shorten, starting at the centre of loss.dt_fraction_range times it (order 12 finds "
           "the oracle's dt to < 1 % on the validation systems: benchmarks/README.md). Not with a pair prior or "
           "the error_sum pooling. 0: off (the base is the pair prior's dt, or the smallest pair free-fall time)",
        ge=0, le=16)
    series_margin: float = opt(
        0.01, "set, with error_series: the learned dt is at most (1 - series_margin) times the series' dt. The "
             "series' dt is where the step's error reaches the threshold, so a step at it lands on the tolerance's "
             "edge, where training leaves it (benchmarks/README.md, \"A faster series, a fixed-size pair set and a "
             "margin\"). 0: no margin",
        ge=0.0, lt=0.5)
    activation: Literal["relu", "tanh", "silu", "gelu", "softplus"] = opt("silu", "hidden activation")
    features: Literal["basic", "rich", "delta_mag"] = opt(
        "rich", "input features: basic (normalized coordinates), rich (scale-free pair features), delta_mag (rich + "
                "change against history; needs history_len > 0)")
    history_len: Int = opt(0, "past accepted states fed to the network (zero-padded before the first step)", ge=0,
                           le=64)
    normalization: Literal["initial", "none"] = opt(
        "initial", "length/velocity/acceleration/time scales: derived once from the initial training states "
                   "('initial') or all 1 ('none')")
    output: Literal["log_freefall", "softplus"] = opt(
        "log_freefall", "dt parameterization: dt = t_ff * exp(out) ('log_freefall', scale-free) or dt = time_scale * "
                        "(softplus(out) + floor) ('softplus')")
    dt_floor: Float = opt(1e-6, "softplus output floor, in units of the time scale", gt=0)
    initial_dt: Float = opt(0.04, "dt of the untrained network, as a fraction of t_ff (log_freefall) or of the time "
                                  "scale (softplus)", gt=0, le=100)
    fourier_features: Int = opt(0, "Gaussian Fourier feature pairs (0 = off)", ge=0, le=4096)
    fourier_sigma: Float = opt(1.0, "std of the Gaussian Fourier frequencies", gt=0)


class CollectConfig(Section):
    energy_threshold: Float = opt(2e-4, "a step passes when its relative energy error is below this", gt=0, le=1)
    accept_lower: Float = opt(2.5e-5, "and at or above this (0 = the seed's one-sided rule)", ge=0, le=1)
    steps_per_epoch: Int = opt(64, "accepted steps per system per epoch", ge=1, le=10_000_000)
    max_retrain_steps: Int = opt(2000, "consecutive failed tries of one system before giving up (0 = unlimited)",
                                 ge=0)
    substeps: Int = opt(1, "KDK substeps per predicted dt", ge=1, le=1024)
    accept_safe_after: Int = opt(200, "accept a step below accept_lower (safe, but under the band) after this many "
                                      "consecutive failed tries of its system (0 = never: the band strictly)", ge=0)
    on_stall: Literal["raise", "restart"] = opt(
        "restart", "a system failing more than max_retrain_steps tries in a row: end the stage with an error that "
                 "keeps its rows ('raise'), or start that system over from a fresh one of its family, drawn at a seed "
                 "derived from initial_conditions.seed, once per epoch ('restart')")


class LossConfig(Section):
    kind: Literal["band", "regression", "margin"] = opt(
        "margin", "band: band loss on log(err) through the KDK step; regression: regress log dt to the detached "
                  "target log dt - (distance outside the band in log err) / exponent; margin: regress log dt into "
                  "dt_fraction_range x the threshold dt, extrapolated with the local exponent that a probe step at "
                  "probe_ratio x dt measures")
    lower: Float = opt(1e-4, "loss band lower edge on the relative energy error", gt=0, le=1)
    upper: Float = opt(1.3e-4, "loss band upper edge", gt=0, le=1)
    exponent: Float = opt(3.0, "local power law err ~ dt^exponent assumed by the regression loss (margin: the "
                               "smallest exponent it uses)", ge=0.5, le=10)
    dt_fraction_range: _pair(0.01, 1.0) = opt(
        (0.84, 0.9), "margin: the loss band on dt, as fractions of the threshold dt (the dt whose error would reach "
                     "collect.energy_threshold)")
    probe_ratio: Float = opt(1.1, "margin: dt ratio of the probe step that measures the local exponent", gt=1, le=2)
    on: Literal["all", "failures"] = opt(
        "all", "samples that carry loss: every evaluated sample or only the failing ones (the seed)")
    nonfinite_penalty: Float = opt(10.0, "loss of a sample whose energy error is not finite", gt=0)
    overshoot_weight: Float = opt(1.0, "weight of a sample above the band relative to one below it (> 1: cautious "
                                       "where dt is uncertain; 1: symmetric, the seed)", gt=0, le=1000)

    _ranges_ordered = field_validator("dt_fraction_range")(_ordered_pair)


class ReplayConfig(Section):
    batch_size: Int = opt(256, "minibatch size", ge=1, le=10_000_000)
    steps: Int = opt(300, "iteration cap per replay stage", ge=0, le=100_000_000)
    final_steps: Int = opt(4000, "iteration cap of the last epoch's replay (0 = replay.steps): a long last replay "
                                 "undoes what the last collection's retraining did to the weights", ge=0,
                           le=100_000_000)
    min_size: Int = opt(2, "skip replay while the window holds fewer rows", ge=1)
    window: Literal["epoch", "all", "last"] = opt("all", "rows replayed: this epoch's, all, or the last `last_rows`")
    last_rows: Int = opt(100_000, "rows in the 'last' window", ge=1)
    verify: Literal["minibatch", "full"] = opt(
        "minibatch", "convergence: the last minibatch passes, or every window row passes")


class OptimizerConfig(Section):
    name: Literal["adam", "adamw"] = opt("adam", "optimizer")
    lr: Float = opt(1e-3, "learning rate", gt=0, le=10)
    weight_decay: Float = opt(0.0, "weight decay", ge=0, le=1)


class ComputeConfig(Section):
    evaluator: Literal["local", "dask"] = opt("local", "replay evaluator: in-process or a Dask cluster", safe=True)
    dask_address: str = opt("", "scheduler address (empty: start a LocalCluster)", safe=True)
    dask_workers: Int = opt(2, "LocalCluster workers when no address is given", ge=1, le=1024, safe=True)
    torch_threads: Int = opt(1, "torch intra-op threads of the training process (0 = torch's default)", ge=0,
                             le=1024, safe=True)
    # Not resume-safe: the shards fix the order in which gradients are summed, hence the run's bits.
    reduction_shards: Int = opt(4, "replay minibatch shards, each evaluated on its own and their loss-sum gradients "
                                   "summed in shard order; every evaluator (local, Dask with any number of workers) "
                                   "computes the same shards, so its results are bitwise equal", ge=1, le=65536)


class StorageConfig(Section):
    keep_checkpoints: Int = opt(3, "checkpoints kept (older ones are pruned)", ge=1, le=10_000, safe=True)
    chunk_rows: Int = opt(16384, "trajectory rows per Zarr chunk (measured: benchmarks/README.md)", ge=1,
                          le=10_000_000)


class Config(Section):
    """The whole configuration of a run (docs/CONFIG.md)."""

    epochs: Int = opt(24, "training epochs (may be raised when resuming)", ge=1, le=1_000_000, safe=True)
    seed: Int = opt(0, "seed of weights, sampling and everything random in training (numpy's legacy seed: 32 bits)",
                    ge=0, le=2**32 - 1)
    dtype: Literal["float64", "float32"] = opt("float64", "floating point type of physics and network")
    device: str = opt("cpu", "torch device of the driver (cpu, cuda, cuda:1, ...)", safe=True)
    physics: PhysicsConfig = PhysicsConfig()
    initial_conditions: InitialConditionsConfig = InitialConditionsConfig()
    model: ModelConfig = ModelConfig()
    collect: CollectConfig = CollectConfig()
    loss: LossConfig = LossConfig()
    replay: ReplayConfig = ReplayConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    compute: ComputeConfig = ComputeConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        collect, loss, ic = self.collect, self.loss, self.initial_conditions
        if collect.accept_lower >= collect.energy_threshold:
            raise ValueError("collect.accept_lower: must be below collect.energy_threshold "
                             f"({collect.accept_lower:g} >= {collect.energy_threshold:g})")
        if loss.lower >= loss.upper:
            raise ValueError(f"loss.lower: must be below loss.upper ({loss.lower:g} >= {loss.upper:g})")
        if self.model.features == "delta_mag" and self.model.history_len == 0:
            raise ValueError("model.features: 'delta_mag' needs model.history_len >= 1")
        if ic.kind == "plummer" and self.physics.dim != 3:
            raise ValueError("physics.dim: Plummer spheres need dim = 3")
        if ic.kind in ("figure8", "pythagorean") and ic.num_orbits != 1:
            raise ValueError(f"initial_conditions.num_orbits: {ic.kind!r} is a single system, set it to 1")
        if self.model.kind == "set" and self.model.history_len:
            raise ValueError("model.history_len: the set network takes no history (set it to 0)")
        if self.model.pair_prior and self.model.kind != "set":
            raise ValueError("model.pair_prior: only the set network (model.kind = 'set') takes a pair prior")
        if self.model.error_series and (self.model.kind != "set" or self.model.pair_prior
                                        or self.model.pooling != "attention"):
            raise ValueError("model.error_series: only the set network with the attention pooling and without a pair "
                             "prior takes the error series as its base")
        if self.model.series_margin and not self.model.error_series:
            raise ValueError("model.series_margin: a margin below the error series' dt needs model.error_series")
        if self.model.error_series and (1 - self.model.series_margin) <= math.sqrt(
                self.loss.dt_fraction_range[0] * self.loss.dt_fraction_range[1]):
            raise ValueError("model.series_margin: the network starts at the centre of loss.dt_fraction_range times "
                             "the series' dt, which must lie below 1 - series_margin")
        if 0 < self.model.error_series < 3:
            raise ValueError(f"model.error_series: the KDK step's error starts at dt^3, so the order must be 0 or at "
                             f"least 3, got {self.model.error_series}")
        if self.model.kind == "set" and self.model.output != "log_freefall":
            raise ValueError("model.output: the set network predicts log(dt / t_ff); set it to 'log_freefall'")
        if ic.kind == "mixture":
            _check_mixture(self)
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError("device: expected 'cpu', 'cuda', 'cuda:N' (N a device number) or 'mps', "
                             f"got {self.device!r}")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        """The plain nested dict (lists, not tuples) stored in run.json and checkpoints."""
        return self.model_dump(mode="json")


def _check_mixture(cfg: Config) -> None:
    """A mixture needs the set network, one entry in every family_* list, and each family's own N and dim."""
    ic = cfg.initial_conditions
    if cfg.model.kind != "set":
        raise ValueError("initial_conditions.kind: a 'mixture' of N needs model.kind = 'set' (the MLP takes one N)")
    lengths = (len(ic.families), len(ic.family_n), len(ic.family_weights), len(ic.family_scale))
    if len(set(lengths)) != 1:
        raise ValueError("initial_conditions.families: families, family_n, family_weights and family_scale must "
                         "have one entry each, got lengths {}, {}, {}, {}".format(*lengths))
    if ic.num_orbits < len(ic.families):
        raise ValueError(f"initial_conditions.num_orbits: {ic.num_orbits} is fewer than the {len(ic.families)} "
                         "mixture entries (one system each at least)")
    for k, (family, n) in enumerate(zip(ic.families, ic.family_n)):
        need = {"kepler": 2, "figure8": 3}.get(family)
        if need is not None and n != need:
            raise ValueError(f"initial_conditions.family_n[{k}]: family {family!r} has N = {need}, got {n}")
        if family == "plummer" and cfg.physics.dim != 3:
            raise ValueError(f"initial_conditions.families[{k}]: 'plummer' needs physics.dim = 3")


def _schema() -> dict:
    return Config.model_json_schema()


def _field_schema(loc: tuple) -> dict | None:
    """The JSON schema of the field at a validation error's location, or None."""
    schema, defs = _schema(), _schema()["$defs"]
    node = schema
    for part in loc:
        if "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        if isinstance(part, int):
            items = node.get("prefixItems") or [node.get("items", {})]
            node = items[min(part, len(items) - 1)]
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        else:
            return None
    return defs[node["$ref"].rsplit("/", 1)[-1]] if "$ref" in node else node


def _bound(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def describe(schema: dict) -> str:
    """What a field allows, in words, from its JSON schema: 'an integer in [1, 1e+07]', "one of 'a', 'b'"."""
    if "enum" in schema or "const" in schema:
        return "one of " + ", ".join(repr(c) for c in schema.get("enum", [schema.get("const")]))
    if schema.get("type") == "array":
        if "prefixItems" in schema:
            return f"[lo, hi] with lo <= hi, each {describe(schema['prefixItems'][0])}"
        return f"a non-empty list, each {describe(schema['items'])}"
    kind = {"integer": "an integer", "number": "a number", "string": "a string"}[schema["type"]]
    if schema["type"] == "string":
        return kind
    if "exclusiveMinimum" in schema:
        left = f"({_bound(schema['exclusiveMinimum'])}"
    else:
        left = f"[{_bound(schema['minimum'])}" if "minimum" in schema else "(-inf"
    right = f"{_bound(schema['maximum'])}]" if "maximum" in schema else "inf)"
    return f"{kind} in {left}, {right}"


def _key(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _error_line(error: dict) -> str:
    """One line for pydantic's first error: the dotted key, then what is wrong and what is allowed."""
    loc = tuple(error["loc"])
    if error["type"] == "missing" and loc and isinstance(loc[-1], int):
        loc = loc[:-1]  # a [lo, hi] pair given one element: report on the pair
    key, kind = _key(loc), error["type"]
    if kind == "extra_forbidden":
        parent = _field_schema(loc[:-1]) or {}
        return f"{key}: unknown key (known: {', '.join(sorted(parent.get('properties', {})))})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key}: expected a table"
    if kind == "value_error":
        message = str(error["ctx"]["error"])
        return f"{key}: {message}" if key else message
    schema = _field_schema(loc)
    allowed = describe(schema) if schema else error["msg"]
    return f"{key}: expected {allowed}, got {error['input']!r}"


def from_dict(data: dict) -> Config:
    """Validate a plain nested dict (as read from TOML) into a Config."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a table, got {data!r}")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_error_line(exc.errors()[0])) from None


BEFORE_GENERAL_DEFAULT = {
    "physics": {"dim": 2, "softening": 0.0},
    "initial_conditions": {"kind": "kepler",
                           "families": ["kepler", "hierarchical", "hierarchical", "figure8", "free_fall", "plummer"],
                           "family_n": [2, 3, 4, 3, 3, 16], "family_weights": [0.3, 0.15, 0.1, 0.1, 0.15, 0.2],
                           "family_scale": [100.0, 100.0, 100.0, 100.0, 100.0, 1.0]},
    "model": {"kind": "mlp", "hidden": [64, 64, 64], "pairs": "all", "error_series": 0, "series_margin": 0.0},
    "collect": {"on_stall": "raise"},
    "replay": {"batch_size": 512, "steps": 1000, "final_steps": 0},
}
"""The defaults of the keys that changed when the general model became the embedded default (the Kepler
MLP's before): a stored config that lacks one of them was written before that key existed, when it meant
this value."""


def from_stored(data: dict) -> Config:
    """A config as a run or checkpoint stored it: the keys it lacks (it predates them) take the values
    they had then (BEFORE_GENERAL_DEFAULT), not today's defaults; then `from_dict`."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a table, got {data!r}")
    return from_dict(on_top_of(BEFORE_GENERAL_DEFAULT, data))


def on_top_of(base: dict, data: dict) -> dict:
    """A config dict of sections: `data`'s keys, and `base`'s where `data` lacks them."""
    out = {section: dict(keys) for section, keys in base.items()}
    for key, value in data.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


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


def _leaves(model: type[BaseModel] = Config, prefix: str = ""):
    """(dotted key, field info) of every leaf key, in declaration order."""
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _leaves(info.annotation, f"{prefix}{name}.")
        else:
            yield prefix + name, info


def safe_keys() -> set[str]:
    """Dotted keys a resumed run may change (epoch count, compute placement, retention)."""
    return {key for key, info in _leaves() if (info.json_schema_extra or {}).get("resume_safe")}


def defaults_markdown() -> str:
    """The reference table of every key, its default, what is allowed and what it means."""
    lines = ["# Configuration reference", "",
             "Generated by `nbody-dt config --markdown` from `nbody_dt/config.py`; do not edit by hand.",
             "Keys marked *resume-safe* may differ when a run is resumed; any other change is refused.", ""]
    head = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    defaults, safe, section = Config().to_dict(), safe_keys(), None  # section: [] is the top level
    for key, info in _leaves():
        *group, name = key.split(".")
        if group != section:
            title = f"## [{group[0]}]" if group else "## top level"
            lines += ([""] if section is not None else []) + [title, ""] + head
            section = group
        default = defaults[group[0]][name] if group else defaults[name]
        mark = " *resume-safe*" if key in safe else ""
        allowed = describe(_field_schema((*group, name)))
        lines.append(f"| `{key}` | `{default!r}` | {allowed} | {info.description}{mark} |")
    return "\n".join(lines)
