"""The single-step energy error of a KDK step as a power series in dt, from the start state alone.

One KDK step from (x, v) by h ends at x1(h) = x + h v + h^2 a0 / 2 (a polynomial in h) with
v1(h) = v + h a0 / 2 + h a(x1(h)) / 2, so E(x1, v1) - E0 is a function of h whose Taylor
coefficients follow from pairwise sums over the start state: every pair's squared separation
s(h) = |dx(h)|^2 + eps^2 is a polynomial of degree 4, and s^(-1/2) (the potential) and s^(-3/2)
(the end kick's force) are expanded by the power recurrence of truncated series. The KDK step's
error starts at h^3; higher orders carry the sign cancellations between pairs that set where the
error first reaches a threshold. This costs no trial step, but at order 12 the arithmetic of 10-60
force evaluations on a CPU (benchmarks/README.md, "An error series").
"""

from __future__ import annotations

import math

import torch

from nbody_dt.physics.gravity import Gravity, _pair_geometry, accelerations, min_freefall_time, total_energy
from nbody_dt.physics.state import State


def _series_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cauchy product of two truncated series (coefficients on the last axis, same length)."""
    k = a.shape[-1]
    return torch.stack([sum(a[..., j] * b[..., n - j] for j in range(n + 1)) for n in range(k)], -1)


def _series_pow(s: list[torch.Tensor], alpha: float, terms: int) -> torch.Tensor:
    """(s_0 + s_1 h + ... + s_d h^d)^alpha to `terms` coefficients (s_0 > 0): from f' s = alpha s' f,
    f_n = sum_{j=1..min(n,d)} (alpha j - (n - j)) s_j f_{n-j} / (n s_0)."""
    f = [s[0].pow(alpha)]
    inverse = 1.0 / s[0]
    for n in range(1, terms):
        f.append(sum((alpha * j - (n - j)) * s[j] * f[n - j] for j in range(1, min(n, len(s) - 1) + 1))
                 * (inverse / n))
    return torch.stack(f, -1)


def _shift(series: torch.Tensor, by: int) -> torch.Tensor:
    """h^by times a truncated series (coefficients on the last axis), truncated again."""
    return torch.cat([torch.zeros_like(series[..., :by]), series[..., :-by]], -1)


def energy_error_series(state: State, gravity: Gravity, order: int = 12) -> torch.Tensor:
    """Taylor coefficients c_0..c_order of (E(KDK step by h) - E0) / |E0| in h, shape (B, order + 1).

    c_0, c_1 and c_2 vanish up to round-off (the step is second order). Padding (zero mass) is
    ignored as everywhere in physics.
    """
    x, v, m = state.position, state.velocity, state.mass
    a0 = accelerations(x, m, gravity)
    terms = order + 1
    # the separation x_j - x_i as a polynomial in h, dx0 + dx1 h + dx2 h^2, and s = |dx|^2 + eps^2
    dx0, r2, real = _pair_geometry(x, m, gravity.softening)
    dx1 = v[:, None, :, :] - v[:, :, None, :]
    dx2 = 0.5 * (a0[:, None, :, :] - a0[:, :, None, :])

    def dot(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.where(real, (p * q).sum(-1), torch.zeros_like(r2))

    s = [r2, 2 * dot(dx0, dx1), dot(dx1, dx1) + 2 * dot(dx0, dx2), 2 * dot(dx1, dx2), dot(dx2, dx2)]
    mm = torch.where(real, m[:, :, None] * m[:, None, :], torch.zeros_like(r2))
    potential = -0.5 * gravity.G * torch.einsum("bij,bijk->bk", mm, _series_pow(s, -0.5, terms))
    # the end kick's force a(x1(h)) = G sum_j m_j dx(h) s(h)^(-3/2), (B, N, D, K)
    weight = torch.where(real, m[:, None, :], torch.zeros_like(r2))[..., None] * _series_pow(s, -1.5, terms)
    end_force = gravity.G * (torch.einsum("bijd,bijk->bidk", dx0, weight)
                             + _shift(torch.einsum("bijd,bijk->bidk", dx1, weight), 1)
                             + _shift(torch.einsum("bijd,bijk->bidk", dx2, weight), 2))
    # v1(h) = v + h (a0 + a(x1(h))) / 2
    v1 = _shift(0.5 * end_force, 1)
    v1 = v1 + torch.stack([v, 0.5 * a0] + [torch.zeros_like(v)] * (terms - 2), -1)
    kinetic = 0.5 * torch.einsum("bi,bik->bk", m, _series_mul(v1, v1).sum(-2))
    e0 = total_energy(state, gravity)
    error = kinetic + potential
    error = torch.cat([error[:, :1] - e0[:, None], error[:, 1:]], -1)
    return error / e0.abs()[:, None]


TRUNCATIONS = 5
"""The series' dt is the smallest over its truncations at the last 5 orders (8..12 for order 12):
where they disagree the series has not converged at that dt (a close approach within the step, near
its radius of convergence), and the smallest is the cautious reading (benchmarks/README.md)."""


def series_dt(coefficients: torch.Tensor, threshold: float, scale: torch.Tensor, truncations: int = TRUNCATIONS,
              span: tuple[float, float] = (1e-3, 10.0), points: int = 160, refinements: int = 12) -> torch.Tensor:
    """The first dt at which |sum_k c_k dt^k| reaches `threshold`, the smallest over the series truncated
    at each of its last `truncations` orders: a geometric scan of `points` trial steps spanning `span`
    times `scale` (B,), then bisection of the bracket; the top of the span if the series never
    reaches it, and a dt within a factor 2 below its bottom if it already does there. Shape (B,)."""
    b, terms = coefficients.shape
    truncations = max(1, min(truncations, terms - 3))
    orders = torch.arange(terms, device=coefficients.device)
    keep = orders[None, :] < terms - orders[:truncations, None]  # truncation t drops the top t terms
    coefficients = (coefficients[:, None, :] * keep.to(coefficients.dtype)).reshape(b * truncations, terms)
    scale = scale.repeat_interleave(truncations)
    k = orders.to(coefficients.dtype)

    def error(h: torch.Tensor) -> torch.Tensor:  # h (B, P) -> |series| (B, P)
        return (coefficients[:, None, :] * h[..., None].pow(k)).sum(-1).abs()

    factors = torch.logspace(math.log10(span[0]), math.log10(span[1]), points, dtype=scale.dtype,
                             device=scale.device)
    grid = scale[:, None] * factors[None, :]
    fails = error(grid) >= threshold
    rows = torch.arange(len(scale), device=scale.device)
    first = torch.where(fails.any(1), fails.to(torch.int64).argmax(1), torch.full_like(rows, points - 1))
    hi = grid[rows, first]
    lo = torch.where(first > 0, grid[rows, (first - 1).clamp_min(0)], hi * 0.5)
    for _ in range(refinements):
        mid = torch.sqrt(lo * hi)
        mid_fails = error(mid[:, None])[:, 0] >= threshold
        lo, hi = torch.where(mid_fails, lo, mid), torch.where(mid_fails, mid, hi)
    return torch.where(fails.any(1), lo, grid[:, -1]).reshape(b, truncations).min(1).values


def error_series_dt(state: State, gravity: Gravity, threshold: float, order: int = 12) -> torch.Tensor:
    """The dt at which the series of the step's energy error first reaches `threshold`, shape (B,)."""
    return series_dt(energy_error_series(state, gravity, order), threshold, min_freefall_time(state, gravity))
