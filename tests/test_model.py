"""Model layer: history window, features, the dt network, losses, gradients and non-finite safety."""

from __future__ import annotations

import math

import pytest
import torch

from nbody_dt import config as C
from nbody_dt.model.evaluate import StepCriteria, evaluate_step
from nbody_dt.model.features import compute_features, derive_scales, feature_dim, pair_features
from nbody_dt.model.history import History
from nbody_dt.model.losses import MAX_LOCAL_EXPONENT, band_loss, margin_loss, regression_loss
from nbody_dt.model.network import LOG_DT_BOUND, DtNetwork
from nbody_dt.physics import initial_conditions as ics
from nbody_dt.physics.gravity import Gravity, min_freefall_time, pair_freefall_times
from nbody_dt.physics.integrator import kdk_step
from nbody_dt.physics.state import State
from tests.conftest import LEGACY

F64 = torch.float64
G1 = Gravity()
KINDS = ("basic", "rich", "delta_mag")


def ensemble(b: int = 6, seed: int = 1) -> State:
    s, _ = ics.kepler_ensemble(b, e_range=(0.0, 0.9), a_range=(0.5, 2.0), seed=seed)
    return s


def three_body_batch(b: int = 4, seed: int = 0) -> State:
    gen = torch.Generator().manual_seed(seed)
    return State(torch.randn(b, 3, 2, generator=gen, dtype=F64), 0.3 * torch.randn(b, 3, 2, generator=gen, dtype=F64),
                 0.5 + torch.rand(b, 3, generator=gen, dtype=F64))


def past(state: State, steps: int, dt: float = 0.05) -> list[State]:
    """The states 1..steps KDK steps of dt before `state` (most recent first)."""
    out, s = [], state
    for _ in range(steps):
        s = kdk_step(s, torch.full((state.batch_size,), -dt, dtype=F64), G1)
        out.append(s)
    return out


def tiny_net(kind: str, n: int, k: int, output: str = "log_freefall", **kw) -> DtNetwork:
    torch.manual_seed(0)
    return DtNetwork(kind, n, 2, k, [8, 8], "silu", output, G1, **kw)


def criteria(kind: str, lower=1e-12, upper=2e-12, accept=(0.0, 1.0)) -> StepCriteria:
    return StepCriteria(gravity=G1, energy_threshold=accept[1], accept_lower=accept[0], loss_kind=kind,
                        loss_lower=lower, loss_upper=upper, loss_exponent=3.0, nonfinite_penalty=10.0)


# ---------------------------------------------------------------- history


def test_history_empty_is_zero_padded():
    s = three_body_batch(3)
    h = History.empty(s, 4)
    assert h.length == 4
    assert h.position.shape == (3, 4, 3, 2) and h.velocity.shape == (3, 4, 3, 2) and h.valid.shape == (3, 4)
    assert h.valid.dtype == torch.bool and not bool(h.valid.any())
    assert not bool(h.position.any()) and not bool(h.velocity.any())
    assert h.position.dtype == F64
    assert History.empty(s, 0).length == 0


def test_history_push_ordering_and_valid_flags():
    s0, s1, s2 = three_body_batch(2, 0), three_body_batch(2, 1), three_body_batch(2, 2)
    h = History.empty(s0, 3)
    h1 = h.push(s0)
    assert h1.valid.tolist() == [[True, False, False]] * 2
    assert torch.equal(h1.position[:, 0], s0.position) and not bool(h1.position[:, 1:].any())
    h3 = h1.push(s1).push(s2)
    assert h3.valid.tolist() == [[True, True, True]] * 2
    for slot, s in enumerate((s2, s1, s0)):  # slot 0 is the most recent
        assert torch.equal(h3.position[:, slot], s.position) and torch.equal(h3.velocity[:, slot], s.velocity)
    h4 = h3.push(s0)  # the oldest drops out
    assert torch.equal(h4.position[:, 0], s0.position) and torch.equal(h4.position[:, 2], s1.position)
    # push returns a new history; the old one is unchanged.
    assert h1.valid.tolist() == [[True, False, False]] * 2
    # K = 0 is a no-op.
    h0 = History.empty(s0, 0)
    assert h0.push(s1) is h0


