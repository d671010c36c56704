"""The evaluation primitive: vectorized = per-sample loop, caps, criteria, and the learned policy."""

from __future__ import annotations

import pytest
import torch

from nbody_dt import config as C
from nbody_dt.model.evaluate import StepCriteria, evaluate_step
from nbody_dt.model.history import History
from nbody_dt.model.losses import margin_loss
from nbody_dt.model.network import DtNetwork
from nbody_dt.model.policy import LearnedPolicy
from nbody_dt.physics import initial_conditions as ics
from nbody_dt.physics.gravity import Gravity, total_energy
from nbody_dt.physics.integrator import kdk_step, relative_energy_error
from nbody_dt.physics.simulate import simulate
from nbody_dt.physics.state import State

F64 = torch.float64
G1 = Gravity()
B = 16


def batch_with_history(k: int) -> tuple[State, History]:
    """B Kepler states with a K-slot history whose validity differs across systems (0, 1, .. K valid slots)."""
    # e >= 0.05: the stratified ensemble spans its range, and the band loss's gradient through the step
    # of an exactly circular orbit (err ~ dt^6, tiny) is dominated by round-off
    s, _ = ics.kepler_ensemble(B, e_range=(0.05, 0.95), a_range=(0.5, 2.0), seed=1)
    h = History.empty(s, k)
    older = []
    p = s
    for _ in range(k):
        p = kdk_step(p, torch.full((B,), -0.05, dtype=F64), G1)
        older.append(p)
    for p in reversed(older):
        h = h.push(p)
    valid = h.valid.clone()
    for b in range(B):
        valid[b, b % (k + 1):] = False
    return s, History(h.position * valid[..., None, None], h.velocity * valid[..., None, None], valid)


def model(kind: str, k: int, s: State, output: str = "log_freefall") -> DtNetwork:
    torch.manual_seed(3)
    net = DtNetwork(kind, 2, 2, k, [8, 8], "silu", output, G1, initial_dt=0.1)
    net.set_scales(s)
    with torch.no_grad():  # spread the predicted dt over a decade or two
        net.mlp[-1].weight.mul_(30)
    return net


def geometric_mid(sorted_values: torch.Tensor, i: int) -> float:
    return float((sorted_values[i] * sorted_values[i + 1]).sqrt())


def band_criteria(net: DtNetwork, s: State, h: History, loss_kind: str) -> StepCriteria:
    """An acceptance band that passes about half of the batch and a loss band inside it,
    with edges placed between observed errors (no sample sits on an edge)."""
    wide = StepCriteria(gravity=G1, energy_threshold=1.0, accept_lower=0.0, loss_kind=loss_kind, loss_lower=1e-8,
                        loss_upper=1e-7, loss_exponent=3.0, nonfinite_penalty=10.0)
    probe = evaluate_step(net, s, h, wide)
    q = probe.rel_dE.sort().values
    return StepCriteria(gravity=G1, energy_threshold=geometric_mid(q, 11), accept_lower=geometric_mid(q, 3),
                        loss_kind=loss_kind, loss_lower=geometric_mid(q, 5),
                        loss_upper=geometric_mid(q, 9), loss_exponent=3.0, nonfinite_penalty=10.0)


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.detach(), b.detach()
    assert a.shape == b.shape, what
    scale = torch.maximum(a.abs(), b.abs())
    rel = torch.where(scale > 0, (a - b).abs() / scale, torch.zeros_like(scale))
    assert float(rel.max()) <= 1e-12, f"{what}: max relative difference {float(rel.max()):.3e}"


