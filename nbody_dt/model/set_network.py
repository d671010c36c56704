"""The set dt network: one encoder shared by every pair, pooled permutation-invariantly, any N.

Each selected pair (i, j) of a system is described by scale-free features that do not depend on
N or on the order of the bodies (`pair_set_features`); a shared MLP encodes each pair, and two
permutation-invariant pools summarize the set:

- a softmin attention keyed by the pair's timescale, log(t_ff / t_min) times a learned
  temperature, plus a learned score: the tightest pairs dominate;
- a mean weighted by each pair's share of the binding energy |W|: a summary of the rest in which
  a far, light body weighs nothing (the step's energy error is relative to |E|).

A head maps the two pooled vectors to log(dt / t_min) as the MLP does (t_min: the smallest pair
free-fall time), so the same weights run at any N. Padded bodies (zero mass) are masked out.

`pooling = "error_sum"` replaces the attention pool and head by the structure of the step's error:
each pair p gets its own dt_p (a head on its encoding and the energy-weighted summary of the rest:
the dt at which that pair's share of the error alone would reach the threshold), and the errors
of the pairs, err_p ~ (dt / dt_p)^k, add up: dt = (sum_p dt_p^-k)^(-1/k), a soft minimum whose
order k is learned. For one pair it is the Kepler MLP's form, dt = t_ff exp(out).

Which pairs are encoded is configurable (model.pairs): all N(N-1)/2, the k tightest of each body
(at most N k), or the k tightest of the system.

With a pair prior (model.pair_prior, `PairPrior`) the head's output corrects the prior's dt instead
of t_min: a frozen two-body network read on every pair alone, the pairs' errors added by energy
share, dt = (sum_p share_p dt_p^-3)^(-1/3); for one pair it is the two-body network itself.

With an error series (model.error_series, `nbody_dt.physics.error_series`) the base is instead the
dt at which the Taylor series of the step's own energy error reaches the threshold: physics that
predicts the oracle's dt from the start state, which the network learns to correct.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nbody_dt.config import Config
from nbody_dt.model import pair_kernel
from nbody_dt.model.history import History
from nbody_dt.model.network import ACTIVATIONS, LOG_DT_BOUND, DtNetwork
from nbody_dt.physics.error_series import StepSeries, series_dt, step_series
from nbody_dt.physics.gravity import Gravity, accelerations, kinetic_energy, pair_indices, potential_energy
from nbody_dt.physics.series_kernel import as_array, as_tensor
from nbody_dt.physics.state import State

PAIR_FEATURES = 9
PAIR_SELECTIONS = ("all", "per_body", "system")
POOLINGS = ("attention", "error_sum")
_TINY = 1e-30
PRIOR_ERROR_ORDER = 3.0
"""The pair prior adds the pairs' errors as dt^3: the KDK step's single-step energy error law."""


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x on the real selected pairs, the most negative float elsewhere (no weight in a softmax)."""
    return torch.where(mask, x, torch.full_like(x, torch.finfo(x.dtype).min))


