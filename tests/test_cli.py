"""The command line in-process: --version, help for every command and option, training progress
off a terminal, the report table, and warnings as one line on stderr."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nbody_dt import __version__
from nbody_dt.cli import build_parser, main
from nbody_dt.storage import Run
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"nbody-dt {__version__}"


def test_every_command_and_option_is_described():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"simulate", "train", "resume", "report", "deploy", "config"} <= set(sub.choices)
    for name, command in sub.choices.items():
        assert command.description, f"{name} has no description"
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("cli") / "run")
    sets = [x for o in tiny_overrides() for x in ("--set", o)]
    return url, main(["train", "--run-dir", url, *sets])


def test_train_off_a_terminal_prints_one_line_per_stage(trained, capsys):
    url, code = trained
    assert code == 0
    # The fixture's output went to the first test that used it: train again, on a resumed run.
    assert main(["resume", url, "--set", "epochs=3"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"training {url}: 2 of 3 epochs done" in err
    stage_lines = [line for line in err if line.startswith("epoch 3/3 ")]
    assert [line.split()[2] for line in stage_lines] == ["collect", "persist", "replay", "epoch"]
    assert "collected 12 steps" in stage_lines[0] and "stored 36 rows" in stage_lines[1]


def test_report_prints_a_table(trained, capsys):
    url, _ = trained
    assert main(["report", url]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "epoch" in line and "rows" in line and "┃" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")][:4] == ["epoch", "rows", "collect_accepted",
                                                                   "collect_pass_rate"]
    assert main(["report", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["rows"] >= 24


def test_a_warning_reaches_stderr_as_one_line(trained, capsys):
    url, _ = trained
    # A writer that died holding the lock (its pid is gone), as after a SIGKILL.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    Run.open(url)  # never closed: the lock stays
    lock = Path(url, "lock.json")
    lock.write_text(json.dumps({**json.loads(lock.read_text()), "pid": int(dead.stdout)}))
    assert main(["resume", url, "--break-lock", "--json"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("WARNING: ")]
    assert len(warnings) == 1 and "breaking the lock" in warnings[0] and url in warnings[0], captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["run_url"] == url


def test_errors_are_one_line_with_exit_code_2(capsys):
    assert main(["report", "/nonexistent/run"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: no run at /nonexistent/run"]