def test_history_select_where_cat():
    s0, s1 = three_body_batch(3, 0), three_body_batch(3, 1)
    a = History.empty(s0, 2).push(s0)
    b = History.empty(s1, 2).push(s1).push(s0)
    w = a.where(torch.tensor([True, False, True]), b)
    assert w.valid.tolist() == [[True, False], [True, True], [True, False]]
    assert torch.equal(w.position[1], b.position[1]) and torch.equal(w.position[0], a.position[0])
    sel = b.select(torch.tensor([2]))
    assert torch.equal(sel.position[0], b.position[2])
    assert History.cat([a, b]).position.shape[0] == 6


# ---------------------------------------------------------------- features


@pytest.mark.parametrize("kind", KINDS)
def test_feature_dim_matches_computed_features(kind):
    for n, k in ((2, 0), (3, 2)):
        if kind == "delta_mag" and k == 0:
            continue
        s = three_body_batch(4) if n == 3 else ensemble(4)
        h = History.empty(s, k)
        for p in past(s, k)[::-1]:
            h = h.push(p)
        x, t_min = compute_features(kind, s, h, G1, derive_scales(s, G1))
        assert x.shape == (4, feature_dim(kind, n, 2, k))
        assert bool(torch.isfinite(x).all())
        torch.testing.assert_close(t_min, min_freefall_time(s, G1), rtol=1e-13, atol=0)
    with pytest.raises(ValueError):
        feature_dim("nope", 2, 2, 0)


def _padded_columns(kind: str, n: int, d: int, k: int, slot: int) -> list[int]:
    """Feature columns that belong to history slot `slot` (widths from feature_dim, not hard-coded)."""
    if kind == "basic":
        width = feature_dim("basic", n, d, 0) - n  # [state | slot 0 | slot 1 | ... | mass fractions]
        return list(range(width * (1 + slot), width * (2 + slot)))
    rich = feature_dim("rich", n, d, 0)
    if kind == "rich":  # [state | slot 0 | slot 1 | ...]
        return list(range(rich * (1 + slot), rich * (2 + slot)))
    # delta_mag: [rich | dx magnitudes (K, N) | dv magnitudes (K, N)]
    assert feature_dim("delta_mag", n, d, k) == rich + 2 * n * k
    return [rich + slot * n + i for i in range(n)] + [rich + k * n + slot * n + i for i in range(n)]


@pytest.mark.parametrize("kind", KINDS)
def test_zero_padded_slots_give_zero_features_independent_of_padding(kind):
    s = three_body_batch(3, 5)
    k = 3
    pasts = past(s, 2)
    h = History.empty(s, k).push(pasts[1]).push(pasts[0])  # slots 0, 1 valid, slot 2 padded
    # System 0 has only one past state: slot 1 is padded too.
    valid = h.valid.clone()
    valid[0, 1] = False
    clean = History(h.position * valid[..., None, None], h.velocity * valid[..., None, None], valid)
    garbage_x = torch.where(valid[..., None, None], clean.position, torch.randn_like(clean.position) * 7.0)
    garbage_v = torch.where(valid[..., None, None], clean.velocity, torch.randn_like(clean.velocity) * 7.0)
    dirty = History(garbage_x, garbage_v, valid)
    scales = derive_scales(s, G1)
    x_clean, _ = compute_features(kind, s, clean, G1, scales)
    x_dirty, _ = compute_features(kind, s, dirty, G1, scales)
    assert torch.equal(x_clean, x_dirty), "features must not depend on padded slot contents"
    for b in range(3):
        for slot in range(k):
            cols = _padded_columns(kind, 3, 2, k, slot)
            if bool(valid[b, slot]):
                assert bool(x_clean[b, cols].abs().sum() > 0), (b, slot)
            else:
                assert not bool(x_clean[b, cols].any()), (b, slot)