def _freefall(r2: torch.Tensor, mass: torch.Tensor, gravity: Gravity, i: torch.Tensor,
              j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsoftened pair free-fall times (B, P) from the squared separations r2 of the pairs (i, j) (+inf
    for pairs with padding) and the real-pair mask."""
    t = torch.sqrt(r2 * r2.sqrt() / (gravity.G * (mass[:, i] + mass[:, j]))).clamp_min(_TINY)
    real = (mass[:, i] != 0) & (mass[:, j] != 0)
    return torch.where(real, t, torch.full_like(t, math.inf)), real


def select_pairs(t_ff: torch.Tensor, n: int, how: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, K) into the N(N-1)/2 pair list of the pairs to encode and which of them count
    (B, K): all, the k tightest of each body (their union: at most N k, the rest of the K slots
    filled and not counted), or the k tightest of the system."""
    b, p = t_ff.shape
    if how == "all" or p <= k:
        idx = torch.arange(p, device=t_ff.device).expand(b, p)
        return idx, torch.ones_like(idx, dtype=torch.bool)
    if how == "system":
        idx = torch.topk(t_ff, k, dim=1, largest=False).indices
        return idx, torch.ones_like(idx, dtype=torch.bool)
    if how != "per_body":
        raise ValueError(f"unknown pair selection {how!r} (expected one of {', '.join(PAIR_SELECTIONS)})")
    i, j = pair_indices(n, t_ff.device)
    full = t_ff.new_full((b, n, n), math.inf)
    full[:, i, j] = t_ff
    full[:, j, i] = t_ff
    kk = min(k, n - 1)
    nearest = torch.topk(full, kk, dim=2, largest=False).indices  # (B, N, k)
    chosen = torch.zeros(b, n, n, dtype=torch.bool, device=t_ff.device)
    chosen.scatter_(2, nearest, True)
    chosen = chosen | chosen.transpose(1, 2)
    picked = chosen[:, i, j]  # (B, P)
    key = torch.where(picked, t_ff, t_ff + math.inf)  # chosen pairs first, in order of t_ff
    idx = torch.topk(key, min(p, n * kk), dim=1, largest=False).indices
    return idx, picked.gather(1, idx)


class PairSet(NamedTuple):
    """The selected pairs of a batch of systems, as the set network reads them."""

    features: torch.Tensor
    """(B, K, PAIR_FEATURES), zero where not a real selected pair."""
    mask: torch.Tensor
    """(B, K): real selected pairs."""
    t_min: torch.Tensor
    """(B,): the smallest pair free-fall time of each system (over all pairs)."""
    t_ff: torch.Tensor
    """(B, K): each pair's free-fall time (t_min where not a real pair)."""
    energy_share: torch.Tensor
    """(B, K): |E_pair| / |E|, the pair's two-body energy against the system's."""


def pair_set_features(state: State, gravity: Gravity, how: str = "all", k: int = 8,
                      start: StepSeries | None = None) -> PairSet:
    """The features, mask, timescales and energy shares of the selected pairs (`PairSet`); the
    start force, energies and pair separations are read from `start` when given (the error series
    has computed them) instead of computed again.

    Per pair, all scale-free: log(v^2 r / G m), log|1 - v^2 r / 2 G m| (log r / 2a when bound),
    the radial cosine, log(t_ff / t_min), the pair's mass fraction m / M, the mass ratio
    min/max, log1p(eps^2 / r^2), the tidal field of the other bodies on the pair, log(|a_ext| r^2 /
    G m) with a_ext the relative acceleration less the pair's own, and log of the pair's share of
    the binding energy, G m_i m_j / r / |W|.

    On the CPU the selections "system" and "all" come from the compiled kernel
    (`pair_kernel.tightest_pair_features`, float64), elsewhere from `pair_set_features_torch`.
    """
    if state.position.device.type == "cpu" and how in ("system", "all"):
        return _pair_set_kernel(state, gravity, how, k, start)
    return pair_set_features_torch(state, gravity, how, k, start)


def _start_terms(state: State, gravity: Gravity) -> StepSeries:
    """The start force, energies and pair separations the features read, computed here when no error
    series has (coefficients None)."""
    x = state.position
    i, j = pair_indices(x.shape[1], x.device)
    dx = x[:, j] - x[:, i]
    return StepSeries(None, accelerations(x, state.mass, gravity), kinetic_energy(state),
                      potential_energy(state, gravity), (dx * dx).sum(-1))


def _pair_set_kernel(state: State, gravity: Gravity, how: str, k: int, start: StepSeries | None) -> PairSet:
    """`pair_set_features` from the compiled CPU kernel (`pair_kernel`), in float64."""
    x = state.position
    start = _start_terms(state, gravity) if start is None else start
    k = x.shape[1] ** 2 if how == "all" else k
    out = pair_kernel.tightest_pair_features(
        as_array(x), as_array(state.velocity), as_array(state.mass), as_array(start.acceleration),
        as_array(start.kinetic), as_array(start.potential), as_array(start.separation2), float(gravity.G),
        float(gravity.softening) ** 2, k)
    return PairSet(*(as_tensor(a, x.dtype) for a in out))


def pair_set_features_torch(state: State, gravity: Gravity, how: str = "all", k: int = 8,
                            start: StepSeries | None = None) -> PairSet:
    """`pair_set_features` in torch operations, on any device and for every selection: the reference
    implementation."""
    x, v, m = state.position, state.velocity, state.mass
    n = x.shape[1]
    i_all, j_all = pair_indices(n, x.device)
    start = _start_terms(state, gravity) if start is None else start
    t_all, _ = _freefall(start.separation2, m, gravity, i_all, j_all)
    t_min = t_all.min(-1).values
    sel, counted = select_pairs(t_all, n, how, k)
    i, j = i_all[sel], j_all[sel]  # (B, K)
    t_ff = t_all.gather(1, sel)
    mask = torch.isfinite(t_ff) & counted

    def take(a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return a.gather(1, idx[..., None].expand(-1, -1, a.shape[-1]))

    dx, dv = take(x, j) - take(x, i), take(v, j) - take(v, i)
    mi, mj = m.gather(1, i), m.gather(1, j)
    r2 = (dx * dx).sum(-1).clamp_min(_TINY)
    v2 = (dv * dv).sum(-1)
    r = r2.sqrt()
    mp = (mi + mj).clamp_min(_TINY)
    gm = gravity.G * mp
    eps2 = gravity.softening ** 2
    da = take(start.acceleration, j) - take(start.acceleration, i)
    own = -gm[..., None] * dx * (r2 + eps2).pow(-1.5)[..., None]
    tidal = (da - own).norm(dim=-1) * (r2 + eps2) / gm
    binding = (-start.potential).clamp_min(_TINY)[:, None]
    pair_potential = gravity.G * mi * mj * (r2 + eps2).rsqrt()
    share = pair_potential / binding
    pair_energy = 0.5 * mi * mj / mp * v2 - pair_potential
    energy = (start.kinetic + start.potential).abs().clamp_min(_TINY)[:, None]
    t_safe = torch.where(mask, t_ff, t_min[:, None])
    feats = torch.stack([
        torch.log(v2 * r / gm + 1e-12),
        torch.log(torch.abs(1 - 0.5 * v2 * r / gm) + 1e-4),
        (dx * dv).sum(-1) / (r * v2.sqrt() + _TINY),
        torch.log(t_safe / t_min[:, None]),
        mp / m.sum(-1, keepdim=True),
        torch.minimum(mi, mj) / torch.maximum(mi, mj).clamp_min(_TINY),
        torch.log1p(eps2 / r2),
        torch.log(tidal + 1e-12),
        torch.log(share + 1e-300),
    ], -1)
    feats = torch.where(mask[..., None], feats, torch.zeros_like(feats))
    return PairSet(feats, mask, t_min, t_safe, pair_energy.abs() / energy)


class PairPrior(nn.Module):
    """A frozen two-body dt: the encoder and head of a set network trained on lone pairs (a Kepler
    run), applied to every selected pair of a system as if that pair were alone.

    A lone pair's features differ from a pair's in a system only in four places: its timescale is
    the system's smallest (log t_ff / t_min = 0), it holds all the mass and all the binding energy,
    and no other body pulls on it (the tidal feature at its floor, log 1e-12). The prior reads the
    pair with those four set so; the speed feature is floored at the slowest apocentre of the
    Kepler training (v^2 r / G m = 0.01, e = 0.99), so that a pair at rest is read as the nearest
    state the prior has seen. The weights are buffers: saved and loaded with the network, never
    trained. Returns log(dt_pair / t_ff) per pair, as the two-body network itself would.
    """

    LONE_PAIR = {3: 0.0, 4: 1.0, 7: math.log(1e-12), 8: 0.0}
    SPEED_FLOOR = math.log(0.01)

    def __init__(self, hidden: list[int], activation: str, dtype: torch.dtype):
        super().__init__()
        self.act = ACTIVATIONS[activation]()
        widths = [PAIR_FEATURES, *hidden]
        self.encoder_layers = len(hidden)
        for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            self.register_buffer(f"encoder_{2 * k}_weight", torch.zeros(b, a, dtype=dtype))
            self.register_buffer(f"encoder_{2 * k}_bias", torch.zeros(b, dtype=dtype))
        w = widths[-1]
        for name, shape in (("head_0_weight", (w, 2 * w)), ("head_0_bias", (w,)), ("head_2_weight", (1, w)),
                            ("head_2_bias", (1,))):
            self.register_buffer(name, torch.zeros(*shape, dtype=dtype))

    def load_network(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy a two-body set network's encoder and head (its state_dict) into the prior;
        ValueError (one line) when the shapes differ."""
        for name, buf in self.named_buffers():
            key = name.replace("_", ".")
            src = weights.get(key)
            if src is None or tuple(src.shape) != tuple(buf.shape):
                raise ValueError(f"the pair prior needs a set network of the same hidden widths ({key}: expected "
                                 f"shape {tuple(buf.shape)}, found {None if src is None else tuple(src.shape)})")
            with torch.no_grad():
                buf.copy_(src.to(dtype=buf.dtype, device=buf.device))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        lone = features.clone()
        lone[..., 0] = lone[..., 0].clamp_min(self.SPEED_FLOOR)
        for column, value in self.LONE_PAIR.items():
            lone[..., column] = value
        h = lone
        for k in range(self.encoder_layers):
            h = self.act(F.linear(h, getattr(self, f"encoder_{2 * k}_weight"), getattr(self, f"encoder_{2 * k}_bias")))
        h = self.act(F.linear(torch.cat([h, h], -1), self.head_0_weight, self.head_0_bias))
        out = F.linear(h, self.head_2_weight, self.head_2_bias)[..., 0]
        return LOG_DT_BOUND * torch.tanh(out / LOG_DT_BOUND)


class SetDtNetwork(nn.Module):
    """dt = t_min exp(B tanh(o / B)), o from the pooled pair encodings; takes any N >= 2 and dim."""

    def __init__(self, hidden: list[int], activation: str, gravity: Gravity, pairs: str = "all", pair_k: int = 8,
                 initial_dt: float = 0.04, dtype: torch.dtype = torch.float64, pooling: str = "attention",
                 pair_prior: bool = False, error_series: int = 0, threshold: float = 2e-4,
                 series_fraction: float = 0.87, series_margin: float = 0.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r} (expected one of {', '.join(POOLINGS)})")
        self.gravity, self.pairs, self.pair_k, self.pooling = gravity, pairs, pair_k, pooling
        self.history_len = 0
        self.output = "log_freefall"
        self.error_series, self.threshold = error_series, threshold
        self.log_series_ceiling = math.log1p(-series_margin)  # log of the largest fraction of the series' dt
        act = ACTIVATIONS[activation]
        layers: list[nn.Module] = []
        width = PAIR_FEATURES
        for h in hidden:
            layers += [nn.Linear(width, h, dtype=dtype), act()]
            width = h
        self.encoder = nn.Sequential(*layers)
        head = nn.Linear(width, 1, dtype=dtype)
        # With a pair prior the network corrects the prior's dt and starts at no correction. With an
        # error series it only shortens the series' dt (`_log_dt`), starting at series_fraction of it in
        # every state: the series finds the oracle's dt, so the network learns only where it misses.
        self.prior = PairPrior(hidden, activation, dtype) if pair_prior else None
        with torch.no_grad():
            if error_series:
                head.weight.zero_()
                # softplus(bias) = log(ceiling / fraction): the network starts at series_fraction of the series' dt
                head.bias.fill_(math.log(math.expm1(self.log_series_ceiling - math.log(series_fraction))))
            else:
                head.weight.mul_(0.1)
                head.bias.fill_(0.0 if pair_prior else math.log(initial_dt))
        # attention: the head reads the two pooled vectors; error_sum: each pair's encoding and the
        # summary of the rest.
        self.head = nn.Sequential(nn.Linear(2 * width, width, dtype=dtype), act(), head)
        # The scalar parameters are (1,), not 0-d: a 0-d gradient would not survive the Dask
        # evaluator's NumPy sums.
        if pooling == "attention":
            self.score = nn.Linear(width, 1, dtype=dtype)
            with torch.no_grad():
                self.score.weight.mul_(0.1)
            self.temperature = nn.Parameter(torch.full((1,), 3.0, dtype=dtype))
        else:
            self.log_order = nn.Parameter(torch.full((1,), math.log(3.0), dtype=dtype))  # k = 3: KDK's error
        self.register_buffer("scales", torch.ones(4, dtype=dtype))  # unused; kept for a uniform checkpoint
        if pair_prior:
            # how far the base follows the prior from t_min, learned from the energy-weighted summary;
            # starts at 0.98 (the prior's dt)
            self.trust = nn.Linear(width, 1, dtype=dtype)
            with torch.no_grad():
                self.trust.weight.mul_(0.1)
                self.trust.bias.fill_(4.0)

    def for_gravity(self, gravity: Gravity) -> SetDtNetwork:
        """The same weights (shared, not copied) reading the pair features of systems under another
        force law: softening is a property of the system, and the features see it scale-free."""
        other = copy.copy(self)
        other.gravity = gravity
        return other

    def at_threshold(self, threshold: float) -> SetDtNetwork:
        """The same weights for another per-step tolerance: with an error series the series is read at
        `threshold` (the learned correction, a fraction of the series' dt, is kept); without one the
        network's dt does not depend on it (the caller scales it)."""
        other = copy.copy(self)
        other.threshold = threshold
        return other

    def check_takes(self, state: State) -> None:
        """ValueError (one line) unless every system has at least two bodies of non-zero mass."""
        if state.num_bodies < 2 or bool(((state.mass != 0).sum(-1) < 2).any()):
            raise ValueError("the set dt network needs systems of at least 2 bodies of non-zero mass")

    def set_scales(self, state: State) -> None:
        """Nothing to derive: every input is scale-free."""

    def log_dt(self, state: State, history: History | None = None) -> torch.Tensor:
        """log of the predicted dt, shape (B,).

        A padded batch (systems of different N, zero-mass bodies) is evaluated in buckets of equal
        body count, each trimmed to its own N: the pair encoder then never runs on padding, which
        would otherwise cost N_max(N_max - 1)/2 pairs for every system (benchmarks/README.md).
        """
        present = state.mass != 0
        counts = present.sum(-1)
        if bool((counts == state.num_bodies).all()):
            return self._log_dt(state)
        order = torch.sort((~present).to(torch.int8), dim=1, stable=True).indices  # real bodies first
        out = state.mass.new_empty(state.batch_size)
        for n in torch.unique(counts).tolist():
            rows = torch.nonzero(counts == n)[:, 0]
            keep = order[rows, :n]
            sub = State(state.position[rows[:, None], keep], state.velocity[rows[:, None], keep],
                        state.mass[rows[:, None], keep])
            out = out.index_put((rows,), self._log_dt(sub))
        return out

    def _log_dt(self, state: State) -> torch.Tensor:
        start = None
        if self.error_series:
            with torch.no_grad():  # physics of the state: nothing to learn through it
                start = step_series(state, self.gravity, self.error_series)
        pairs = pair_set_features(state, self.gravity, self.pairs, self.pair_k, start)
        feats, mask = pairs.features, pairs.mask
        h = self.encoder(feats)
        # the energy-weighted summary (B, W)
        rest = (torch.softmax(_masked(feats[..., 8], mask), dim=1)[..., None] * h).sum(1)
        if self.pooling == "attention":
            attention = torch.softmax(_masked(self.score(h)[..., 0] - self.temperature * feats[..., 3], mask), dim=1)
            out = self.head(torch.cat([(attention[..., None] * h).sum(1), rest], -1))[:, 0]
        else:
            # log(dt_p / t_min) = log(t_ff,p / t_min) + head; dt = (sum_p dt_p^-k)^(-1/k)
            per_pair = feats[..., 3] + self.head(torch.cat([h, rest[:, None].expand_as(h)], -1))[..., 0]
            k = self.log_order.exp()
            out = -torch.logsumexp(_masked(-k * per_pair, mask), dim=1) / k
        if self.error_series:
            # the series' dt is where the step's error reaches the threshold: never step beyond it (less the margin)
            base = torch.log(series_dt(start.coefficients, self.threshold, pairs.t_min))
            return base + self.log_series_ceiling - F.softplus(out)
        return self._log_base(pairs, rest) + LOG_DT_BOUND * torch.tanh(out / LOG_DT_BOUND)

    def _log_base(self, pairs: PairSet, rest: torch.Tensor) -> torch.Tensor:
        """log of the dt the network corrects without an error series (whose base is the dt at which
        the series of the step's energy error reaches the threshold): the smallest pair free-fall
        time; or with a pair prior a learned share (the trust, in (0, 1)) of the way from t_min to
        the prior's dt, the dt at which the pairs' errors, each (dt / dt_pair)^3 weighted by the
        pair's energy share, add up to the threshold: dt = (sum_p share_p dt_p^-3)^(-1/3)."""
        log_t_min = torch.log(pairs.t_min)
        if self.prior is None:
            return log_t_min
        log_dt_pair = torch.log(pairs.t_ff) + self.prior(pairs.features)
        log_error = torch.log(pairs.energy_share.clamp_min(_TINY)) - PRIOR_ERROR_ORDER * log_dt_pair
        log_prior = -torch.logsumexp(_masked(log_error, pairs.mask), dim=1) / PRIOR_ERROR_ORDER
        return log_t_min + torch.sigmoid(self.trust(rest)[:, 0]) * (log_prior - log_t_min)

    def forward(self, state: State, history: History | None = None) -> torch.Tensor:
        return torch.exp(self.log_dt(state, history))


def build_network(cfg: Config, num_bodies: int) -> DtNetwork | SetDtNetwork:
    """The dt network the config names: the fixed-N MLP (model.kind = 'mlp', its input size set by
    num_bodies) or the set network (model.kind = 'set', any N)."""
    m = cfg.model
    if m.kind == "set":
        return SetDtNetwork(list(m.hidden), m.activation, Gravity(cfg.physics.G, cfg.physics.softening), m.pairs,
                            m.pair_k, m.initial_dt, cfg.torch_dtype, m.pooling, pair_prior=bool(m.pair_prior),
                            error_series=m.error_series, threshold=cfg.collect.energy_threshold,
                            series_fraction=math.sqrt(cfg.loss.dt_fraction_range[0] * cfg.loss.dt_fraction_range[1]),
                            series_margin=m.series_margin)
    return DtNetwork.from_config(cfg, num_bodies)
