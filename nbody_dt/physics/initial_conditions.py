"""Initial conditions: Kepler orbits and ensembles, Plummer spheres, figure-eight, Pythagorean problem.

Every builder returns a State (float64 by default) in the centre-of-mass frame.
"""

from __future__ import annotations

import math

import torch

from nbody_dt.physics.gravity import Gravity, kinetic_energy, potential_energy
from nbody_dt.physics.state import State

FIGURE_EIGHT_PERIOD = 6.32591398
"""Period of the Chenciner-Montgomery figure-eight choreography (G = m = 1)."""


def _planar(xy: torch.Tensor, dim: int) -> torch.Tensor:
    """Embed (..., 2) coordinates in `dim` >= 2 dimensions."""
    if dim < 2:
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    pad = xy.new_zeros(xy.shape[:-1] + (dim - 2,))
    return torch.cat([xy, pad], dim=-1)


def _to_centre_of_mass(position: torch.Tensor, velocity: torch.Tensor, mass: torch.Tensor) -> State:
    total = mass.sum(-1, keepdim=True)[..., None]
    com_x = (mass[..., None] * position).sum(-2, keepdim=True) / total
    com_v = (mass[..., None] * velocity).sum(-2, keepdim=True) / total
    return State(position - com_x, velocity - com_v, mass)


def kepler_period(a: torch.Tensor | float, total_mass: torch.Tensor | float, G: float = 1.0):
    """T = 2 pi sqrt(a^3 / (G M))."""
    if isinstance(a, torch.Tensor) or isinstance(total_mass, torch.Tensor):
        return 2 * math.pi * torch.sqrt(torch.as_tensor(a) ** 3 / (G * torch.as_tensor(total_mass)))
    return 2 * math.pi * math.sqrt(a**3 / (G * total_mass))


def kepler_orbits(
    a: torch.Tensor,
    e: torch.Tensor,
    m1: torch.Tensor,
    m2: torch.Tensor,
    G: float = 1.0,
    start: str = "apocentre",
    angle: torch.Tensor | None = None,
    dim: int = 2,
    dtype: torch.dtype = torch.float64,
) -> tuple[State, torch.Tensor]:
    """A batch of two-body orbits (semi-major axis a, eccentricity e) and their periods.

    Each starts at apocentre or pericentre, in its centre-of-mass frame, with the
    line of apsides rotated by `angle` (radians, default 0) in the xy-plane.
    """
    a, e, m1, m2 = (torch.as_tensor(t, dtype=dtype).reshape(-1) for t in (a, e, m1, m2))
    a, e, m1, m2 = torch.broadcast_tensors(a, e, m1, m2)
    if not bool(((e >= 0) & (e < 1)).all()):
        raise ValueError("eccentricity must lie in [0, 1)")
    if not bool((a > 0).all()):
        raise ValueError("semi-major axis must be positive")
    total = m1 + m2
    if start == "apocentre":
        r = a * (1 + e)
        v = torch.sqrt(G * total * (1 - e) / (a * (1 + e)))
    elif start == "pericentre":
        r = a * (1 - e)
        v = torch.sqrt(G * total * (1 + e) / (a * (1 - e)))
    else:
        raise ValueError(f"start must be 'apocentre' or 'pericentre', got {start!r}")
    phi = torch.zeros_like(a) if angle is None else torch.as_tensor(angle, dtype=dtype).expand_as(a)
    cos, sin = torch.cos(phi), torch.sin(phi)
    rel_x = torch.stack([r * cos, r * sin], -1)
    rel_v = torch.stack([-v * sin, v * cos], -1)
    f1, f2 = (m2 / total)[:, None], (m1 / total)[:, None]
    position = torch.stack([-f1 * rel_x, f2 * rel_x], 1)
    velocity = torch.stack([-f1 * rel_v, f2 * rel_v], 1)
    state = State(_planar(position, dim), _planar(velocity, dim), torch.stack([m1, m2], -1))
    return state, kepler_period(a, total, G)


