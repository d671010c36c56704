"""The error series and its dt as compiled CPU loops (numba): one pass over the pairs per order
instead of some 800 torch operations a call.

The same mathematics as `nbody_dt.physics.error_series`, whose torch implementation stays the
reference (and the path on other devices): these kernels must return its coefficients and dt to
round-off (tests/test_series_kernel.py). Why they exist: at N <= 128 the torch series costs its
operations' dispatch, not their arithmetic, 8-20 force evaluations a call, and at N >= 256 its
temporaries the size of the pair set; a learned step only pays where its network is cheaper than
the controller's retries (benchmarks/README.md, "A compiled series").

The kernels take and return NumPy arrays of float64 (`as_array`, `as_tensor` convert); compiled on
first use and cached beside this file (numba's `cache=True`).
"""

from __future__ import annotations

import numba
import numpy as np
import torch


def as_array(t: torch.Tensor, components: int | None = None) -> np.ndarray:
    """A tensor as the kernels read it: float64, contiguous, on the CPU (no copy when it already is);
    `components`: the last axis zero-padded to that many (planar states as 3-D ones: the added zeros
    change no sum)."""
    t = t.detach()
    if components is not None and t.shape[-1] < components:
        t = torch.nn.functional.pad(t, (0, components - t.shape[-1]))
    if t.dtype != torch.float64 or not t.is_contiguous():
        t = t.to(torch.float64).contiguous()
    return t.numpy()


def as_tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A kernel's output as a tensor of `dtype` (no copy for float64 and booleans)."""
    t = torch.from_numpy(a)
    return t if a.dtype == np.bool_ or t.dtype == dtype else t.to(dtype)


