"""The dt network: features -> MLP (optional Gaussian Fourier features) -> positive dt."""

from __future__ import annotations

import math

import torch
from torch import nn

from nbody_dt.config import Config
from nbody_dt.model.features import compute_features, derive_scales, feature_dim
from nbody_dt.model.history import History
from nbody_dt.physics.gravity import Gravity
from nbody_dt.physics.state import State

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU, "gelu": nn.GELU, "softplus": nn.Softplus}
LOG_DT_BOUND = 12.0
"""log(dt / t_ff) is soft-clamped to +-LOG_DT_BOUND so exp() can never overflow."""


class DtNetwork(nn.Module):
    """Predicts the KDK timestep of each system of a batch from its state and history.

    output 'log_freefall': dt = t_ff_min * exp(B tanh(o / B)), scale-free;
    output 'softplus':     dt = time_scale * (softplus(o) + floor).
    The normalization scales are a buffer: saved with the weights, never re-derived.
    """

    def __init__(
        self,
        features: str,
        num_bodies: int,
        dim: int,
        history_len: int,
        hidden: list[int],
        activation: str,
        output: str,
        gravity: Gravity,
        dt_floor: float = 1e-6,
        initial_dt: float = 0.01,
        fourier_features: int = 0,
        fourier_sigma: float = 1.0,
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        self.features, self.output, self.gravity = features, output, gravity
        self.history_len, self.dt_floor, self.num_bodies = history_len, dt_floor, num_bodies
        n_in = feature_dim(features, num_bodies, dim, history_len)
        self.register_buffer("scales", torch.ones(4, dtype=dtype))
        self.register_buffer("fourier", torch.randn(fourier_features, n_in, dtype=dtype) * fourier_sigma)
        width = n_in + 2 * fourier_features
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h, dtype=dtype), ACTIVATIONS[activation]()]
            width = h
        head = nn.Linear(width, 1, dtype=dtype)
        with torch.no_grad():
            head.weight.mul_(0.1)  # start near the initial dt, but let gradients reach every layer
            if output == "log_freefall":
                head.bias.fill_(math.log(initial_dt))
            else:
                head.bias.fill_(math.log(math.expm1(max(initial_dt - dt_floor, 1e-12))))
        self.mlp = nn.Sequential(*layers, head)

    @staticmethod
    def from_config(cfg: Config, num_bodies: int) -> DtNetwork:
        m = cfg.model
        return DtNetwork(
            features=m.features, num_bodies=num_bodies, dim=cfg.physics.dim, history_len=m.history_len,
            hidden=list(m.hidden), activation=m.activation, output=m.output,
            gravity=Gravity(cfg.physics.G, cfg.physics.softening), dt_floor=m.dt_floor, initial_dt=m.initial_dt,
            fourier_features=m.fourier_features, fourier_sigma=m.fourier_sigma, dtype=cfg.torch_dtype,
        )

    def check_takes(self, state: State) -> None:
        """ValueError (one line) unless the network can take these systems: its input size fixes N."""
        if state.num_bodies != self.num_bodies:
            raise ValueError(f"this dt network (model.kind = 'mlp') takes systems of N = {self.num_bodies} bodies, "
                             f"got N = {state.num_bodies}; a set network (model.kind = 'set') takes any N")

    def for_gravity(self, gravity: Gravity) -> DtNetwork:
        """Itself: its features are normalized by scales derived under the training force law, so it
        keeps that law's G and softening on any problem (the set network's twin reads the problem's)."""
        return self

    def set_scales(self, state: State) -> None:
        """Derive and store the normalization scales from the initial training states (once)."""
        with torch.no_grad():
            self.scales.copy_(derive_scales(state, self.gravity).to(self.scales))

    def log_dt(self, state: State, history: History) -> torch.Tensor:
        """log of the predicted dt, shape (B,)."""
        self.check_takes(state)
        x, t_ff = compute_features(self.features, state, history, self.gravity, self.scales)
        if self.fourier.shape[0]:
            proj = 2 * math.pi * x @ self.fourier.T
            x = torch.cat([x, torch.sin(proj), torch.cos(proj)], 1)
        out = self.mlp(x)[:, 0]
        if self.output == "log_freefall":
            return torch.log(t_ff) + LOG_DT_BOUND * torch.tanh(out / LOG_DT_BOUND)
        return torch.log(self.scales[3]) + torch.log(nn.functional.softplus(out) + self.dt_floor)

    def forward(self, state: State, history: History) -> torch.Tensor:
        """Predicted dt (B,), always positive and finite."""
        return torch.exp(self.log_dt(state, history))
