"""The single-step energy error of a KDK step as a power series in dt, from the start state alone.

One KDK step from (x, v) by h ends at x1(h) = x + h v + h^2 a0 / 2 (a polynomial in h) with
v1(h) = v + h a0 / 2 + h a(x1(h)) / 2, so E(x1, v1) - E0 is a function of h whose Taylor
coefficients follow from pairwise sums over the start state: every pair's squared separation
s(h) = |dx(h)|^2 + eps^2 is a polynomial of degree 4, and s^(-1/2) (the potential) and s^(-3/2)
(the end kick's force) are expanded by the power recurrence of truncated series. The KDK step's
error starts at h^3; higher orders carry the sign cancellations between pairs that set where the
error first reaches a threshold. This costs no trial step. On the CPU the series and its dt come
from compiled loops (`series_kernel`: 0.4-0.9x a torch force evaluation at N = 16-1024); the
torch implementation below (`step_series_torch`, `series_dt_torch`) is the reference they
are tested against and the path on other devices, where at order 12 a call's roughly 800 torch
operations cost 8-20 force evaluations at N <= 64 and about 3 from N = 256 up
(benchmarks/README.md, "Where a learned step's time goes", "A compiled series").
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

from nbody_dt.physics import series_kernel
from nbody_dt.physics.crossing import first_crossing
from nbody_dt.physics.gravity import Gravity, min_freefall_time, pair_indices
from nbody_dt.physics.state import State


def _antidiagonals(terms: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(terms^2, terms) of 0/1: entry (a, b) of a Gram matrix of two series adds to order a + b."""
    k = torch.arange(terms, device=device)
    return (k[:, None, None] + k[None, :, None] == k[None, None, :]).reshape(terms * terms, terms).to(dtype)


class StepSeries(NamedTuple):
    """The series of a step's error and the start-state terms it computes on the way, which the set
    network's pair features read instead of computing them again."""

    coefficients: torch.Tensor
    """(B, order + 1): c_k of (E(h) - E0) / |E0| (`energy_error_series`)."""
    acceleration: torch.Tensor
    """(B, N, D): the start force per unit mass."""
    kinetic: torch.Tensor
    """(B,): the start kinetic energy."""
    potential: torch.Tensor
    """(B,): the start potential energy."""
    separation2: torch.Tensor
    """(B, N(N-1)/2): |x_j - x_i|^2 (unsoftened) of the pairs i < j in `torch.triu_indices` order."""


FAR_ORDER = 4
"""Pairs far from the step's scale are expanded to this order only: on Plummer spheres of 8-256
bodies and hierarchical systems the series' dt moved by at most 1.2e-4 (benchmarks/README.md,
"Where a learned step's time goes")."""
TIGHT_RATIO = 8.0
"""Pairs whose radius of convergence is within this factor of the system's smallest are expanded to
the full order."""
TIERED_FROM_BODIES = 48
"""Systems of fewer bodies are expanded fully: most of their pairs are tight (26-80 % at N = 8-32)
and selecting them costs more than it saves."""