def test_rich_features_are_scale_and_rotation_free():
    s = three_body_batch(4, 3)
    h = History.empty(s, 0)
    x, t_min = compute_features("rich", s, h, G1, torch.ones(4, dtype=F64))
    lam, th = 3.7, 0.9
    rot = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=F64)
    moved = State(lam * s.position @ rot.T + torch.tensor([5.0, -2.0], dtype=F64),
                  lam**-0.5 * s.velocity @ rot.T + torch.tensor([0.3, 0.1], dtype=F64), s.mass)
    y, t_min2 = compute_features("rich", moved, History.empty(moved, 0), G1, torch.ones(4, dtype=F64))
    torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(t_min2, lam**1.5 * t_min, rtol=1e-12, atol=0)


def test_pair_features_sorted_by_free_fall_time():
    s = three_body_batch(5, 4)
    feats, t_min = pair_features(s.position, s.velocity, s.mass, G1)
    per_pair = feature_dim("rich", 3, 2, 0) // 3
    assert feats.shape == (5, 3, per_pair) and bool(torch.isfinite(feats).all())
    # Independent references, pairs sorted by free-fall time: log(t_ff / min t_ff), the radial
    # cosine and the mass fraction must each be one of the columns.
    t_ff = pair_freefall_times(s, G1)
    order = t_ff.argsort(-1)
    i, j = torch.triu_indices(3, 3, offset=1)
    dx, dv = s.position[:, j] - s.position[:, i], s.velocity[:, j] - s.velocity[:, i]
    cosine = (dx * dv).sum(-1) / (dx.norm(dim=-1) * dv.norm(dim=-1))
    fraction = (s.mass[:, i] + s.mass[:, j]) / s.mass.sum(-1, keepdim=True)
    log_ratio = torch.log(t_ff.gather(1, order) / t_ff.min(-1, keepdim=True).values)
    torch.testing.assert_close(t_min, t_ff.min(-1).values, rtol=1e-13, atol=0)
    for name, ref in (("log t_ff ratio", log_ratio), ("cosine", cosine.gather(1, order)),
                      ("mass fraction", fraction.gather(1, order))):
        matches = [c for c in range(per_pair) if torch.allclose(feats[..., c], ref, rtol=1e-10, atol=1e-12)]
        assert matches, f"no feature column is the {name}"
    assert bool((log_ratio[:, 1:] >= log_ratio[:, :-1]).all()) and bool((log_ratio[:, 0] == 0).all())


def test_derive_scales():
    s = ensemble(8)
    length, velocity, acc, time = derive_scales(s, G1).tolist()
    assert length > 0 and velocity > 0 and acc > 0
    assert time == pytest.approx(math.sqrt(length / acc), rel=1e-14)
    at_rest = State(s.position, torch.zeros_like(s.velocity), s.mass)
    assert derive_scales(at_rest, G1)[1].item() == pytest.approx(length / time, rel=1e-14)


# ---------------------------------------------------------------- network


def test_network_initial_dt_and_positivity():
    s = ensemble(6)
    h = History.empty(s, 0)
    net = tiny_net("rich", 2, 0, initial_dt=0.02)
    dt = net(s, h)
    t_ff = min_freefall_time(s, G1)
    ratio = dt / t_ff
    assert bool((ratio > 0.02 / 1.5).all() and (ratio < 0.02 * 1.5).all()), ratio
    sp = tiny_net("basic", 2, 0, output="softplus", initial_dt=0.02)
    sp.set_scales(s)
    dt_sp = sp(s, h) / sp.scales[3]
    assert bool((dt_sp > 0.02 / 1.5).all() and (dt_sp < 0.02 * 1.5).all()), dt_sp
    # log dt is bounded around t_ff however large the network output.
    with torch.no_grad():
        net.mlp[-1].bias.fill_(1e6)
    assert torch.allclose(net.log_dt(s, h), torch.log(t_ff) + LOG_DT_BOUND, rtol=1e-12, atol=1e-12)


def test_network_scales_are_saved_with_the_weights_and_fourier_features():
    s = ensemble(6)
    net = tiny_net("rich", 2, 0, fourier_features=3)
    net.set_scales(s)
    assert torch.equal(net.scales, derive_scales(s, G1))
    sd = net.state_dict()
    assert "scales" in sd and "fourier" in sd and sd["fourier"].shape == (3, feature_dim("rich", 2, 2, 0))
    other = tiny_net("rich", 2, 0, fourier_features=3)
    other.load_state_dict(sd)
    h = History.empty(s, 0)
    assert torch.equal(other(s, h), net(s, h))
    assert net.mlp[0].in_features == feature_dim("rich", 2, 2, 0) + 6


