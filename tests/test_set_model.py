"""The set dt network (model.kind = 'set'): permutation invariance, locality, any N, padding,
pair selection, mixtures of initial conditions and mixed-N training through storage."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from nbody_dt.config import ConfigError, load
from nbody_dt.model.evaluate import StepCriteria, evaluate_step
from nbody_dt.model.history import History
from nbody_dt.model.set_network import SetDtNetwork, build_network, pair_set_features, select_pairs
from nbody_dt.physics import initial_conditions as ics
from nbody_dt.physics.gravity import Gravity, accelerations, total_energy
from nbody_dt.physics.integrator import kdk_step
from nbody_dt.physics.state import State
from nbody_dt.training.setup import (
    initial_states,
    load_model,
    mixture_counts,
    restart_states,
    snapshot,
    start_training,
)
from tests.conftest import LEGACY

G0 = Gravity()
MIXTURE = ["model.kind='set'", "model.hidden=[8, 8]", "initial_conditions.kind='mixture'", "physics.dim=3",
           "physics.softening=0.01", "initial_conditions.families=['kepler', 'hierarchical', 'plummer']",
           "initial_conditions.family_n=[2, 3, 5]", "initial_conditions.family_weights=[1.0, 1.0, 1.0]",
           "initial_conditions.family_scale=[100.0, 100.0, 1.0]", "initial_conditions.num_orbits=6"]


def net(pairs: str = "all", k: int = 8, seed: int = 0, gravity: Gravity = G0,
        pooling: str = "attention") -> SetDtNetwork:
    torch.manual_seed(seed)
    model = SetDtNetwork([16, 16], "silu", gravity, pairs, k, pooling=pooling)
    with torch.no_grad():  # a random but not near-constant network: scale up the output layers
        model.head[-1].weight.mul_(30.0)
        if pooling == "attention":
            model.score.weight.mul_(10.0)
    return model


POOLINGS = pytest.mark.parametrize("pooling", ["attention", "error_sum"])


def permuted(state: State, perm: torch.Tensor) -> State:
    return State(state.position[:, perm], state.velocity[:, perm], state.mass[:, perm])


@POOLINGS
@pytest.mark.parametrize("pairs", ["all", "per_body", "system"])
def test_permuting_the_bodies_leaves_dt_unchanged(pairs, pooling):
    state = State.cat([ics.plummer_sphere(12, 3, 2), ics.hierarchical(2, 12, 5, dim=3)])
    model = net(pairs, k=3, pooling=pooling)
    base = model.log_dt(state)
    for seed in range(3):
        perm = torch.randperm(12, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(model.log_dt(permuted(state, perm)), base, rtol=0, atol=1e-12)
    assert float(base.detach().std()) > 1e-3  # the network is not constant: the check could fail


@POOLINGS
def test_a_far_light_body_changes_dt_by_less_than_one_percent(pooling):
    three = ics.perturbed_figure_eights(4, 1, dim=3)
    far = State(torch.tensor([[[100.0, 30.0, 5.0]]]).expand(4, 1, 3), torch.zeros(4, 1, 3),
                torch.full((4, 1), 1e-3))
    four = State(torch.cat([three.position, far.position], 1), torch.cat([three.velocity, far.velocity], 1),
                 torch.cat([three.mass, far.mass], 1))
    model = net(pooling=pooling)
    change = (model(four) / model(three) - 1).abs()
    assert float(change.detach().max()) < 0.01
    # ... and a heavy near body does change it (the check can fail)
    near = State(four.position.clone(), four.velocity, four.mass.clone())
    near.position[:, 3] = three.position[:, 0] + 0.1
    near.mass[:, 3] = 1.0
    assert float((model(near) / model(three) - 1).abs().detach().max()) > 0.05


@POOLINGS
def test_the_same_weights_run_at_any_n_and_padding_changes_nothing(pooling):
    model = net(pooling=pooling)
    systems = [ics.kepler_ensemble(3, e_range=(0.0, 0.9), a_range=(0.5, 2.0), seed=0, dim=3)[0],
               ics.perturbed_figure_eights(2, 0, dim=3),
               ics.plummer_sphere(16, 1, 2), ics.plummer_sphere(64, 2, 1)]
    alone = [model.log_dt(s) for s in systems]
    for s, ld in zip(systems, alone):
        assert ld.shape == (s.batch_size,) and bool(torch.isfinite(ld).all())
    padded = ics.pad_bodies(systems, 64)
    torch.testing.assert_close(model.log_dt(padded), torch.cat(alone), rtol=0, atol=1e-12)
    # padding bodies anywhere in the system (not only at the end) is the same system
    mixed = ics.pad_bodies([systems[1]], 5)
    moved = permuted(mixed, torch.tensor([3, 0, 4, 1, 2]))
    torch.testing.assert_close(model.log_dt(moved), alone[1], rtol=0, atol=1e-12)
    # gradients reach the encoder through every bucket
    model.log_dt(padded).sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_padding_is_invisible_to_gravity_and_the_step():
    s = ics.plummer_sphere(5, 0, 3)
    padded = ics.pad_bodies([s], 8)
    g = Gravity(softening=0.01)
    torch.testing.assert_close(accelerations(padded.position, padded.mass, g)[:, :5],
                               accelerations(s.position, s.mass, g), rtol=1e-14, atol=1e-14)
    assert bool((accelerations(padded.position, padded.mass, g)[:, 5:] == 0).all())
    torch.testing.assert_close(total_energy(padded, g), total_energy(s, g), rtol=1e-14, atol=0)
    dt = torch.full((3,), 1e-2, dtype=torch.float64)
    after = kdk_step(padded, dt, g)
    torch.testing.assert_close(after.position[:, :5], kdk_step(s, dt, g).position, rtol=1e-14, atol=1e-14)
    assert bool(torch.isfinite(after.position).all()) and bool((after.position[:, 5:] == 0).all())


def test_pair_selection_costs_and_keeps_the_tightest_pairs():
    s = ics.plummer_sphere(64, 4, 2)
    feats_all, mask_all, t_min, _, _ = pair_set_features(s, G0, "all")
    assert feats_all.shape[1] == 64 * 63 // 2 and bool(mask_all.all())
    feats_sys, mask_sys, t_min_sys, _, _ = pair_set_features(s, G0, "system", 5)
    assert feats_sys.shape[1] == 5 and torch.equal(t_min_sys, t_min)
    # the k tightest of the system: the 5 smallest log(t_ff / t_min), the first being 0
    torch.testing.assert_close(feats_sys[..., 3], feats_all[..., 3].sort(-1).values[:, :5])
    feats_pb, mask_pb, *_ = pair_set_features(s, G0, "per_body", 2)
    assert feats_pb.shape[1] == 64 * 2 and 32 <= int(mask_pb[0].sum()) <= 128
    # every body appears in a selected pair with its nearest partner (by free-fall time)
    i, j = torch.triu_indices(5, 5, offset=1)
    small = ics.plummer_sphere(5, 1, 1)
    t = torch.tensor([[1.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 2.0, 9.0]], dtype=torch.float64)
    idx, counted = select_pairs(t, 5, "per_body", 1)
    chosen = idx[0][counted[0]].tolist()
    assert {0, 8} <= set(chosen)  # pairs (0,1) and (2,4) are the nearest of bodies 0,1 and 2,4
    assert len(i) == 10 and small.num_bodies == 5


def test_build_network_keeps_the_mlp_reachable_and_refuses_the_wrong_n():
    mlp = build_network(load(None, LEGACY + []), 2)
    assert type(mlp).__name__ == "DtNetwork"
    with pytest.raises(ValueError, match="N = 2 bodies, got N = 3"):
        mlp.check_takes(ics.figure_eight())
    set_model = build_network(load(None, LEGACY + ["model.kind='set'"]), 2)
    set_model.check_takes(ics.plummer_sphere(64, 0))
    with pytest.raises(ValueError, match="at least 2 bodies"):
        lonely = ics.figure_eight()
        set_model.check_takes(State(lonely.position, lonely.velocity, torch.tensor([[1.0, 0.0, 0.0]],
                                                                                    dtype=torch.float64)))


def test_config_refusals_are_one_line():
    with pytest.raises(ConfigError, match=r"families\[0\]: expected one of"):
        load(None, LEGACY + MIXTURE + ["initial_conditions.families=['comet', 'hierarchical', 'plummer']"])
    with pytest.raises(ConfigError, match="needs model.kind = 'set'"):
        load(None, LEGACY + MIXTURE + ["model.kind='mlp'"])
    with pytest.raises(ConfigError, match=r"family_n\[0\]: family 'kepler' has N = 2"):
        load(None, LEGACY + MIXTURE + ["initial_conditions.family_n=[3, 3, 5]"])
    with pytest.raises(ConfigError, match="one entry each"):
        load(None, LEGACY + MIXTURE + ["initial_conditions.family_weights=[1.0, 1.0]"])
    with pytest.raises(ConfigError, match="takes no history"):
        load(None, LEGACY + ["model.kind='set'", "model.history_len=2"])
    for exc in [ConfigError]:
        try:
            load(None, LEGACY + MIXTURE + ["initial_conditions.families=['comet', 'hierarchical', 'plummer']"])
        except exc as e:
            assert "\n" not in str(e)


def test_mixture_states_and_counts():
    assert mixture_counts([1.0, 1.0, 1.0], 6) == [2, 2, 2]
    assert mixture_counts([0.7, 0.2, 0.1], 10) == [7, 2, 1]
    assert mixture_counts([100.0, 1e-3], 3) == [2, 1]
    cfg = load(None, LEGACY + MIXTURE)
    s = initial_states(cfg)
    assert s.position.shape == (6, 5, 3)
    assert (s.mass != 0).sum(-1).tolist() == [2, 2, 3, 3, 5, 5]
    com = (s.mass[..., None] * s.position).sum(1)
    assert float(com.abs().max()) < 1e-9 * float(s.position.abs().max())
    # point-mass families are scaled up (softening negligible), Plummer spheres are not
    size = s.position.norm(dim=-1).max(-1).values
    assert float(size[:4].min()) > 20 and float(size[4:].max()) < 20
    assert bool(torch.isfinite(total_energy(s, Gravity(softening=0.01))).all())


def test_restart_states_keep_each_orbits_family_and_n():
    cfg = load(None, LEGACY + MIXTURE)
    first = initial_states(cfg)
    orbits = torch.tensor([5, 0, 3])
    fresh = restart_states(cfg, orbits, "epoch 2 orbits [5, 0, 3] steps [7, 1, 4]")
    assert torch.equal(fresh.mass != 0, first.mass[orbits] != 0), "the same family, the same N, in orbit order"
    assert not torch.equal(fresh.position, first.position[orbits]), "a new draw, not the start again"
    again = restart_states(cfg, orbits, "epoch 2 orbits [5, 0, 3] steps [7, 1, 4]")
    assert torch.equal(again.position, fresh.position) and torch.equal(again.velocity, fresh.velocity)
    other = restart_states(cfg, orbits, "epoch 3 orbits [5, 0, 3] steps [7, 1, 4]")
    assert not torch.equal(other.position, fresh.position)


def test_hierarchical_systems_are_bound_and_hierarchical():
    s = ics.hierarchical(8, 6, 3, dim=3)
    assert bool((total_energy(s, G0) < 0).all())
    r = s.position.norm(dim=-1)
    assert bool((r[:, 5] > 2 * r[:, 2]).all())  # the outermost companion is far outside the inner binary


def test_mixed_n_training_stores_padded_rows_and_reloads(tmp_path):
    """Collect + replay on a padded mixed-N batch through the Zarr store; a checkpoint reloads."""
    from nbody_dt.storage import Run
    from nbody_dt.training.collect import collect_trajectory
    from nbody_dt.training.replay import generalize_on_trajectory

    cfg = load(None, LEGACY + MIXTURE + ["collect.steps_per_epoch=3", "collect.accept_safe_after=20", "replay.steps=3",
                                "replay.batch_size=8", "model.initial_dt=0.02"])
    training = start_training(cfg)
    rows, training.live, metrics = collect_trajectory(training.model, training.optimizer, training.live, cfg, 0)
    assert metrics["collect_accepted"] == 18
    with Run.create(str(tmp_path / "run"), cfg) as run:
        run.trajectory.append(rows, 0)
        back = run.trajectory.rows()
        assert back.position.shape[1:] == (5, 3) and torch.equal(back.mass, rows.mass)
        assert sorted((back.mass != 0).sum(-1).tolist()) == sorted([2] * 6 + [3] * 6 + [5] * 6)
        window = run.trajectory.window("all")
        _, _, replay = generalize_on_trajectory(training.model, window, training.optimizer, cfg)
        assert replay["replay_iterations"] >= 1
    payload = snapshot(training, cfg)
    model = load_model(payload, cfg)
    state = ics.plummer_sphere(64, 9)
    torch.testing.assert_close(model.log_dt(state), training.model.log_dt(state))


def test_a_checkpoint_from_before_the_set_network_still_loads():
    cfg = load(None, LEGACY + ["model.hidden=[8]"])
    payload = snapshot(start_training(cfg), cfg)
    old = copy.deepcopy(payload["config"])
    for key in ("kind", "pairs", "pair_k", "pooling", "pair_prior", "error_series", "series_margin"):
        del old["model"][key]
    for key in ("families", "family_n", "family_weights", "family_scale"):
        del old["initial_conditions"][key]
    del old["collect"]["on_stall"], old["replay"]["final_steps"]
    from nbody_dt.config import from_dict, from_stored

    # a stored config's missing keys mean what they meant when it was written, not today's defaults
    # (the general set network since it became the embedded default)
    stored = from_stored(old)
    assert stored == from_dict(payload["config"])
    model = load_model(payload, stored)
    assert type(model).__name__ == "DtNetwork"
    assert from_dict(old).model.kind == "set"  # today's defaults would read it as another model


@POOLINGS
def test_evaluate_step_runs_a_set_network_on_a_mixed_batch(pooling):
    cfg = load(None, LEGACY + MIXTURE + [f"model.pooling='{pooling}'"])
    s = initial_states(cfg)
    model = build_network(cfg, s.num_bodies)
    ev = evaluate_step(model, s, History.empty(s, 0), StepCriteria.from_config(cfg))
    assert ev.loss.shape == (6,) and bool(torch.isfinite(ev.loss).all()) and bool(torch.isfinite(ev.rel_dE).all())
    assert math.isfinite(float(ev.loss.detach().mean()))


def test_simulate_refuses_a_system_an_mlp_checkpoint_cannot_take_and_a_set_network_takes_any_n(tmp_path, capsys):
    from nbody_dt.cli import main

    for kind, path in (("mlp", tmp_path / "mlp.pt"), ("set", tmp_path / "set.pt")):
        cfg = load(None, LEGACY + ["model.hidden=[8]", f"model.kind='{kind}'"])
        torch.save(snapshot(start_training(cfg), cfg), path)
    assert main(["simulate", "--policy", "learned", "--checkpoint", str(tmp_path / "mlp.pt"), "--ic", "figure8",
                 "--periods", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "takes systems of N = 2 bodies, got N = 3" in err
    assert main(["simulate", "--policy", "learned", "--checkpoint", str(tmp_path / "set.pt"), "--ic", "plummer",
                 "--n", "32", "--softening", "0.01", "--t-end", "0.01", "--json"]) == 0
