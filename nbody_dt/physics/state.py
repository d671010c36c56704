"""An immutable batch of N-body systems."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class State:
    """B independent systems of N bodies in D dimensions.

    position, velocity: (B, N, D); mass: (B, N). All share dtype and device.
    Operations return new states; a State is never modified in place.
    """

    position: torch.Tensor
    velocity: torch.Tensor
    mass: torch.Tensor

    def __post_init__(self) -> None:
        if self.position.ndim != 3 or self.velocity.shape != self.position.shape:
            raise ValueError(
                f"position and velocity must share a (B, N, D) shape, got "
                f"{tuple(self.position.shape)} and {tuple(self.velocity.shape)}"
            )
        if self.mass.shape != self.position.shape[:2]:
            raise ValueError(f"mass must be (B, N) = {tuple(self.position.shape[:2])}, got {tuple(self.mass.shape)}")

    @property
    def batch_size(self) -> int:
        return self.position.shape[0]

    @property
    def num_bodies(self) -> int:
        return self.position.shape[1]

    @property
    def dim(self) -> int:
        return self.position.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.position.dtype

    @property
    def device(self) -> torch.device:
        return self.position.device

    def select(self, index: torch.Tensor) -> State:
        """The systems at `index` (a bool mask or integer indices along B)."""
        return State(self.position[index], self.velocity[index], self.mass[index])

    def where(self, mask: torch.Tensor, other: State) -> State:
        """Per system: this state where `mask` (B,) is true, else `other`."""
        m = mask[:, None, None]
        return State(
            torch.where(m, self.position, other.position),
            torch.where(m, self.velocity, other.velocity),
            torch.where(mask[:, None], self.mass, other.mass),
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> State:
        return State(
            self.position.to(device=device, dtype=dtype),
            self.velocity.to(device=device, dtype=dtype),
            self.mass.to(device=device, dtype=dtype),
        )

    @staticmethod
    def cat(states: list[State]) -> State:
        return State(
            torch.cat([s.position for s in states]),
            torch.cat([s.velocity for s in states]),
            torch.cat([s.mass for s in states]),
        )

    def repeat_interleave(self, repeats: int) -> State:
        """Each system `repeats` times in a row: (B*repeats, N, D)."""
        return State(
            self.position.repeat_interleave(repeats, dim=0),
            self.velocity.repeat_interleave(repeats, dim=0),
            self.mass.repeat_interleave(repeats, dim=0),
        )