def _spanning_strata(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """n values in [0, 1] in random order, one in each of the n strata [k/n, (k+1)/n), then
    stretched so that the smallest is 0 and the largest 1 (a single value stays uniform)."""
    q = (torch.randperm(n, generator=gen).to(dtype) + torch.rand(n, generator=gen, dtype=dtype)) / n
    if n > 1:
        q = (q - q.min()) / (q.max() - q.min())
    return q


def kepler_ensemble(
    num_orbits: int,
    *,
    e_range: tuple[float, float],
    a_range: tuple[float, float],
    seed: int,
    m1: float = 1.0,
    m2: float = 1.0,
    G: float = 1.0,
    start: str = "apocentre",
    dim: int = 2,
    dtype: torch.dtype = torch.float64,
) -> tuple[State, torch.Tensor]:
    """num_orbits orbits with e stratified over e_range and a log-stratified over a_range, spanning
    both ranges edge to edge, random orientation.

    Stratified rather than i.i.d.: with 64 i.i.d. draws from [0, 0.99] the largest e was 0.95-0.99
    depending on the seed, and a model whose training orbits stopped at 0.97 put 41 % of its
    steps over the tolerance at e = 0.99 (benchmarks/README.md). Every seed now trains on the
    top of the range.
    """
    gen = torch.Generator().manual_seed(seed)
    q_e, q_a = _spanning_strata(num_orbits, gen, dtype), _spanning_strata(num_orbits, gen, dtype)
    e = e_range[0] + (e_range[1] - e_range[0]) * q_e
    log_a = math.log(a_range[0]) + (math.log(a_range[1]) - math.log(a_range[0])) * q_a
    angle = 2 * math.pi * torch.rand(num_orbits, generator=gen, dtype=dtype)
    return kepler_orbits(torch.exp(log_a), e, m1, m2, G=G, start=start, angle=angle, dim=dim, dtype=dtype)


def plummer_sphere(
    n: int, seed: int, batch: int = 1, dim: int = 3, dtype: torch.dtype = torch.float64
) -> State:
    """Plummer spheres of n equal-mass bodies in Henon units (G = M = 1, E = -1/4).

    Aarseth, Henon & Wielen (1974) sampling, shifted to the centre-of-mass frame and
    rescaled so that each system has exactly virial ratio 1/2 and E = -1/4 (with G = 1, no softening).
    """
    if n < 2:
        raise ValueError(f"a Plummer sphere needs n >= 2 bodies, got {n}")
    if dim != 3:
        raise ValueError("Plummer spheres are three-dimensional (dim = 3)")
    gen = torch.Generator().manual_seed(seed)
    mass = torch.full((batch, n), 1.0 / n, dtype=dtype)

    def isotropic(radius: torch.Tensor) -> torch.Tensor:
        u = torch.rand(radius.shape + (2,), generator=gen, dtype=dtype)
        cos_t = 2 * u[..., 0] - 1
        sin_t = torch.sqrt(1 - cos_t**2)
        phi = 2 * math.pi * u[..., 1]
        return radius[..., None] * torch.stack([sin_t * torch.cos(phi), sin_t * torch.sin(phi), cos_t], -1)

    x_mass = torch.rand(batch, n, generator=gen, dtype=dtype).clamp_min(1e-10) * 0.999
    r = 1.0 / torch.sqrt(x_mass.pow(-2.0 / 3.0) - 1.0)
    position = isotropic(r)
    # Velocity magnitude by von Neumann rejection on g(q) = q^2 (1 - q^2)^(7/2).
    q = torch.empty(batch, n, dtype=dtype)
    todo = torch.ones(batch, n, dtype=torch.bool)
    while bool(todo.any()):
        cand = torch.rand(batch, n, 2, generator=gen, dtype=dtype)
        accept = 0.1 * cand[..., 1] < cand[..., 0] ** 2 * (1 - cand[..., 0] ** 2) ** 3.5
        take = todo & accept
        q = torch.where(take, cand[..., 0], q)
        todo = todo & ~take
    v_escape = math.sqrt(2.0) * (1 + r**2) ** -0.25
    velocity = isotropic(q * v_escape)
    state = _to_centre_of_mass(position, velocity, mass)
    return _rescale_to_henon(state)


def _rescale_to_henon(state: State) -> State:
    """Scale velocities to virial ratio 1/2, then lengths (and velocities) so that E = -1/4."""
    g = Gravity()
    kin, pot = kinetic_energy(state), potential_energy(state, g)
    v_scale = torch.sqrt(-0.5 * pot / kin)[:, None, None]
    state = State(state.position, state.velocity * v_scale, state.mass)
    energy = kinetic_energy(state) + potential_energy(state, g)  # = pot / 2
    length = (energy / -0.25)[:, None, None]  # E scales as 1/length at fixed virial ratio
    return State(state.position * length, state.velocity / torch.sqrt(length), state.mass)


def figure_eight(dim: int = 2, dtype: torch.dtype = torch.float64) -> State:
    """The Chenciner-Montgomery figure-eight choreography of three unit masses (G = 1)."""
    x1 = torch.tensor([0.97000436, -0.24308753], dtype=dtype)
    v3 = torch.tensor([-0.93240737, -0.86473146], dtype=dtype)
    position = torch.stack([x1, -x1, torch.zeros_like(x1)])[None]
    velocity = torch.stack([-v3 / 2, -v3 / 2, v3])[None]
    return State(_planar(position, dim), _planar(velocity, dim), torch.ones(1, 3, dtype=dtype))


def pythagorean(dim: int = 2, dtype: torch.dtype = torch.float64) -> State:
    """Burrau's Pythagorean three-body problem: masses 3, 4, 5 at rest on a 3-4-5 triangle."""
    position = torch.tensor([[1.0, 3.0], [-2.0, -1.0], [1.0, -1.0]], dtype=dtype)[None]
    mass = torch.tensor([[3.0, 4.0, 5.0]], dtype=dtype)
    state = _to_centre_of_mass(position, torch.zeros_like(position), mass)
    return State(_planar(state.position, dim), _planar(state.velocity, dim), state.mass)


def free_fall_three_body(
    num: int, seed: int, mass_range: tuple[float, float] = (1.0, 5.0), dim: int = 2,
    dtype: torch.dtype = torch.float64,
) -> State:
    """An ensemble of free-fall three-body problems (the Pythagorean problem's family): three
    bodies at rest at random points of the square [-2, 2]^2 with masses uniform in mass_range,
    in the centre-of-mass frame."""
    gen = torch.Generator().manual_seed(seed)
    position = 4.0 * torch.rand(num, 3, 2, generator=gen, dtype=dtype) - 2.0
    mass = mass_range[0] + (mass_range[1] - mass_range[0]) * torch.rand(num, 3, generator=gen, dtype=dtype)
    state = _to_centre_of_mass(position, torch.zeros_like(position), mass)
    return State(_planar(state.position, dim), _planar(state.velocity, dim), state.mass)


def free_fall(num: int, n: int, seed: int, mass_range: tuple[float, float] = (1.0, 5.0), dim: int = 2,
              dtype: torch.dtype = torch.float64) -> State:
    """Cold collapses of n bodies (the Pythagorean family at any n): at rest at random points of the
    square [-2, 2]^2, masses uniform in mass_range, centre-of-mass frame."""
    gen = torch.Generator().manual_seed(seed)
    position = 4.0 * torch.rand(num, n, 2, generator=gen, dtype=dtype) - 2.0
    mass = mass_range[0] + (mass_range[1] - mass_range[0]) * torch.rand(num, n, generator=gen, dtype=dtype)
    state = _to_centre_of_mass(position, torch.zeros_like(position), mass)
    return State(_planar(state.position, dim), _planar(state.velocity, dim), state.mass)


def perturbed_figure_eights(num: int, seed: int, sigma_max: float = 0.1, dim: int = 2,
                            dtype: torch.dtype = torch.float64) -> State:
    """Figure-eights whose positions and velocities are perturbed by Gaussian noise of a standard
    deviation uniform in [0, sigma_max] per system (0: the choreography itself), in the plane."""
    gen = torch.Generator().manual_seed(seed)
    base = figure_eight(2, dtype)
    sigma = sigma_max * torch.rand(num, 1, 1, generator=gen, dtype=dtype)
    position = base.position + sigma * torch.randn(num, 3, 2, generator=gen, dtype=dtype)
    velocity = base.velocity + sigma * torch.randn(num, 3, 2, generator=gen, dtype=dtype)
    state = _to_centre_of_mass(position, velocity, base.mass.expand(num, 3))
    return State(_planar(state.position, dim), _planar(state.velocity, dim), state.mass)


def hierarchical(num: int, n: int, seed: int, *, e_range: tuple[float, float] = (0.0, 0.9),
                 ratio_range: tuple[float, float] = (4.0, 12.0), mass_range: tuple[float, float] = (0.2, 1.0),
                 G: float = 1.0, dim: int = 2, dtype: torch.dtype = torch.float64) -> State:
    """Hierarchical systems of n >= 2 bodies: an inner binary (a = 1, e uniform in e_range) and
    n - 2 outer companions, each on a Kepler orbit around the centre of mass of everything inside it,
    its semi-major axis ratio_range (log-uniform) times the previous one, e uniform in [0, e_hi / 2],
    random orientation (a random tilt in 3-D) and start at apocentre or pericentre. Masses uniform
    in mass_range."""
    if n < 2:
        raise ValueError(f"a hierarchical system needs n >= 2 bodies, got {n}")
    gen = torch.Generator().manual_seed(seed)
    mass = mass_range[0] + (mass_range[1] - mass_range[0]) * torch.rand(num, n, generator=gen, dtype=dtype)
    position = torch.zeros(num, n, 3, dtype=dtype)
    velocity = torch.zeros(num, n, 3, dtype=dtype)
    a = torch.ones(num, dtype=dtype)
    for k in range(1, n):
        inner = mass[:, :k].sum(-1)
        e_hi = e_range[1] if k == 1 else e_range[1] / 2
        e = e_range[0] + (e_hi - e_range[0]) * torch.rand(num, generator=gen, dtype=dtype)
        if k > 1:
            log_r = torch.rand(num, generator=gen, dtype=dtype) * math.log(ratio_range[1] / ratio_range[0])
            a = a * ratio_range[0] * torch.exp(log_r)
        angle = 2 * math.pi * torch.rand(num, generator=gen, dtype=dtype)
        peri = torch.rand(num, generator=gen) < 0.5
        apo, _ = kepler_orbits(a, e, inner, mass[:, k], G=G, start="apocentre", angle=angle, dim=3, dtype=dtype)
        per, _ = kepler_orbits(a, e, inner, mass[:, k], G=G, start="pericentre", angle=angle, dim=3, dtype=dtype)
        orbit = per.where(peri, apo)
        rel_x = orbit.position[:, 1] - orbit.position[:, 0]
        rel_v = orbit.velocity[:, 1] - orbit.velocity[:, 0]
        if dim == 3:  # tilt the new orbit about the x axis by up to 30 degrees
            tilt = (math.pi / 6) * (2 * torch.rand(num, generator=gen, dtype=dtype) - 1)
            c, s = torch.cos(tilt)[:, None], torch.sin(tilt)[:, None]

            def rot(u: torch.Tensor) -> torch.Tensor:
                return torch.cat([u[:, :1], c * u[:, 1:2] - s * u[:, 2:3], s * u[:, 1:2] + c * u[:, 2:3]], 1)

            rel_x, rel_v = rot(rel_x), rot(rel_v)
        f_in = (mass[:, k] / (inner + mass[:, k]))[:, None]
        f_out = (inner / (inner + mass[:, k]))[:, None]
        position[:, :k] -= f_in[:, None] * rel_x[:, None]
        velocity[:, :k] -= f_in[:, None] * rel_v[:, None]
        position[:, k] = f_out * rel_x
        velocity[:, k] = f_out * rel_v
    state = _to_centre_of_mass(position, velocity, mass)
    return State(state.position[..., :dim], state.velocity[..., :dim], state.mass)


def pad_bodies(states: list[State], n_max: int) -> State:
    """One batch of systems of different N: each padded to n_max bodies with zero-mass bodies at the
    origin (padding, which gravity ignores: nbody_dt.physics.gravity)."""
    out = []
    for s in states:
        extra = n_max - s.num_bodies
        if extra < 0:
            raise ValueError(f"a system of {s.num_bodies} bodies does not fit a batch of N = {n_max}")
        z = s.position.new_zeros(s.batch_size, extra, s.dim)
        out.append(State(torch.cat([s.position, z], 1), torch.cat([s.velocity, z.clone()], 1),
                         torch.cat([s.mass, s.mass.new_zeros(s.batch_size, extra)], 1)))
    return State.cat(out)


def scaled(state: State, length: float) -> State:
    """The same systems with lengths times `length` (velocities / sqrt(length), masses kept): the
    same orbits in scale-free terms, on a scale where a fixed softening no longer matters."""
    if length == 1.0:
        return state
    return State(state.position * length, state.velocity / math.sqrt(length), state.mass)
