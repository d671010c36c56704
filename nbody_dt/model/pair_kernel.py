"""The set network's pair features of the k tightest pairs as one compiled CPU loop (numba).

`set_network.pair_set_features` (selections "system" and "all") in one pass over the pairs
instead of some 50 torch operations: at N <= 128 their dispatch cost more than the series'
arithmetic (benchmarks/README.md, "A compiled series"). The torch implementation stays the
reference and the path on other devices and for the per-body selection; this kernel must return
its features to round-off (tests/test_series_kernel.py). Compiled on first use, cached.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from nbody_dt.physics.series_kernel import pair_indices

TINY = 1e-30
"""`set_network._TINY`: the floor of separations, masses and energies."""


@numba.njit(cache=True, nogil=True)
def tightest_pair_features(x: np.ndarray, v: np.ndarray, m: np.ndarray, acceleration: np.ndarray,
                           kinetic: np.ndarray, potential: np.ndarray, separation2: np.ndarray, G: float,
                           eps2: float, k: int):
    """Features (B, K, 9), mask (B, K), t_min (B,), t_safe (B, K) and energy share (B, K) of the
    K = min(k, P) pairs of smallest free-fall time, in increasing order of it (all P pairs in their
    own order when P <= k), as `pair_set_features` computes them from the start force, energies and
    squared separations (B, P) of `StepSeries`."""
    b_count, n, d = x.shape
    p_count = n * (n - 1) // 2
    size = min(k, p_count)
    pi, pj = pair_indices(n)
    features = np.zeros((b_count, size, 9))
    mask = np.zeros((b_count, size), np.bool_)
    t_min = np.empty(b_count)
    t_safe = np.empty((b_count, size))
    share_out = np.empty((b_count, size))
    freefall = np.empty(p_count)
    chosen = np.empty(size, np.int64)
    for b in range(b_count):
        for p in range(p_count):
            i, j = pi[p], pj[p]
            if m[b, i] != 0 and m[b, j] != 0:
                r2 = separation2[b, p]
                freefall[p] = max(math.sqrt(r2 * math.sqrt(r2) / (G * (m[b, i] + m[b, j]))), TINY)
            else:
                freefall[p] = np.inf
        t_min[b] = freefall.min()
        if p_count <= k:
            for p in range(p_count):
                chosen[p] = p
        else:  # the `size` smallest, kept sorted by insertion (size is small)
            filled = 0
            for p in range(p_count):
                t = freefall[p]
                if filled == size and t >= freefall[chosen[size - 1]]:
                    continue
                slot = min(filled, size - 1)
                while slot > 0 and freefall[chosen[slot - 1]] > t:
                    chosen[slot] = chosen[slot - 1]
                    slot -= 1
                chosen[slot] = p
                filled = min(filled + 1, size)
        total_mass = 0.0
        for body in range(n):
            total_mass += m[b, body]
        binding = max(-potential[b], TINY)
        energy = max(abs(kinetic[b] + potential[b]), TINY)
        for q in range(size):
            p = chosen[q]
            i, j = pi[p], pj[p]
            real = np.isfinite(freefall[p])
            mask[b, q] = real
            t_safe[b, q] = freefall[p] if real else t_min[b]
            mi, mj = m[b, i], m[b, j]
            r2 = v2 = xv = 0.0
            for c in range(d):
                dx = x[b, j, c] - x[b, i, c]
                dv = v[b, j, c] - v[b, i, c]
                r2 += dx * dx
                v2 += dv * dv
                xv += dx * dv
            r2 = max(r2, TINY)
            r = math.sqrt(r2)
            mp = max(mi + mj, TINY)
            gm = G * mp
            own = -gm * (r2 + eps2) ** -1.5
            tidal2 = 0.0
            for c in range(d):
                dx = x[b, j, c] - x[b, i, c]
                rel = acceleration[b, j, c] - acceleration[b, i, c] - own * dx
                tidal2 += rel * rel
            tidal = math.sqrt(tidal2) * (r2 + eps2) / gm
            pair_potential = G * mi * mj / math.sqrt(r2 + eps2)
            share = pair_potential / binding
            share_out[b, q] = abs(0.5 * mi * mj / mp * v2 - pair_potential) / energy
            if real:
                f = features[b, q]
                f[0] = math.log(v2 * r / gm + 1e-12)
                f[1] = math.log(abs(1 - 0.5 * v2 * r / gm) + 1e-4)
                f[2] = xv / (r * math.sqrt(v2) + TINY)
                f[3] = math.log(t_safe[b, q] / t_min[b])
                f[4] = mp / total_mass
                f[5] = min(mi, mj) / max(max(mi, mj), TINY)
                f[6] = math.log1p(eps2 / r2)
                f[7] = math.log(tidal + 1e-12)
                f[8] = math.log(share + 1e-300)
    return features, mask, t_min, t_safe, share_out