@functools.lru_cache(maxsize=8)
def _pair_indices(n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The pairs i < j of N bodies (`pair_indices`) and the flat (N N) indices of their entries (i, j)
    and (j, i); cached."""
    i, j = pair_indices(n, device)
    return i, j, i * n + j, j * n + i


def _power_terms(f: torch.Tensor, ratio: torch.Tensor, first: int) -> None:
    """Fill f[first:] (K, 2, B, P) in place with the terms of s^alpha, alpha = -1/2 and -3/2, from
    f[:first] and ratio[j - 1] = s_j / s_0 (4, B, P): the power recurrence
    f_k = sum_{j=1..min(4,k)} (alpha j - (k - j)) / k * (s_j / s0) f_{k-j}, as fused multiply-adds."""
    rows = [row.unbind(0) for row in f.unbind(0)]  # views made once: at small N indexing costs more than arithmetic
    ratio = ratio.unbind(0)
    for k in range(first, f.shape[0]):
        for a, alpha in enumerate((-0.5, -1.5)):
            for jj in range(1, min(4, k) + 1):
                rows[k][a].addcmul_(ratio[jj - 1], rows[k - jj][a], value=(alpha * jj - (k - jj)) / k)


def _tight_pairs(ratio: torch.Tensor, real: torch.Tensor, tight_ratio: float) -> torch.Tensor:
    """Indices (B, M) of the pairs whose expansion reaches the step's scale: those whose radius of
    convergence, estimated as min_j |s_0 / s_j|^(1/j), is below tight_ratio times the system's
    smallest; M is the largest count over the batch (the rest of a row: its next-tightest pairs, by
    max_j |s_j / s_0| / c^j)."""
    r = ratio.abs() * real  # padding: never tight
    # 1 / radius = max_j |s_j / s_0|^(1/j); the roots are taken of each row's largest terms only:
    # a pair is tight when some |s_j / s_0| exceeds c^j, c = the row's largest 1 / radius / tight_ratio
    powers = torch.arange(1, 5, dtype=r.dtype, device=r.device)[:, None]
    c = (r.amax(-1).pow(1 / powers).amax(0) / tight_ratio).clamp_min(torch.finfo(r.dtype).tiny)  # (B,)
    scaled = r / c[:, None].pow(powers[:, :, None])
    tightness = torch.maximum(torch.maximum(scaled[0], scaled[1]), torch.maximum(scaled[2], scaled[3]))
    count = max(1, int((tightness > 1).sum(-1).max()))
    return torch.topk(tightness, count, dim=-1).indices


def energy_error_series(state: State, gravity: Gravity, order: int = 12, far_order: int = FAR_ORDER,
                        tight_ratio: float = TIGHT_RATIO) -> torch.Tensor:
    """Taylor coefficients c_0..c_order of (E(KDK step by h) - E0) / |E0| in h, shape (B, order + 1)."""
    return step_series(state, gravity, order, far_order, tight_ratio).coefficients


def step_series(state: State, gravity: Gravity, order: int = 12, far_order: int = FAR_ORDER,
                tight_ratio: float = TIGHT_RATIO) -> StepSeries:
    """Taylor coefficients c_0..c_order of (E(KDK step by h) - E0) / |E0| in h, shape (B, order + 1),
    with the start-state terms they are built from (`StepSeries`): on the CPU from the compiled
    kernel (`series_kernel`, in float64 whatever the state's dtype), elsewhere from the torch
    implementation (`step_series_torch`, the reference the kernel is tested against)."""
    x = state.position
    if x.device.type != "cpu":
        return step_series_torch(state, gravity, order, far_order, tight_ratio)
    tiered = far_order < order and x.shape[1] >= TIERED_FROM_BODIES
    out = series_kernel.step_series(series_kernel.as_array(x, 3), series_kernel.as_array(state.velocity, 3),
                                    series_kernel.as_array(state.mass), float(gravity.G),
                                    float(gravity.softening) ** 2, order, far_order, tight_ratio, tiered)
    coefficients, acceleration, kinetic, potential, separation2 = (series_kernel.as_tensor(a, x.dtype) for a in out)
    return StepSeries(coefficients, acceleration[..., :x.shape[-1]], kinetic, potential, separation2)


def step_series_torch(state: State, gravity: Gravity, order: int = 12, far_order: int = FAR_ORDER,
                      tight_ratio: float = TIGHT_RATIO) -> StepSeries:
    """`step_series` in torch operations, on any device: the reference implementation.

    c_0 is 0 and c_1, c_2 vanish up to round-off (the step is second order). Padding (zero mass) is
    ignored as everywhere in physics. Each pair i < j is expanded once, its coefficients first and the
    pairs along the last axis (contiguous arithmetic); the sums over bodies are matrix products. The
    power recurrence runs in place on fused multiply-adds (no temporaries the size of the pair set:
    at N >= 256 those cost more than the arithmetic), so the series is not differentiable.

    Only the pairs whose expansion converges slowest at the step's scale need every order: a pair's
    terms fall as (h / rho)^k with rho its radius of convergence, so the pairs with rho below
    `tight_ratio` times the system's smallest are expanded to `order` and the rest to `far_order`
    (at N = 256 some 2 % of the pairs are tight; the dt moves by at most 1.2e-4). Every pair is
    expanded fully when far_order >= order, below TIERED_FROM_BODIES bodies, or when more than a
    quarter of the pairs are tight. (On a GPU the tight pairs' scatter, `index_add_`, sums in no fixed
    order; the shipped configs train at N <= 16 and never take that path.)
    """
    x, v, m = state.position, state.velocity, state.mass
    b, n, d = x.shape
    terms = order + 1
    i, j, upper, lower = _pair_indices(n, x.device)
    mi, mj = m[:, i], m[:, j]
    real = (mi != 0) & (mj != 0)

    def pull(pairs: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """sum_j w_ij m_j (q_j - q_i) for symmetric pair weights (..., B, P) and body values q (B, N, C)."""
        w = pairs.new_zeros(pairs.shape[:-1] + (n * n,))
        w[..., upper] = pairs
        w[..., lower] = pairs
        mq = torch.cat([m[..., None] * q, m[..., None]], -1)
        out = w.view(pairs.shape[:-1] + (n, n)) @ mq
        return out[..., :-1] - out[..., -1:] * q

    def separation(q: torch.Tensor) -> torch.Tensor:
        """q_j - q_i of every pair, (C, B, P)."""
        q = q.permute(2, 0, 1)
        return q[..., j] - q[..., i]

    def dot(p: torch.Tensor, q: torch.Tensor, out: torch.Tensor, scale: float = 1.0,
            accumulate: bool = False) -> torch.Tensor:
        """out (+)= scale sum_c p_c q_c over the leading axis, as fused multiply-adds (a reduction over
        an axis of 3 is slow)."""
        if not accumulate:
            torch.mul(p[0], q[0], out=out).mul_(scale)
        for c in range(int(not accumulate), d):
            out.addcmul_(p[c], q[c], value=scale)
        return out

    # the separation as a polynomial in h, dx0 + dv h + da h^2 with da = (a0_j - a0_i) / 2, and
    # s(h) = |dx(h)|^2 + eps^2 = s0 + s1 h + ... + s4 h^4
    sep = separation(torch.cat([x, v], -1))
    dx0, dv = sep[:d], sep[d:]
    r2 = dot(dx0, dx0, dx0.new_empty(dx0.shape[1:]))
    s0 = torch.where(real, r2 + gravity.softening ** 2, torch.ones_like(r2))
    inv_root = torch.where(real, s0.rsqrt(), torch.zeros_like(s0))  # padding: 0, and so are all its terms
    a0 = gravity.G * pull(inv_root / s0, x)  # the start force from the same pairs
    da = 0.5 * separation(a0)
    ratio = dx0.new_empty((4,) + s0.shape)  # s_j / s0, j = 1..4
    dot(dx0, dv, ratio[0], 2.0)
    dot(dx0, da, dot(dv, dv, ratio[1]), 2.0, accumulate=True)
    dot(dv, da, ratio[2], 2.0)
    dot(da, da, ratio[3])
    ratio /= s0
    # s^alpha for alpha = -1/2 (the potential) and -3/2 (the end kick's force) by the power recurrence,
    # to order far_order for every pair and on to `order` for the pairs that need it (`_tight_pairs`)
    low = min(far_order, order)
    tight = _tight_pairs(ratio, real, tight_ratio) if low < order and n >= TIERED_FROM_BODIES else None  # (B, M)
    if tight is None or 4 * tight.shape[-1] > i.numel():  # no tiers, or most pairs tight: expand them all
        low, tight = order, None
    f = x.new_zeros((low + 1, 2) + s0.shape)
    f[0, 0] = inv_root
    f[0, 1] = inv_root / s0
    _power_terms(f, ratio, 1)
    mm = mi * mj
    potential = -gravity.G * (f[:, 0] * mm).sum(-1)  # (K, B)
    # the end kick's force a(x1(h)) = G sum_j m_j dx(h) s(h)^(-3/2): with (q_0, q_1, q_2) = (x, v, a0 / 2),
    # dx's coefficient c is q_c,j - q_c,i, and its h^c shifts the weights' terms up by c
    q = torch.cat([x, v, 0.5 * a0], -1)
    pulled = pull(f[:, 1], q)  # (K, B, N, 3 D)
    if tight is not None:  # the orders above far_order, from the tight pairs alone
        high = x.new_zeros((terms, 2) + tight.shape)
        high[:low + 1] = f.gather(-1, tight.expand(low + 1, 2, -1, -1))
        _power_terms(high, ratio.gather(-1, tight.expand(4, -1, -1)), low + 1)
        high = high[low + 1:]
        potential = torch.cat([potential, -gravity.G * (high[:, 0] * mm.gather(-1, tight)).sum(-1)])
        # sum_j w_ij m_j (q_j - q_i), scattered onto both bodies of each tight pair
        flat = torch.arange(b, device=x.device)[:, None] * n
        ti, tj = (i[tight] + flat).reshape(-1), (j[tight] + flat).reshape(-1)  # into the (B N) bodies
        qf, mf = q.reshape(b * n, -1), m.reshape(-1, 1)
        dq = qf[tj] - qf[ti]  # (B M, 3 D)
        w = high[:, 1].reshape(order - low, -1, 1)
        far = x.new_zeros((order - low, b * n, q.shape[-1]))
        far.index_add_(1, ti, w * (dq * mf[tj]))
        far.index_add_(1, tj, w * (dq * -mf[ti]))
        pulled = torch.cat([pulled, far.reshape(order - low, b, n, -1)])
    pulled = pulled.reshape(terms, b, n, 3, d)
    end_force = pulled[:, :, :, 0].clone()
    end_force[1:] += pulled[:-1, :, :, 1]
    end_force[2:] += pulled[:-2, :, :, 2]
    # v1(h) = v + h (a0 + a(x1(h))) / 2, and the kinetic energy from the Gram matrix of its terms
    v1 = torch.cat([v[None], 0.5 * a0[None], x.new_zeros((terms - 2, b, n, d))])
    v1[1:] += 0.5 * gravity.G * end_force[:-1]
    momentum = (0.5 * m[:, :, None] * v1).reshape(terms, b, n * d).transpose(0, 1)
    gram = torch.bmm(momentum, v1.reshape(terms, b, n * d).permute(1, 2, 0))
    kinetic = gram.reshape(b, terms * terms) @ _antidiagonals(terms, x.dtype, x.device)
    energy = kinetic + potential.T  # E(h) - E0 has no h^0 term: E(0) is E0 itself
    coefficients = torch.cat([torch.zeros_like(energy[:, :1]), energy[:, 1:]], -1) / energy[:, :1].abs()
    return StepSeries(coefficients, a0, kinetic[:, 0], potential[0], r2)


TRUNCATIONS = 5
"""The series' dt is the smallest over its truncations at the last 5 orders (8..12 for order 12):
where they disagree the series has not converged at that dt (a close approach within the step, near
its radius of convergence), and the smallest is the cautious reading (benchmarks/README.md)."""


@functools.lru_cache(maxsize=8)
def _scan_fractions(span: tuple[float, float], points: int, refine_points: int) -> tuple[np.ndarray, np.ndarray]:
    """The scan's grid as fractions of its scale and the refinements' interior fractions of a
    bracket, in float64, as the torch path builds them; cached."""
    factors = torch.logspace(math.log10(span[0]), math.log10(span[1]), points, dtype=torch.float64)
    interior = torch.linspace(0, 1, refine_points + 2, dtype=torch.float64)[1:-1]
    return factors.numpy(), interior.numpy()


def series_dt(coefficients: torch.Tensor, threshold: float, scale: torch.Tensor, truncations: int = TRUNCATIONS,
              span: tuple[float, float] = (1e-3, 10.0), points: int = 160, refinements: int = 2,
              refine_points: int = 64) -> torch.Tensor:
    """The first dt at which |sum_k c_k dt^k| reaches `threshold`, the smallest over the series truncated
    at each of its last `truncations` orders: a geometric scan of `points` trial steps spanning `span`
    times `scale` (B,), its bracket refined `refinements` times by `refine_points` interior steps (to
    about 1e-5 of dt); the top of the span if the series never reaches it, and half its bottom if it
    already does there. Shape (B,). On the CPU from the compiled kernel (`series_kernel.series_dt`,
    float64), elsewhere from `series_dt_torch`."""
    truncations = max(1, min(truncations, coefficients.shape[1] - 3))
    if coefficients.device.type != "cpu":
        return series_dt_torch(coefficients, threshold, scale, truncations, span, points, refinements, refine_points)
    factors, interior = _scan_fractions(span, points, refine_points)
    dt = series_kernel.series_dt(series_kernel.as_array(coefficients), float(threshold), series_kernel.as_array(scale),
                                 truncations, factors, interior, refinements)
    return series_kernel.as_tensor(dt, coefficients.dtype)


def series_dt_torch(coefficients: torch.Tensor, threshold: float, scale: torch.Tensor, truncations: int = TRUNCATIONS,
                    span: tuple[float, float] = (1e-3, 10.0), points: int = 160, refinements: int = 2,
                    refine_points: int = 64) -> torch.Tensor:
    """`series_dt` in torch operations, on any device: the reference implementation (`first_crossing`)."""
    b, terms = coefficients.shape
    truncations = max(1, min(truncations, terms - 3))
    orders = torch.arange(terms, device=coefficients.device)
    keep = orders[None, :] < terms - orders[:truncations, None]  # truncation t drops the top t terms
    truncated = coefficients[:, None, :] * keep.to(coefficients.dtype)  # (B, T, K)
    rows = truncated.reshape(b * truncations, terms)

    def error(h: torch.Tensor) -> torch.Tensor:  # h (B T, P) -> |series| (B T, P), through the powers of h
        return (torch.linalg.vander(h, N=terms) @ rows[:, :, None])[..., 0].abs()

    factors = torch.logspace(math.log10(span[0]), math.log10(span[1]), points, dtype=scale.dtype,
                             device=scale.device)
    grid = scale[:, None] * factors[None, :]
    scan = (torch.linalg.vander(grid, N=terms) @ truncated.transpose(1, 2)).abs()  # every truncation at once
    fails = scan.transpose(1, 2).reshape(b * truncations, points) >= threshold
    dt = first_crossing(error, grid.repeat_interleave(truncations, 0), fails, threshold, refinements, refine_points)
    return dt.reshape(b, truncations).min(1).values


def error_series_dt(state: State, gravity: Gravity, threshold: float, order: int = 12) -> torch.Tensor:
    """The dt at which the series of the step's energy error first reaches `threshold`, shape (B,)."""
    return series_dt(energy_error_series(state, gravity, order), threshold, min_freefall_time(state, gravity))
