"""How precise is a model's dt? Along the oracle's own trajectories of the held-out sets, the
statistics of log(dt_model / dt_oracle) (the goal needs a spread of about 0.075; see
benchmarks/README.md, "Science benchmark").

    python benchmarks/science/dt_spread.py CHECKPOINT_OR_RUN [--quick]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import run as B  # noqa: E402

from nbody_dt.model.history import History  # noqa: E402
from nbody_dt.physics.integrator import step_error  # noqa: E402
from nbody_dt.physics.policies import oracle_dt  # noqa: E402
from nbody_dt.physics.state import State  # noqa: E402
from nbody_dt.training.setup import initial_states  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    model, _, cfg = B.load_checkpoint(sys.argv[1])
    tol = cfg.collect.energy_threshold
    n_bodies = None if cfg.model.kind == "set" else initial_states(cfg).num_bodies
    for hs in B.held_out_sets(cfg, n_bodies, quick="--quick" in sys.argv):
        lrs = []
        for p in hs.problems:
            s, t, pos, vel, dts = p.state, 0.0, [], [], []
            while t < p.t_end:
                d = float(oracle_dt(s, p.gravity, tol)[0])
                pos.append(s.position), vel.append(s.velocity), dts.append(d)
                s, _ = step_error(s, torch.tensor([d], dtype=s.dtype), p.gravity)
                t += d
            st = State(torch.cat(pos), torch.cat(vel), p.state.mass.expand(len(pos), -1))
            with torch.no_grad():
                dt = model(st, History.empty(st, model.history_len))
            lrs.append(torch.log(dt / torch.tensor(dts, dtype=dt.dtype)))
        lr = torch.cat(lrs)
        print(f"{hs.name}: {len(lr)} oracle states, log(dt/dt_oracle) mean {float(lr.mean()):+.3f} "
              f"std {float(lr.std()):.3f} q99 {float(lr.quantile(0.99)):+.3f}, "
              f"fraction above the oracle {float((lr > 0).double().mean()):.3f}", flush=True)


if __name__ == "__main__":
    main()