@pytest.mark.parametrize("loss_kind", ["band", "regression"])
@pytest.mark.parametrize("kind,k", [("basic", 2), ("rich", 2), ("delta_mag", 2), ("rich", 0)])
def test_vectorized_evaluation_equals_per_sample_loop(kind, k, loss_kind):
    s, h = batch_with_history(k)
    net = model(kind, k, s)
    crit = band_criteria(net, s, h, loss_kind)
    ev = evaluate_step(net, s, h, crit)
    passed = int(ev.passed.sum())
    assert 0 < passed < B, "the test needs passing and failing samples"
    assert bool((ev.loss > 0).any()) and bool((ev.loss == 0).any())
    loop = [evaluate_step(net, s.select(slice(i, i + 1)), h.select(slice(i, i + 1)), crit) for i in range(B)]
    for field in ("dt", "log_dt", "rel_dE", "loss"):
        assert_rel_close(getattr(ev, field), torch.cat([getattr(e, field) for e in loop]), field)
    assert torch.equal(ev.passed, torch.cat([e.passed for e in loop]))
    assert_rel_close(ev.next_state.position, torch.cat([e.next_state.position for e in loop]), "next position")
    # Gradients of the batch mean equal the mean of the per-sample gradients.
    net.zero_grad()
    ev.loss.mean().backward()
    batch_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    for e in loop:
        (e.loss.sum() / B).backward()
    for g_batch, p in zip(batch_grads, net.parameters()):
        torch.testing.assert_close(g_batch, p.grad, rtol=1e-9, atol=1e-12)


def test_evaluation_is_one_kdk_step_with_the_predicted_dt():
    s, h = batch_with_history(1)
    net = model("rich", 1, s)
    crit = StepCriteria(gravity=G1, energy_threshold=2e-4, accept_lower=2.5e-5, loss_kind="band", loss_lower=6e-5,
                        loss_upper=1.2e-4, loss_exponent=3.0, nonfinite_penalty=10.0)
    ev = evaluate_step(net, s, h, crit)
    torch.testing.assert_close(ev.dt, net(s, h), rtol=1e-15, atol=0)
    torch.testing.assert_close(ev.log_dt, torch.log(ev.dt), rtol=1e-15, atol=0)
    after = kdk_step(s, ev.dt.detach(), G1)
    assert torch.equal(ev.next_state.position, after.position) and torch.equal(ev.next_state.velocity, after.velocity)
    err = relative_energy_error(total_energy(s, G1), total_energy(after, G1))
    assert torch.equal(ev.rel_dE, err)
    assert torch.equal(ev.passed, (err >= 2.5e-5) & (err < 2e-4))
    assert not ev.next_state.position.requires_grad and not ev.rel_dE.requires_grad
    # substeps: the same dt split into two KDK steps.
    crit2 = StepCriteria(gravity=G1, energy_threshold=2e-4, accept_lower=2.5e-5, loss_kind="band", loss_lower=6e-5,
                         loss_upper=1.2e-4, loss_exponent=3.0, nonfinite_penalty=10.0, substeps=2)
    ev2 = evaluate_step(net, s, h, crit2)
    torch.testing.assert_close(ev2.next_state.position, kdk_step(s, ev.dt.detach(), G1, 2).position,
                               rtol=1e-14, atol=1e-15)
    assert bool((ev2.rel_dE < ev.rel_dE).all())


def test_max_dt_caps_the_step():
    s, h = batch_with_history(0)
    net = model("rich", 0, s)
    crit = StepCriteria(gravity=G1, energy_threshold=2e-4, accept_lower=2.5e-5, loss_kind="regression",
                        loss_lower=6e-5, loss_upper=1.2e-4, loss_exponent=3.0, nonfinite_penalty=10.0)
    free = evaluate_step(net, s, h, crit).dt.detach()
    cap = free.clone()
    cap[::2] = free[::2] / 3
    cap[1::2] = free[1::2] * 3
    capped = evaluate_step(net, s, h, crit, max_dt=cap).dt.detach()
    torch.testing.assert_close(capped[::2], free[::2] / 3, rtol=1e-14, atol=0)
    torch.testing.assert_close(capped[1::2], free[1::2], rtol=1e-14, atol=0)


