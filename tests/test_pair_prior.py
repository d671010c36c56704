"""The pair prior (model.pair_prior): a frozen two-body set network read on every pair alone, the
pairs' errors added by energy share, as the base the set network corrects."""

from __future__ import annotations

import math

import pytest
import torch

from nbody_dt.config import ConfigError, load
from nbody_dt.model.evaluate import StepCriteria, evaluate_step
from nbody_dt.model.history import History
from nbody_dt.model.set_network import pair_set_features
from nbody_dt.physics import initial_conditions as ics
from nbody_dt.physics.gravity import Gravity
from nbody_dt.physics.state import State
from nbody_dt.training.setup import load_model, pair_prior_weights, snapshot, start_training
from tests.conftest import LEGACY, tiny_overrides

TWO_BODY = ["model.kind='set'", "model.hidden=[8, 8]"]
MIXTURE = ["model.kind='set'", "model.hidden=[8, 8]", "initial_conditions.kind='mixture'", "physics.dim=3",
           "physics.softening=0.01", "initial_conditions.families=['kepler', 'hierarchical', 'plummer']",
           "initial_conditions.family_n=[2, 3, 5]", "initial_conditions.family_weights=[1.0, 1.0, 1.0]",
           "initial_conditions.family_scale=[100.0, 100.0, 1.0]", "initial_conditions.num_orbits=6",
           "model.pair_prior='two-body.pt'"]


@pytest.fixture(scope="module")
def two_body() -> dict:
    """The payload of an untrained two-body set network whose dt varies strongly with the state."""
    cfg = load(None, LEGACY + TWO_BODY)
    training = start_training(cfg)
    with torch.no_grad():
        training.model.head[-1].weight.mul_(30.0)
    return snapshot(training, cfg)


def with_prior(two_body: dict, extra: list[str] = ()) -> torch.nn.Module:
    """A mixture network whose base is the two-body network's prior and whose correction is zero."""
    cfg = load(None, LEGACY + MIXTURE + list(extra))
    model = start_training(cfg, two_body).model
    with torch.no_grad():
        model.head[-1].weight.zero_()  # no correction and full trust: the network's dt is the prior's
        model.trust.weight.zero_()
        model.trust.bias.fill_(50.0)  # sigmoid(50) = 1 in float64
    return model


def lone_pairs(state: State) -> tuple[State, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every pair of every system as a two-body system of its own, its |E_pair| and the system's |E|."""
    x, v, m = state.position, state.velocity, state.mass
    i, j = torch.triu_indices(x.shape[1], x.shape[1], 1)
    pairs = State(torch.stack([x[:, i], x[:, j]], 2).flatten(0, 1), torch.stack([v[:, i], v[:, j]], 2).flatten(0, 1),
                  torch.stack([m[:, i], m[:, j]], 2).flatten(0, 1))
    return pairs, i, j, x.shape[0]


def test_with_no_correction_the_network_is_its_prior_on_two_bodies_and_adds_the_pairs_errors(two_body):
    g = Gravity(1.0, 0.01)
    model = with_prior(two_body)
    alone = load_model(two_body, load(None, LEGACY + TWO_BODY)).for_gravity(g)
    kepler = ics.kepler_ensemble(6, e_range=(0.0, 0.9), a_range=(0.5, 2.0), seed=3, dim=3)[0]
    kepler = State(kepler.position * 100, kepler.velocity / 10, kepler.mass)  # the mixture's scale: eps negligible
    torch.testing.assert_close(model.for_gravity(g).log_dt(kepler), alone.log_dt(kepler), rtol=0, atol=1e-12)
    # N > 2: dt = (sum_p share_p dt_p^-3)^(-1/3), dt_p the two-body network's dt of pair p alone
    state = State.cat([ics.plummer_sphere(6, 4, 2), ics.hierarchical(2, 6, 5, dim=3)])
    pairs, i, j, b = lone_pairs(state)
    speed = pair_set_features(pairs, g).features[:, 0, 0]
    assert bool((speed > math.log(0.01)).all())  # above the prior's speed floor: the lone-pair reading is exact
    log_dt_pair = alone.log_dt(pairs).reshape(b, -1)
    share = pair_set_features(state, g).energy_share
    expected = -torch.logsumexp(torch.log(share) - 3 * log_dt_pair, 1) / 3
    # the tidal feature of a real lone pair is round-off, log(1e-12 + ~1e-16), against exactly log(1e-12)
    torch.testing.assert_close(model.for_gravity(g).log_dt(state), expected, rtol=0, atol=1e-5)
    assert float(expected.detach().std()) > 0.1  # the prior differs between systems: the check could fail


def test_the_prior_is_permutation_invariant_and_padding_changes_nothing(two_body):
    model = with_prior(two_body)
    state = State.cat([ics.plummer_sphere(7, 3, 2), ics.hierarchical(2, 7, 5, dim=3)])
    base = model.log_dt(state)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.log_dt(State(state.position[:, perm], state.velocity[:, perm],
                                                  state.mass[:, perm])), base, rtol=0, atol=1e-12)
    kepler = ics.kepler_ensemble(2, e_range=(0.0, 0.9), a_range=(0.5, 2.0), seed=1, dim=3)[0]
    padded = ics.pad_bodies([state, kepler], 9)
    torch.testing.assert_close(model.log_dt(padded), torch.cat([base, model.log_dt(kepler)]), rtol=0, atol=1e-12)
    assert float(base.detach().std()) > 0.1