@numba.njit(cache=True, nogil=True)
def pair_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs i < j of n bodies, in `gravity.pair_indices` (`torch.triu_indices`) order."""
    pi = np.empty(n * (n - 1) // 2, np.int64)
    pj = np.empty(n * (n - 1) // 2, np.int64)
    p = 0
    for i in range(n):
        for j in range(i + 1, n):
            pi[p], pj[p] = i, j
            p += 1
    return pi, pj


@numba.njit(cache=True, nogil=True)
def _power_coefficients(terms: int) -> np.ndarray:
    """(terms, 2, 5): (alpha j - (k - j)) / k of the power recurrence of s^alpha, alpha = -1/2, -3/2."""
    out = np.zeros((terms, 2, 5))
    for k in range(1, terms):
        for a in range(2):
            alpha = -0.5 - a
            for jj in range(1, min(4, k) + 1):
                out[k, a, jj] = (alpha * jj - (k - jj)) / k
    return out


@numba.njit(cache=True, nogil=True)
def step_series(x: np.ndarray, v: np.ndarray, m: np.ndarray, G: float, eps2: float, order: int, far_order: int,
                tight_ratio: float, tiered: bool):
    """Coefficients (B, order + 1), start force (B, N, 3), kinetic and potential energy (B,) and pair
    separations |x_j - x_i|^2 (B, P) of `error_series.step_series`, for positions and velocities of 3
    components (`as_array` pads planar states); `tiered`: expand only the tight pairs to `order` (the
    caller decides by N as the torch path does)."""
    b_count, n, _ = x.shape
    p_count = n * (n - 1) // 2
    terms = order + 1
    low = min(far_order, order) if tiered else order
    pi, pj = pair_indices(n)
    coef = _power_coefficients(terms)
    coefficients = np.zeros((b_count, terms))
    acceleration = np.zeros((b_count, n, 3))
    kinetic0 = np.zeros(b_count)
    potential0 = np.zeros(b_count)
    separation2 = np.zeros((b_count, p_count))
    inv_root = np.zeros((b_count, p_count))
    s0 = np.ones((b_count, p_count))
    ratio = np.zeros((b_count, 4, p_count))
    # the start force, then each pair's s(h) = s0 (1 + r_1 h + ... + r_4 h^4)
    for b in range(b_count):
        for p in range(p_count):
            i, j = pi[p], pj[p]
            r2 = 0.0
            for c in range(3):
                dx = x[b, j, c] - x[b, i, c]
                r2 += dx * dx
            separation2[b, p] = r2
            if m[b, i] != 0 and m[b, j] != 0:
                s0[b, p] = r2 + eps2
                inv_root[b, p] = 1.0 / np.sqrt(s0[b, p])
                w = G * inv_root[b, p] / s0[b, p]
                for c in range(3):
                    dx = x[b, j, c] - x[b, i, c]
                    acceleration[b, i, c] += w * m[b, j] * dx
                    acceleration[b, j, c] -= w * m[b, i] * dx
        for p in range(p_count):
            if inv_root[b, p] == 0:
                continue
            i, j = pi[p], pj[p]
            xv = vv = xa = va = aa = 0.0
            for c in range(3):
                dx = x[b, j, c] - x[b, i, c]
                dv = v[b, j, c] - v[b, i, c]
                da = 0.5 * (acceleration[b, j, c] - acceleration[b, i, c])
                xv += dx * dv
                vv += dv * dv
                xa += dx * da
                va += dv * da
                aa += da * da
            ratio[b, 0, p] = 2.0 * xv / s0[b, p]
            ratio[b, 1, p] = (vv + 2.0 * xa) / s0[b, p]
            ratio[b, 2, p] = 2.0 * va / s0[b, p]
            ratio[b, 3, p] = aa / s0[b, p]
    # which pairs get every order: as `error_series._tight_pairs`, the M tightest of each row with M
    # the largest count of tight pairs over the batch; every pair when 4 M > P
    full = np.ones((b_count, p_count), np.bool_)
    if low < order:
        tightness = np.zeros((b_count, p_count))
        counts = np.zeros(b_count, np.int64)
        for b in range(b_count):
            largest = np.zeros(4)
            for jj in range(4):
                for p in range(p_count):
                    largest[jj] = max(largest[jj], abs(ratio[b, jj, p]))
            c_row = 0.0
            for jj in range(4):
                c_row = max(c_row, largest[jj] ** (1.0 / (jj + 1)))
            c_row = max(c_row / tight_ratio, np.finfo(np.float64).tiny)
            powers = np.array([c_row, c_row ** 2, c_row ** 3, c_row ** 4])
            for p in range(p_count):
                t = 0.0
                for jj in range(4):
                    t = max(t, abs(ratio[b, jj, p]) / powers[jj])
                tightness[b, p] = t
                counts[b] += t > 1
        most = max(1, counts.max())
        if 4 * most <= p_count:
            for b in range(b_count):
                # a row with fewer tight pairs than the batch's most takes its next-tightest too
                kth = 1.0 if counts[b] == most else -np.partition(-tightness[b], most - 1)[most - 1]
                for p in range(p_count):
                    full[b, p] = tightness[b, p] > kth if counts[b] == most else tightness[b, p] >= kth
        else:
            low = order
    # the power recurrence of s^-1/2 (potential) and s^-3/2 (the end kick's force) per pair, summed
    # into the potential's terms and the pull sum_j w_ij m_j (q_j - q_i), q = (x, v, a0 / 2), one body's
    # terms contiguous (pulled: body, order, the 9 components of q)
    f = np.zeros((terms, 2))
    for b in range(b_count):
        potential = np.zeros(terms)
        pulled = np.zeros((n, terms, 9))
        for p in range(p_count):
            if inv_root[b, p] == 0:
                continue
            i, j = pi[p], pj[p]
            top = order if full[b, p] else low
            r1, r2, r3, r4 = ratio[b, 0, p], ratio[b, 1, p], ratio[b, 2, p], ratio[b, 3, p]
            f[0, 0] = inv_root[b, p]
            f[0, 1] = inv_root[b, p] / s0[b, p]
            for k in range(1, top + 1):
                for a in range(2):
                    acc = coef[k, a, 1] * r1 * f[k - 1, a]
                    if k >= 2:
                        acc += coef[k, a, 2] * r2 * f[k - 2, a]
                    if k >= 3:
                        acc += coef[k, a, 3] * r3 * f[k - 3, a]
                    if k >= 4:
                        acc += coef[k, a, 4] * r4 * f[k - 4, a]
                    f[k, a] = acc
            mi, mj = m[b, i], m[b, j]
            gmm = G * mi * mj
            for k in range(top + 1):
                potential[k] -= gmm * f[k, 0]
            # the 9 components as scalars: the compiler keeps them in registers
            q0, q1, q2 = x[b, j, 0] - x[b, i, 0], x[b, j, 1] - x[b, i, 1], x[b, j, 2] - x[b, i, 2]
            q3, q4, q5 = v[b, j, 0] - v[b, i, 0], v[b, j, 1] - v[b, i, 1], v[b, j, 2] - v[b, i, 2]
            q6 = 0.5 * (acceleration[b, j, 0] - acceleration[b, i, 0])
            q7 = 0.5 * (acceleration[b, j, 1] - acceleration[b, i, 1])
            q8 = 0.5 * (acceleration[b, j, 2] - acceleration[b, i, 2])
            for k in range(top + 1):
                wi, wj = f[k, 1] * mj, f[k, 1] * mi
                row_i, row_j = pulled[i, k], pulled[j, k]
                row_i[0] += wi * q0
                row_i[1] += wi * q1
                row_i[2] += wi * q2
                row_i[3] += wi * q3
                row_i[4] += wi * q4
                row_i[5] += wi * q5
                row_i[6] += wi * q6
                row_i[7] += wi * q7
                row_i[8] += wi * q8
                row_j[0] -= wj * q0
                row_j[1] -= wj * q1
                row_j[2] -= wj * q2
                row_j[3] -= wj * q3
                row_j[4] -= wj * q4
                row_j[5] -= wj * q5
                row_j[6] -= wj * q6
                row_j[7] -= wj * q7
                row_j[8] -= wj * q8
        # the end force's terms: dx(h) = dx0 + h dv + h^2 da shifts the weights' terms up by 0, 1, 2;
        # v1(h) = v + h (a0 + a(x1(h))) / 2, and the kinetic energy from the products of its terms
        v1 = np.zeros((terms, n, 3))
        for body in range(n):
            for c in range(3):
                v1[0, body, c] = v[b, body, c]
                v1[1, body, c] = 0.5 * acceleration[b, body, c]
                for k in range(terms - 1):
                    force = pulled[body, k, c]
                    if k >= 1:
                        force += pulled[body, k - 1, 3 + c]
                    if k >= 2:
                        force += pulled[body, k - 2, 6 + c]
                    v1[k + 1, body, c] += 0.5 * G * force
        kinetic = np.zeros(terms)
        for k1 in range(terms):
            for k2 in range(terms - k1):
                s = 0.0
                for body in range(n):
                    for c in range(3):
                        s += m[b, body] * v1[k1, body, c] * v1[k2, body, c]
                kinetic[k1 + k2] += 0.5 * s
        e0 = abs(kinetic[0] + potential[0])
        for k in range(1, terms):
            coefficients[b, k] = (kinetic[k] + potential[k]) / e0
        kinetic0[b], potential0[b] = kinetic[0], potential[0]
    return coefficients, acceleration, kinetic0, potential0, separation2


@numba.njit(cache=True, nogil=True)
def _polynomial(c: np.ndarray, top: int, h: float) -> float:
    """|sum_{k <= top} c_k h^k| (Horner)."""
    s = 0.0
    for k in range(top, -1, -1):
        s = s * h + c[k]
    return abs(s)


@numba.njit(cache=True, nogil=True)
def series_dt(coefficients: np.ndarray, threshold: float, scale: np.ndarray, truncations: int, factors: np.ndarray,
              interior: np.ndarray, refinements: int) -> np.ndarray:
    """`error_series.series_dt` row by row: per truncation the first failing point of the grid
    scale * factors, its bracket refined `refinements` times at the `interior` fractions
    (`crossing.first_crossing`); the smallest over the truncations. Shape (B,)."""
    b_count, terms = coefficients.shape
    out = np.empty(b_count)
    for b in range(b_count):
        best = np.inf
        for t in range(truncations):
            top = terms - 1 - t
            first = -1
            for g in range(factors.size):
                if _polynomial(coefficients[b], top, scale[b] * factors[g]) >= threshold:
                    first = g
                    break
            if first < 0:
                dt = scale[b] * factors[-1]
            else:
                hi = scale[b] * factors[first]
                lo = scale[b] * factors[first - 1] if first > 0 else 0.5 * hi
                for _ in range(refinements):
                    new_lo, new_hi = lo, hi
                    width = hi - lo
                    for q in range(interior.size):
                        trial = lo + width * interior[q]
                        if _polynomial(coefficients[b], top, trial) >= threshold:
                            new_hi = trial
                            break
                        new_lo = trial
                    lo, hi = new_lo, new_hi
                dt = lo
            best = min(best, dt)
        out[b] = best
    return out