def test_network_from_config():
    cfg = C.load(overrides=LEGACY + ["model.hidden=[8, 4]", "model.activation='tanh'", "model.features='basic'",
                            "model.history_len=2", "physics.G=2.0"])
    net = DtNetwork.from_config(cfg, num_bodies=2)
    linear = [m for m in net.mlp if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linear] == [8, 4, 1]
    assert linear[0].in_features == feature_dim("basic", 2, 2, 2)
    assert isinstance(net.mlp[1], torch.nn.Tanh) and net.gravity.G == 2.0 and net.history_len == 2
    assert linear[0].weight.dtype == F64


# ---------------------------------------------------------------- losses


def test_band_and_regression_losses():
    err = torch.tensor([1e-6, 5e-5, 1e-4, 2e-4, 1e-2], dtype=F64)
    log_dt = torch.zeros(5, dtype=F64, requires_grad=True)
    lo, hi = 5e-5, 1e-4
    band = band_loss(err, log_dt, lo, hi, 10.0)
    dist = torch.tensor([math.log(1e-6 / lo), 0.0, 0.0, math.log(2e-4 / hi), math.log(1e-2 / hi)], dtype=F64)
    torch.testing.assert_close(band, dist**2, rtol=1e-12, atol=1e-15)
    reg = regression_loss(err, log_dt, lo, hi, 3.0, 10.0)
    torch.testing.assert_close(reg, (dist / 3.0) ** 2, rtol=1e-12, atol=1e-15)
    (g,) = torch.autograd.grad(reg.sum(), log_dt)
    # d/dlog_dt (log_dt - target)^2 with the target detached: too large an error pushes dt down.
    torch.testing.assert_close(g, 2 * dist / 3.0, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("fn", ["band", "regression"])
def test_overshoot_weight_scales_only_samples_above_the_band(fn):
    err = torch.tensor([1e-6, 7e-5, 2e-4, 1e-2, float("inf")], dtype=F64)
    log_dt = torch.zeros(5, dtype=F64, requires_grad=True)

    def loss(weight):
        if fn == "band":
            return band_loss(err, log_dt, 5e-5, 1e-4, 7.0, overshoot_weight=weight)
        return regression_loss(err, log_dt, 5e-5, 1e-4, 3.0, 7.0, overshoot_weight=weight)

    plain, weighted = loss(1.0), loss(4.0)
    assert plain[0] > 0 and plain[1] == 0 and plain[2] > 0
    torch.testing.assert_close(weighted[:2], plain[:2], rtol=0, atol=0)  # below and inside: unchanged
    torch.testing.assert_close(weighted[2:4], 4.0 * plain[2:4], rtol=1e-12, atol=0)
    assert weighted[4] == plain[4] == 7.0  # the non-finite penalty is its own figure
    (g1,) = torch.autograd.grad(plain.sum(), log_dt)
    (g4,) = torch.autograd.grad(loss(4.0).sum(), log_dt)
    torch.testing.assert_close(g4[2:4], 4.0 * g1[2:4], rtol=1e-12, atol=0)


@pytest.mark.parametrize("p", [3.0, 4.0, 6.0])
def test_margin_loss_puts_dt_at_a_fixed_fraction_of_the_threshold_dt_whatever_the_exponent(p):
    """On an exact power law err = c dt^p the band is [0.84, 0.9] x dt_thr for every p."""
    threshold, c, ratio = 2e-4, 0.5, 1.1
    dt_thr = (threshold / c) ** (1 / p)
    fractions = torch.tensor([0.5, 0.8, 0.86, 0.95, 1.2], dtype=F64)
    log_dt = torch.log(fractions * dt_thr).requires_grad_(True)
    dt = log_dt.detach().exp()
    loss = margin_loss(c * dt**p, c * (ratio * dt) ** p, log_dt, threshold=threshold, lower=0.84, upper=0.9,
                       probe_ratio=ratio, min_exponent=3.0, penalty=10.0)
    expected = torch.tensor([math.log(0.5 / 0.84), math.log(0.8 / 0.84), 0.0, math.log(0.95 / 0.9),
                             math.log(1.2 / 0.9)], dtype=F64)
    torch.testing.assert_close(loss, expected**2, rtol=1e-9, atol=1e-15)
    (g,) = torch.autograd.grad(loss.sum(), log_dt)
    torch.testing.assert_close(g, 2 * expected, rtol=1e-9, atol=1e-15)  # too small: push dt up, too large: down


def test_margin_loss_with_a_cubic_law_is_the_regression_loss_on_the_matching_error_band():
    threshold, lo, hi = 2e-4, 0.84, 0.9
    err = torch.tensor([1e-6, 5e-5, 1.2e-4, 3e-4, 1e-2], dtype=F64)
    log_dt = torch.zeros(5, dtype=F64, requires_grad=True)
    margin = margin_loss(err, err * 1.1**3, log_dt, threshold=threshold, lower=lo, upper=hi, probe_ratio=1.1,
                         min_exponent=3.0, penalty=10.0)
    regression = regression_loss(err, log_dt, threshold * lo**3, threshold * hi**3, 3.0, 10.0)
    torch.testing.assert_close(margin, regression, rtol=1e-9, atol=1e-15)


def test_margin_loss_clamps_the_measured_exponent_and_falls_back_where_the_probe_is_not_finite():
    threshold, err = 2e-4, torch.tensor([1e-5, 1e-5, 1e-5, 1e-5], dtype=F64)
    # measured exponents: -5 (error falling), 40 (steep), a non-finite probe, a zero probe error
    probe = torch.tensor([1e-5 * 1.1**-5, 1e-5 * 1.1**40, float("nan"), 0.0], dtype=F64)
    log_dt = torch.zeros(4, dtype=F64, requires_grad=True)
    loss = margin_loss(err, probe, log_dt, threshold=threshold, lower=0.84, upper=0.9, probe_ratio=1.1,
                       min_exponent=3.0, penalty=10.0)
    log_thr_over = math.log(threshold / 1e-5)  # log dt_thr - log dt = this / p
    used = torch.tensor([3.0, MAX_LOCAL_EXPONENT, 3.0, 3.0], dtype=F64)
    torch.testing.assert_close(loss, (log_thr_over / used + math.log(0.84)) ** 2, rtol=1e-9, atol=1e-15)


def test_margin_loss_never_admits_a_dt_below_the_acceptance_band():
    """A steep law (p = 12) puts 0.84 dt_thr at err = 0.84^12 threshold < accept_lower: push dt up as
    the regression loss would (along the minimum exponent, 3)."""
    threshold, accept_lower, c, p = 2e-4, 5e-5, 1.0, 12.0
    dt_thr = (threshold / c) ** (1 / p)
    log_dt = torch.tensor([math.log(0.85 * dt_thr)], dtype=F64, requires_grad=True)
    dt = log_dt.detach().exp()
    err = c * dt**p
    assert float(err) < accept_lower
    loose = margin_loss(err, c * (1.1 * dt) ** p, log_dt, threshold=threshold, lower=0.84, upper=0.9, probe_ratio=1.1,
                        min_exponent=3.0, penalty=10.0)
    strict = margin_loss(err, c * (1.1 * dt) ** p, log_dt, threshold=threshold, lower=0.84, upper=0.9, probe_ratio=1.1,
                         min_exponent=3.0, penalty=10.0,
                         accept_lower=accept_lower)
    assert float(loose.detach()) == 0.0
    torch.testing.assert_close(strict, (torch.log(accept_lower / err) / 3.0) ** 2, rtol=1e-9, atol=0)
    regression = regression_loss(err, log_dt, accept_lower, 1e-3, 3.0, 10.0)
    torch.testing.assert_close(strict, regression, rtol=1e-9, atol=0)


@pytest.mark.parametrize("fn", ["band", "regression", "margin"])
def test_losses_are_finite_for_non_finite_errors(fn):
    err = torch.tensor([float("nan"), float("inf"), 1e-3], dtype=F64)
    log_dt = torch.tensor([0.5, -1.0, 0.0], dtype=F64, requires_grad=True)
    loss = {"band": lambda: band_loss(err, log_dt, 1e-5, 1e-4, 7.0),
            "regression": lambda: regression_loss(err, log_dt, 1e-5, 1e-4, 3.0, 7.0),
            "margin": lambda: margin_loss(err, err * 2, log_dt, threshold=2e-4, lower=0.84, upper=0.9, probe_ratio=1.1,
                                          min_exponent=3.0, penalty=7.0)}[fn]()
    assert loss[:2].tolist() == [7.0, 7.0]
    (g,) = torch.autograd.grad(loss.sum(), log_dt)
    assert bool(torch.isfinite(g).all()) and g[:2].tolist() == [7.0, 7.0]


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("loss_kind", ["band", "regression"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(loss_kind, kind):
    s = ensemble(8)
    k = 2
    pasts = past(s, k)
    h = History.empty(s, k).push(pasts[1]).push(pasts[0])
    net = tiny_net(kind, 2, k, fourier_features=2)
    net.set_scales(s)
    # A loss band far below every error: every sample carries loss.
    ev = evaluate_step(net, s, h, criteria(loss_kind))
    assert bool((ev.loss > 0).all())
    ev.loss.mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().sum()) > 0, f"no gradient reaches {name}"


# ---------------------------------------------------------------- non-finite energy errors


def _assert_finite_loss_and_grads(net: DtNetwork, s: State, loss_kind: str) -> None:
    net.zero_grad(set_to_none=True)
    ev = evaluate_step(net, s, History.empty(s, net.history_len), criteria(loss_kind, 6e-5, 1.2e-4, (2.5e-5, 2e-4)))
    assert not bool(torch.isfinite(ev.rel_dE).all()), "the test needs a non-finite energy error"
    assert bool(torch.isfinite(ev.loss).all()), ev.loss
    assert not bool(ev.passed[~torch.isfinite(ev.rel_dE)].any())
    ev.loss.mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name


@pytest.mark.parametrize("loss_kind", ["band", "regression"])
def test_huge_dt_gives_finite_loss_and_gradients(loss_kind):
    s = ensemble(3)
    net = tiny_net("rich", 2, 0, output="softplus")
    with torch.no_grad():
        net.mlp[-1].bias[0] = 1e300  # dt ~ 1e300: the step overflows
    _assert_finite_loss_and_grads(net, s, loss_kind)


@pytest.mark.parametrize("loss_kind", ["band", "regression"])
def test_nearly_coincident_bodies_give_finite_loss_and_gradients(loss_kind):
    x = torch.tensor([[[0.0, 0.0], [1e-105, 0.0], [1.0, 0.0]]], dtype=F64)
    v = torch.tensor([[[0.0, 0.1], [0.0, -0.1], [0.0, 0.3]]], dtype=F64)
    s = State(x, v, torch.ones(1, 3, dtype=F64))  # |a| ~ 1e210 overflows in the step
    _assert_finite_loss_and_grads(tiny_net("rich", 3, 0), s, loss_kind)


@pytest.mark.parametrize("kind", ["basic", "rich"])
@pytest.mark.parametrize("loss_kind", ["band", "regression"])
def test_coincident_bodies_give_finite_loss_and_gradients(loss_kind, kind):
    x = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [1.0, 0.0], [-1.0, 0.5]]], dtype=F64)
    v = torch.tensor([[[0.0, 0.1], [0.0, -0.1], [0.0, 0.3]]] * 2, dtype=F64)
    s = State(x, v, torch.ones(2, 3, dtype=F64))  # system 0: bodies 0 and 1 at the same position
    net = tiny_net(kind, 3, 0)
    _assert_finite_loss_and_grads(net, s, loss_kind)
    # The healthy system of the batch is unaffected by its singular neighbour.
    ev = evaluate_step(net, s, History.empty(s, 0), criteria(loss_kind))
    alone = evaluate_step(net, s.select(torch.tensor([1])), History.empty(s.select(torch.tensor([1])), 0),
                          criteria(loss_kind))
    torch.testing.assert_close(ev.dt[1:], alone.dt, rtol=1e-12, atol=0)
