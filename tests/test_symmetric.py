"""The time-symmetric learned step (model/symmetric.py): reversibility, its equation, its cost, the
CLI flag, and the smallest run of the work-precision benchmark."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nbody_dt import config as C
from nbody_dt.cli import load_learned, main
from nbody_dt.model.evaluate import StepCriteria
from nbody_dt.model.network import DtNetwork
from nbody_dt.model.policy import LearnedPolicy, make_policy, run_problem
from nbody_dt.model.set_network import SetDtNetwork
from nbody_dt.model.symmetric import ITERATION_TOL, SymmetricLearnedPolicy, _bisect, even_log_dt
from nbody_dt.physics import initial_conditions as ics
from nbody_dt.physics.gravity import Gravity, accelerations
from nbody_dt.physics.problems import make_problem
from nbody_dt.physics.simulate import simulate
from nbody_dt.physics.state import State
from tests.conftest import LEGACY

G1 = Gravity()
ROOT = Path(__file__).resolve().parents[1]
CRITERIA = StepCriteria(gravity=G1, energy_threshold=2e-4, accept_lower=0.0, loss_kind="margin", loss_lower=1e-4,
                        loss_upper=1.3e-4, loss_exponent=3.0, nonfinite_penalty=10.0)


def network(s: State, history_len: int = 0) -> DtNetwork:
    """An untrained rich-feature network whose dt depends strongly on the radial cosine."""
    torch.manual_seed(5)
    net = DtNetwork("rich", 2, 2, history_len, [16, 16], "silu", "log_freefall", G1, initial_dt=0.03)
    net.set_scales(s)
    with torch.no_grad():
        net.mlp[-1].weight.mul_(5)
    return net


def kepler(e: float = 0.9) -> State:
    return ics.kepler_orbits(torch.tensor(1.0), torch.tensor(e), torch.tensor(1.0), torch.tensor(1.0))[0]


def reverse(s: State) -> State:
    return State(s.position, -s.velocity, s.mass)


def run_back_and_forth(policy, s: State, steps: int) -> tuple[float, float]:
    """K steps, velocities reversed, K steps: the relative distance of position and velocity to the start."""
    state = s
    for _ in range(steps):
        state = policy.advance(state, math.inf).state
    for _ in range(steps):
        state = policy.advance(reverse(state) if _ == 0 else state, math.inf).state
    back = reverse(state)
    return (float((back.position - s.position).norm() / s.position.norm()),
            float((back.velocity - s.velocity).norm() / s.velocity.norm()))


@pytest.mark.parametrize("e", [0.5, 0.9, 0.99])
def test_reversing_the_velocities_retraces_the_steps(e):
    s = kepler(e)
    net = network(s)
    with torch.no_grad():
        dx, dv = run_back_and_forth(SymmetricLearnedPolicy(net, CRITERIA), s, 120)
        assert dx < 1e-10 and dv < 1e-10, (dx, dv)
        # The plain learned dt reads the radial cosine: it is not time-symmetric, and does not come back.
        dx_plain, dv_plain = run_back_and_forth(LearnedPolicy(net, CRITERIA), s, 120)
        assert max(dx_plain, dv_plain) > 1e-6


def test_a_set_network_step_is_reversible_at_any_n():
    """The any-N set network (model/set_network.py) takes the symmetric step as the MLP does."""
    s = ics.hierarchical(1, 4, 3, dim=3)
    torch.manual_seed(2)
    net = SetDtNetwork([16, 16], "silu", G1)
    with torch.no_grad():
        net.head[-1].weight.mul_(30.0)
        net.score.weight.mul_(10.0)
        dx, dv = run_back_and_forth(SymmetricLearnedPolicy(net, CRITERIA), s, 40)
        assert dx < 1e-10 and dv < 1e-10, (dx, dv)
        dx_plain, dv_plain = run_back_and_forth(LearnedPolicy(net, CRITERIA), s, 40)
        assert max(dx_plain, dv_plain) > 1e-6


def test_the_step_solves_its_equation_along_the_drift_with_one_force_evaluation():
    s = kepler(0.9)
    net = network(s)
    # h_even is even under velocity reversal, while the network's own dt is not.
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.5]]], dtype=torch.float64)
    v, m = torch.tensor([[[0.0, 0.0], [0.3, 0.4]]], dtype=torch.float64), s.mass  # radial cosine 0.8
    with torch.no_grad():
        assert torch.equal(even_log_dt(net, x, v, m), even_log_dt(net, x, -v, m))
        assert not torch.allclose(net.log_dt(State(x, v, m), _empty()), net.log_dt(State(x, -v, m), _empty()))
    policy = SymmetricLearnedPolicy(net, CRITERIA, dt_scale=0.7)
    state = s
    with torch.no_grad():
        for _ in range(50):
            adv = policy.advance(state, math.inf)
            acc = accelerations(state.position, state.mass, G1)
            v_half = state.velocity + 0.5 * adv.dt * acc
            log_h = [float(even_log_dt(net, state.position + f * adv.dt * v_half, v_half, state.mass)[0])
                     for f in (0.0, 0.5, 1.0)]
            mean = (log_h[0] + 4 * log_h[1] + log_h[2]) / 6  # Simpson along the drift
            assert abs(math.log(0.7) + mean - math.log(adv.dt)) < 10 * ITERATION_TOL
            assert adv.force_evaluations == 1
            state = adv.state
    assert 2 <= policy.network_evaluations / 50 <= 5
    # Through simulate, the last step still lands on t_end.
    res = simulate(s, SymmetricLearnedPolicy(net, CRITERIA), G1, 3.0, threshold=2e-4)
    assert res.t_end == pytest.approx(3.0, abs=1e-12) and res.steps == res.accepted_steps


@pytest.mark.parametrize("start", [-3.0, 0.29, 5.0])
def test_bisection_fallback_finds_the_root_of_a_kinked_residual(start):
    # r > 0 below the root, kinked at it, nearly flat above: Newton's troubles, bisection's business.
    def residuals(us):
        return [0.3 - u if u < 0.3 else 0.01 * (0.3 - u) for u in us]

    root, calls = _bisect(residuals, start)
    assert abs(root - 0.3) < ITERATION_TOL and calls < 40


def _empty():
    from nbody_dt.model.history import History

    return History.empty(kepler(), 0)


def test_make_policy_builds_the_symmetric_step_and_scales_the_learned_dt():
    p = make_problem("kepler", e=0.6, periods=1)
    net = network(p.state)
    sym = make_policy("learned", p, 1e-3, model=net, criteria=CRITERIA, symmetric=True)
    assert isinstance(sym, SymmetricLearnedPolicy) and sym.criteria.energy_threshold == 1e-3
    plain = make_policy("learned", p, 1e-3, model=net, criteria=CRITERIA)
    half = make_policy("learned", p, 1e-3, model=net, criteria=CRITERIA, dt_scale=0.5)
    assert half.advance(p.state, math.inf).dt == pytest.approx(0.5 * plain.advance(p.state, math.inf).dt, rel=1e-14)
    # trained at 2e-4, run at 1e-3: the dt^3 law of the single-step error scales its dt by 5^(1/3)
    trained = make_policy("learned", p, 2e-4, model=net, criteria=CRITERIA)
    assert plain.advance(p.state, math.inf).dt == pytest.approx(5 ** (1 / 3) * trained.advance(p.state, math.inf).dt,
                                                                rel=1e-14)
    with pytest.raises(ValueError, match="history_len"):
        SymmetricLearnedPolicy(network(p.state, history_len=1), CRITERIA)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A checkpoint file of an untrained default-config network (N = 2)."""
    cfg = C.load(overrides=LEGACY + ["model.hidden=[8]"])
    net = DtNetwork.from_config(cfg, 2)
    net.set_scales(kepler())
    path = tmp_path_factory.mktemp("sym") / "model.pt"
    torch.save({"config": cfg.to_dict(), "model": net.state_dict(), "live": {"mass": torch.ones(1, 2)}}, path)
    return str(path)


