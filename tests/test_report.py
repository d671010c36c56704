"""The run report (a JSON-ready dict and a rich table) and the PNG plots of a run and of a simulation."""

import io
import json

import pytest
from rich.console import Console
from storage_fixtures import make_rows, small_config

from nbody_dt.physics import initial_conditions as ics
from nbody_dt.physics.gravity import Gravity
from nbody_dt.physics.policies import Oracle
from nbody_dt.physics.simulate import simulate
from nbody_dt.plots import plot_simulation, write_run_plots
from nbody_dt.report import epoch_table, report_dict, report_table
from nbody_dt.storage import Run, mark_done, save_checkpoint, write_metrics

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run(tmp_path):
    with Run.create(tmp_path / "run", small_config()) as r:
        yield r


def text(table) -> list[str]:
    """The table as the terminal shows it (no colours), one string per line, cells split on the box lines."""
    console = Console(file=io.StringIO(), width=300, color_system=None)
    console.print(table)
    return console.file.getvalue().splitlines()


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("│┃").replace("┃", "│").split("│")]


def filled(run):
    """Three epochs stored as the flow stores them: checkpoints, rows, metrics and ledger marks."""
    for epoch in range(3):
        save_checkpoint(run, epoch, "collect", {"epoch": epoch})
        write_metrics(run, epoch, "collect", {"collect_pass_rate": 0.5 + 0.1 * epoch, "seconds": 2.0})
        mark_done(run, epoch, "collect")
        run.trajectory.append(make_rows(epoch, [0, 1, 2, 3], 5, first_step=5 * epoch, warmup_steps=1), epoch)
        write_metrics(run, epoch, "persist", {"persist_rows": 20})
        mark_done(run, epoch, "persist", {"rows": list(run.trajectory.epoch_range(epoch)),
                                          "digests": run.trajectory.epoch_digests(epoch)})
        save_checkpoint(run, epoch, "replay", {"epoch": epoch})
        write_metrics(run, epoch, "replay", {"replay_iterations": 10 - epoch, "replay_final_pass_rate": 1.0,
                                             "seconds": 4.0, "status": "converged"})
        mark_done(run, epoch, "replay")
        merged = {"collect_pass_rate": 0.5 + 0.1 * epoch, "replay_iterations": 10 - epoch, "seconds": 6.0}
        write_metrics(run, epoch, "epoch", merged)  # like the flow: copies of the stages' figures
        mark_done(run, epoch, "epoch")
    return run


def test_report_dict_is_json_ready(run):
    rep = report_dict(filled(run))
    json.dumps(rep)
    assert [row["epoch"] for row in rep["epochs"]] == [0, 1, 2]
    first = rep["epochs"][0]
    assert first["rows"] == 20 and first["collect_pass_rate"] == 0.5 and first["replay_iterations"] == 10
    assert first["collect.seconds"] == 2.0 and first["replay.seconds"] == 4.0 and first["epoch.seconds"] == 6.0
    assert first["status"] == "converged" and "seconds" not in first and "epoch.replay_iterations" not in first
    assert rep["totals"]["rows"] == 60 and rep["totals"]["sum"]["replay_iterations"] == 27
    assert rep["totals"]["mean"]["collect_pass_rate"] == pytest.approx(0.6)
    assert rep["config"]["storage"]["chunk_rows"] == 5


def test_report_table_lists_epochs_and_totals(run):
    lines = text(report_table(report_dict(filled(run))))
    assert "3 epochs, 60 trajectory rows" in " ".join(" ".join(lines).split())
    rows = [cells(line) for line in lines if line.strip().startswith(("┃", "│"))]
    header = rows[0]
    assert header[:2] == ["epoch", "rows"] and "replay_iterations" in header and "status" not in header
    assert [r[0] for r in rows[1:]] == ["0", "1", "2", "sum", "mean"]
    assert rows[4][header.index("replay_iterations")] == "27"
    narrow = [cells(line) for line in text(report_table(report_dict(run), keys=["replay_iterations", "missing"]))
              if line.strip().startswith(("┃", "│"))]
    assert narrow[0] == ["epoch", "replay_iterations", "missing"] and narrow[1] == ["0", "10", "-"]


def test_write_run_plots(run, tmp_path):
    paths = write_run_plots(filled(run), epoch_table(run), tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["dt_over_time.png", "energy_error.png", "pass_rate.png",
                                            "replay_iterations.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG


def test_report_of_an_empty_run(run, tmp_path):
    assert report_dict(run)["epochs"] == []
    assert "0 epochs" in " ".join(" ".join(text(report_table(report_dict(run)))).split())
    assert write_run_plots(run, epoch_table(run), tmp_path / "plots") == []


def test_plot_simulation(tmp_path):
    state, period = ics.kepler_orbits(1.0, 0.5, 1.0, 1.0)
    g = Gravity(1.0, 0.0)
    result = simulate(state, Oracle(2e-4, g), g, float(period[0]), 2e-4, record=True)
    path = plot_simulation(result, tmp_path / "orbit.png", "kepler / oracle")
    assert path.read_bytes()[:8] == PNG
