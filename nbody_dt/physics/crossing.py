"""Where a step's error first reaches a threshold, read along a grid of trial steps: shared by the
oracle (errors of real trial steps) and the error series (its polynomial)."""

from __future__ import annotations

from typing import Callable

import torch


def first_crossing(errors: Callable[[torch.Tensor], torch.Tensor], grid: torch.Tensor, fails: torch.Tensor,
                   threshold: float, refinements: int, points: int) -> torch.Tensor:
    """The end of the first dt interval, growing along each row of `grid` (R, G), on which
    `errors` stays below `threshold`, shape (R,).

    `fails` (R, G) says where errors(grid) >= threshold. The bracket [last pass, first fail] is
    refined `refinements` times with `points` evenly spaced interior trial steps; the answer is the
    bracket's lower end, or the grid's last point in a row that never fails, or half the grid's
    first point in a row that fails there already. errors maps trial steps (R, K) to errors (R, K).
    """
    rows = torch.arange(grid.shape[0], device=grid.device)
    any_fail = fails.any(1)
    first = torch.where(any_fail, fails.to(torch.int64).argmax(1), torch.full_like(rows, grid.shape[1] - 1))
    hi = grid[rows, first]
    lo = torch.where(first > 0, grid[rows, (first - 1).clamp_min(0)], 0.5 * hi)
    interior = torch.linspace(0, 1, points + 2, dtype=grid.dtype, device=grid.device)[1:-1]
    for _ in range(refinements):
        trial = lo[:, None] + (hi - lo)[:, None] * interior[None, :]
        trial_fails = errors(trial) >= threshold
        # the first failing interior point (or hi itself) is the new hi, the point before it the new lo
        idx = torch.where(trial_fails.any(1), trial_fails.to(torch.int64).argmax(1), torch.full_like(rows, points))
        bounds = torch.cat([lo[:, None], trial, hi[:, None]], 1)
        lo, hi = bounds[rows, idx], bounds[rows, idx + 1]
    return torch.where(any_fail, lo, grid[:, -1])