def test_cli_simulate_symmetric(checkpoint, capsys):
    args = ["simulate", "--policy", "learned", "--checkpoint", checkpoint, "--e", "0.9", "--periods", "1", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*args, "--symmetric"]) == 0
    sym = json.loads(capsys.readouterr().out)
    assert sym["symmetric"] is True and plain["symmetric"] is False
    # The flag reaches the symmetric step: the CLI's figures are those of the Python API's symmetric policy.
    model, criteria, _ = load_learned(checkpoint)
    problem = make_problem("kepler", e=0.9, periods=1)
    for symmetric, got in ((True, sym), (False, plain)):
        res = run_problem(problem, make_policy("learned", problem, 2e-4, model=model, criteria=criteria,
                                               symmetric=symmetric), 2e-4, record=False)
        assert (got["steps"], got["final_rel_dE"]) == (res.steps, res.final_rel_dE)
    assert sym["final_rel_dE"] != plain["final_rel_dE"]
    assert main(["simulate", "--policy", "oracle", "--symmetric"]) == 2
    assert "--symmetric applies to --policy learned only" in capsys.readouterr().err


def test_work_precision_benchmark_smallest_run(checkpoint, tmp_path):
    out = tmp_path / "wp"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/science/work_precision.py"), "--quick",
                             "--kepler", checkpoint, "--problems", "kepler-0.9", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((out / "work_precision.json").read_text())["results"]["kepler-0.9"]
    assert [r["policy"] for r in rows] == ["learned", "learned-sym", "oracle", "controller", "freefall"]
    for r in rows:
        assert r["force_evaluations"] >= r["accepted_steps"] > 0 and r["max_rel_dE"] >= r["final_rel_dE"]
    assert rows[1]["force_evaluations"] == rows[1]["accepted_steps"] and rows[1]["network_calls"] > 0
    assert (out / "work_precision_kepler-0.9.png").stat().st_size > 0 and "| kepler-0.9 |" in result.stdout


def test_work_precision_plummer_ensemble_sums_counts_and_takes_medians(tmp_path):
    script = str(ROOT / "benchmarks/science/work_precision.py")
    out = tmp_path / "wp"
    result = subprocess.run([sys.executable, script, "--quick", "--problems", "plummer16", "--plummer-spheres", "3",
                             "--policies", "oracle,controller", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in json.loads((out / "work_precision.json").read_text())["results"]["plummer16"]:
        runs = row["runs"]
        assert len({r["force_evaluations"] for r in runs}) > 1 or len({r["final_rel_dE"] for r in runs}) == 3
        assert row["force_evaluations"] == sum(r["force_evaluations"] for r in runs)
        assert row["accepted_steps"] == sum(r["accepted_steps"] for r in runs)
        assert row["max_rel_dE"] == sorted(r["max_rel_dE"] for r in runs)[1]
    bad = subprocess.run([sys.executable, script, "--quick", "--plummer-spheres", "0", "--out", str(tmp_path / "no")],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "--plummer-spheres must be at least 1" in bad.stderr
    assert not (tmp_path / "no").exists()
