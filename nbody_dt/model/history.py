"""A window of past accepted states of each system, most recent first, zero-padded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nbody_dt.physics.state import State


@dataclass(frozen=True)
class History:
    """position, velocity: (B, K, N, D); valid: (B, K) bool. Slot 0 is the most recent past state.

    Slots before the first step of a system are zeros with valid = False.
    """

    position: torch.Tensor
    velocity: torch.Tensor
    valid: torch.Tensor

    @property
    def length(self) -> int:
        return self.position.shape[1]

    @staticmethod
    def empty(state: State, length: int) -> History:
        """K zero-padded slots for every system of `state`."""
        b, n, d = state.position.shape
        z = state.position.new_zeros(b, length, n, d)
        return History(z, z.clone(), torch.zeros(b, length, dtype=torch.bool, device=state.device))

    def push(self, state: State) -> History:
        """A new history with `state` as the most recent slot and the oldest slot dropped."""
        if self.length == 0:
            return self
        ones = torch.ones(state.batch_size, 1, dtype=torch.bool, device=state.device)
        return History(
            torch.cat([state.position[:, None], self.position[:, :-1]], 1),
            torch.cat([state.velocity[:, None], self.velocity[:, :-1]], 1),
            torch.cat([ones, self.valid[:, :-1]], 1),
        )

    def select(self, index: torch.Tensor) -> History:
        return History(self.position[index], self.velocity[index], self.valid[index])

    def where(self, mask: torch.Tensor, other: History) -> History:
        """Per system: this history where mask (B,) is true, else `other`."""
        m4 = mask[:, None, None, None]
        return History(
            torch.where(m4, self.position, other.position),
            torch.where(m4, self.velocity, other.velocity),
            torch.where(mask[:, None], self.valid, other.valid),
        )

    def to(self, device=None, dtype=None) -> History:
        return History(self.position.to(device=device, dtype=dtype), self.velocity.to(device=device, dtype=dtype),
                       self.valid.to(device=device))

    @staticmethod
    def cat(histories: list[History]) -> History:
        return History(torch.cat([h.position for h in histories]), torch.cat([h.velocity for h in histories]),
                       torch.cat([h.valid for h in histories]))