def test_step_criteria_from_config():
    cfg = C.load(overrides=["physics.G=2.0", "physics.softening=0.01", "collect.energy_threshold=1e-3",
                            "collect.accept_lower=1e-5", "loss.kind='band'", "loss.lower=2e-5", "loss.upper=5e-4",
                            "loss.exponent=2.5", "loss.nonfinite_penalty=3.0", "collect.substeps=4",
                            "loss.overshoot_weight=2.0"])
    c = StepCriteria.from_config(cfg)
    assert c == StepCriteria(gravity=Gravity(2.0, 0.01), energy_threshold=1e-3, accept_lower=1e-5, loss_kind="band",
                             loss_lower=2e-5, loss_upper=5e-4, loss_exponent=2.5, nonfinite_penalty=3.0, substeps=4,
                             overshoot_weight=2.0)


def test_learned_policy_agrees_with_the_evaluation_primitive():
    """Simulation and training turn a state into the same dt (same features, normalization, history)."""
    s, _ = ics.kepler_orbits(torch.tensor(1.0), torch.tensor(0.6), torch.tensor(1.0), torch.tensor(1.0))
    k = 2
    net = model("delta_mag", k, s)
    crit = StepCriteria(gravity=G1, energy_threshold=2e-4, accept_lower=2.5e-5, loss_kind="regression",
                        loss_lower=6e-5, loss_upper=1.2e-4, loss_exponent=3.0, nonfinite_penalty=10.0)
    policy = LearnedPolicy(net, crit)
    h = History.empty(s, k)
    state = s
    for _ in range(4):
        adv = policy.advance(state, 100.0)
        ev = evaluate_step(net, state, h, crit)
        assert adv.dt == pytest.approx(float(ev.dt[0].detach()), rel=1e-14)
        assert adv.rel_dE == pytest.approx(float(ev.rel_dE[0]), rel=1e-12)
        assert adv.force_evaluations == 1
        h = h.push(state)
        assert torch.equal(policy.history.position, h.position) and torch.equal(policy.history.valid, h.valid)
        state = adv.state
    # Through simulate, the last step lands on t_end.
    res = simulate(s, LearnedPolicy(net, crit), G1, 0.5, threshold=2e-4)
    assert res.t_end == pytest.approx(0.5, abs=1e-12) and res.accepted_steps == res.steps
    assert sum(res.dt) == pytest.approx(0.5, rel=1e-12) and min(res.dt) > 0


def test_margin_loss_in_the_primitive_measures_its_exponent_with_a_probe_step():
    s, _ = ics.kepler_orbits(torch.tensor([1.0, 0.7]), torch.tensor([0.6, 0.95]), torch.tensor(1.0),
                             torch.tensor(1.0), start="pericentre")
    net = model("rich", 0, s)
    crit = StepCriteria(gravity=G1, energy_threshold=2e-4, accept_lower=2.5e-5, loss_kind="margin", loss_lower=6e-5,
                        loss_upper=1.2e-4, loss_exponent=3.0, nonfinite_penalty=10.0, dt_fraction_range=(0.8, 0.85),
                        probe_ratio=1.2)
    h = History.empty(s, 0)
    ev = evaluate_step(net, s, h, crit)
    dt = ev.dt.detach()
    e0 = total_energy(s, G1)
    probe = relative_energy_error(e0, total_energy(kdk_step(s, 1.2 * dt, G1), G1))
    expected = margin_loss(ev.rel_dE, probe, ev.log_dt, threshold=2e-4, lower=0.8, upper=0.85, probe_ratio=1.2,
                           min_exponent=3.0, penalty=10.0, accept_lower=2.5e-5)
    torch.testing.assert_close(ev.loss, expected, rtol=1e-12, atol=0)
    assert bool((ev.loss > 0).all()) and ev.loss.requires_grad  # an untrained net is far from the band
    no_loss = evaluate_step(net, s, h, crit, with_loss=False)
    assert no_loss.loss is None and torch.equal(no_loss.dt, ev.dt) and torch.equal(no_loss.rel_dE, ev.rel_dE)