def test_the_prior_is_frozen_and_travels_in_the_checkpoint(two_body):
    cfg = load(None, LEGACY + MIXTURE)
    training = start_training(cfg, two_body)
    model = training.model
    prior = {k: v.clone() for k, v in model.prior.state_dict().items()}
    assert prior["encoder_0_weight"].abs().sum() > 0
    assert torch.equal(prior["encoder_0_weight"], two_body["model"]["encoder.0.weight"])
    assert not any(name.startswith("prior.") for name, _ in model.named_parameters())
    before = [p.detach().clone() for p in model.parameters()]
    from nbody_dt.training.setup import initial_states

    state = initial_states(cfg)
    ev = evaluate_step(model, state, History.empty(state, 0), StepCriteria.from_config(cfg))
    training.optimizer.zero_grad()
    ev.loss.mean().backward()
    training.optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the correction trained
    assert all(torch.equal(prior[k], v) for k, v in model.prior.state_dict().items())  # the prior did not
    reloaded = load_model(snapshot(training, cfg), cfg)  # no prior file needed: the weights are in the payload
    torch.testing.assert_close(reloaded.log_dt(state), model.log_dt(state), rtol=0, atol=0)


def test_a_prior_that_does_not_fit_is_refused_in_one_line(two_body):
    with pytest.raises(ConfigError, match="only the set network"):
        load(None, LEGACY + ["model.pair_prior='x.pt'"])
    cfg = load(None, LEGACY + MIXTURE)
    with pytest.raises(ValueError, match="was not loaded"):
        start_training(cfg)
    wider = load(None, LEGACY + MIXTURE + ["model.hidden=[16, 16]"])
    mlp = load(None, LEGACY + ["model.hidden=[8, 8]"])
    mixture_net = load(None, LEGACY + MIXTURE[:-1])
    cases = [(wider, two_body, "they must be the same"),
             (cfg, snapshot(start_training(mlp), mlp), "not a set network trained on two-body systems"),
             (cfg, snapshot(start_training(mixture_net), mixture_net), "5 bodies")]
    for config, payload, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            pair_prior_weights(config, payload)
        assert "\n" not in str(info.value)


@pytest.mark.usefixtures("prefect_server")
def test_train_with_a_prior_run_end_to_end_and_simulate_without_it(tmp_path, capsys):
    """The CLI trains a two-body set run, then a mixture run on it as the prior; the mixture's
    checkpoint simulates after the prior's run is gone. A missing prior is refused before anything
    is written."""
    import shutil

    from nbody_dt.cli import main
    from nbody_dt.storage import read_checkpoint

    prior_url, run_url = str(tmp_path / "two-body"), str(tmp_path / "general")
    sets = [x for o in tiny_overrides(**{"model.kind": "'set'", "model.hidden": "[8]"}) for x in ("--set", o)]
    assert main(["train", "--run-dir", prior_url, *sets, "--json"]) == 0
    mixture = [o for o in MIXTURE if not o.startswith(("model.pair_prior", "model.hidden"))]
    general = sets + [x for o in mixture + [f"model.pair_prior='{prior_url}'", "replay.batch_size=8",
                                            "collect.steps_per_epoch=3", "collect.accept_safe_after=20"]
                      for x in ("--set", o)]
    missing = [x if x != f"model.pair_prior='{prior_url}'" else "model.pair_prior='nowhere'" for x in general]
    capsys.readouterr()
    assert main(["train", "--run-dir", str(tmp_path / "refused"), *missing]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.pair_prior" in err and "nowhere" in err
    assert not (tmp_path / "refused").exists()
    assert main(["train", "--run-dir", run_url, *general, "--json"]) == 0
    weights = read_checkpoint(prior_url)["model"]
    trained = read_checkpoint(run_url)["model"]
    assert torch.equal(trained["prior.encoder_0_weight"], weights["encoder.0.weight"])
    shutil.rmtree(prior_url)
    capsys.readouterr()
    assert main(["simulate", "--policy", "learned", "--checkpoint", run_url, "--ic", "plummer", "--n", "8",
                 "--softening", "0.01", "--t-end", "0.01", "--json"]) == 0
