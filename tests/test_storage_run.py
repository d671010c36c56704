"""Run metadata, config checks on resume, the writer lock, and bad run URLs."""

import json
import logging
import os
import re
import subprocess
import sys

import pytest
from storage_fixtures import make_rows, small_config

from nbody_dt import __version__
from nbody_dt.storage import Run, RunError
from nbody_dt.storage.run import SCHEMA_VERSION


def one_line_error(excinfo, *fragments):
    text = str(excinfo.value)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text
    return text


def test_create_records_config_version_and_time(tmp_path):
    cfg = small_config()
    with Run.create(tmp_path / "run", cfg) as run:
        assert run.writable and run.config == cfg
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["config"] == cfg.to_dict()
    assert meta["package_version"] == __version__
    assert meta["schema_version"] == SCHEMA_VERSION
    assert meta["created"]
    assert not (tmp_path / "run" / "lock.json").exists()


def test_create_where_a_run_exists_mentions_resume(tmp_path):
    Run.create(tmp_path / "run", small_config()).close()
    before = (tmp_path / "run" / "run.json").read_bytes()
    with pytest.raises(RunError) as excinfo:
        Run.create(tmp_path / "run", small_config("seed=3"))
    one_line_error(excinfo, "already exists", "resume")
    assert (tmp_path / "run" / "run.json").read_bytes() == before


def test_open_with_changed_config_lists_keys_and_changes_nothing(tmp_path):
    Run.create(tmp_path / "run", small_config()).close()
    before = (tmp_path / "run" / "run.json").read_bytes()
    with pytest.raises(RunError) as excinfo:
        Run.open(tmp_path / "run", small_config("seed=3", "model.hidden=[8]", "epochs=40"))
    text = one_line_error(excinfo, "seed", "model.hidden")
    assert "epochs (" not in text
    assert (tmp_path / "run" / "run.json").read_bytes() == before
    assert not (tmp_path / "run" / "lock.json").exists()


def test_resume_safe_keys_may_change_and_are_stored(tmp_path):
    Run.create(tmp_path / "run", small_config()).close()
    new = small_config("epochs=40", "storage.keep_checkpoints=7", "compute.evaluator='dask'")
    with Run.open(tmp_path / "run", new) as run:
        assert run.config == new
    with Run.open(tmp_path / "run", write=False) as run:  # stored only once the writer saves them ...
        assert run.config == small_config()
    with Run.open(tmp_path / "run", new) as run:
        run.save_config()  # ... which the flow does after checking the run
    with Run.open(tmp_path / "run", write=False) as run:
        assert run.config == new


def test_second_writer_refused_reader_allowed(tmp_path):
    with Run.create(tmp_path / "run", small_config()) as writer:
        with pytest.raises(RunError) as excinfo:
            Run.open(tmp_path / "run")
        one_line_error(excinfo, "locked", "still running", "never broken")
        with Run.open(tmp_path / "run", write=False) as reader, pytest.raises(RunError, match="not open for writing"):
            reader.write_bytes("x", b"")
    with pytest.raises(RunError, match="not open for writing"):  # a closed writer writes no more
        writer.trajectory.append(make_rows(0, [0], 1), 0)
    Run.open(tmp_path / "run").close()  # released on close


def test_stale_lock_broken_only_with_flag(tmp_path, caplog):
    """A lock whose process died (here: a finished child's pid) is reported stale and kept until
    break_lock=True. (test_killed_between_resize_and_commit breaks the lock of a killed writer.)"""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    Run.create(tmp_path / "run", small_config())  # never closed: its lock stays, as after a crash
    lock = tmp_path / "run" / "lock.json"
    lock.write_text(json.dumps({**json.loads(lock.read_text()), "pid": dead_pid}))
    for _ in range(2):
        with pytest.raises(RunError) as excinfo:
            Run.open(tmp_path / "run")
        one_line_error(excinfo, f"pid {dead_pid}", "stale", "break_lock=True")
        assert json.loads(lock.read_text())["pid"] == dead_pid
    with caplog.at_level(logging.WARNING, logger="nbody_dt"):
        run = Run.open(tmp_path / "run", break_lock=True)
    assert re.search(f"breaking the lock .* pid {dead_pid}", caplog.text)
    with run:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_missing_run(tmp_path):
    with pytest.raises(RunError) as excinfo:
        Run.open(tmp_path / "nothing")
    one_line_error(excinfo, "no run at")
    assert not (tmp_path / "nothing").exists()


def test_foreign_directory_untouched(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(RunError) as excinfo:
        Run.open(tmp_path / "data")
    one_line_error(excinfo, "not an nbody-dt run")
    with pytest.raises(RunError) as excinfo:
        Run.create(tmp_path / "data", small_config())
    one_line_error(excinfo, "not an empty directory")
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("content, fragment", [
    (b"{not json", "corrupt run metadata"),
    (b'{"package": "other"}', "not an nbody-dt run"),
    (b'{"package": "nbody-dt", "schema_version": 99}', "schema version 99"),
    (b'{"package": "nbody-dt", "schema_version": 1, "config": {"seed": -1}}', "corrupt run metadata"),
    (b'{"package": "nbody-dt", "schema_version": 2, "created": "2026-12-01T00:00:00Z", "package_version": "9.0", '
     b'"config": {"model": {"wings": 2}}}', "(model.wings: unknown key (known: activation,"),
    (b'{"package": "nbody-dt", "schema_version": 2, "created": "2026-12-01T00:00:00Z", "package_version": "9.0", '
     b'"config": {"model": {"wings": 2}}}', "written by nbody-dt 9.0, open it with that version"),
])
def test_corrupt_metadata(tmp_path, content, fragment):
    Run.create(tmp_path / "run", small_config()).close()
    (tmp_path / "run" / "run.json").write_bytes(content)
    for write in (True, False):
        with pytest.raises(RunError) as excinfo:
            Run.open(tmp_path / "run", write=write)
        one_line_error(excinfo, fragment)
    assert (tmp_path / "run" / "run.json").read_bytes() == content
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["run.json"]


def test_unreadable_url():
    with pytest.raises(RunError) as excinfo:
        Run.open("nosuchprotocol://bucket/run")
    one_line_error(excinfo, "cannot access run URL")


def test_corrupt_trajectory_store_releases_the_lock(tmp_path):
    with Run.create(tmp_path / "run", small_config()) as run:
        run.trajectory.append(make_rows(0, [0, 1], 3), 0)
    meta = tmp_path / "run" / "trajectory.zarr" / "zarr.json"
    meta.write_text("{broken")
    for write in (True, False):
        with pytest.raises(RunError) as excinfo:
            Run.open(tmp_path / "run", write=write)
        one_line_error(excinfo, "damaged trajectory store", "trajectory.zarr/zarr.json")
    assert meta.read_text() == "{broken"
    assert not (tmp_path / "run" / "lock.json").exists()


def test_a_writer_whose_lock_was_broken_stops_before_its_next_write(tmp_path):
    """A forced second writer (the first looked like another host's, so --break-lock could not
    check it): the first writer's next commit is refused and no committed row is lost."""
    url = tmp_path / "run"
    first = Run.create(url, small_config())
    epoch0 = make_rows(0, [0, 1], 3)
    first.trajectory.append(epoch0, 0)
    lock = url / "lock.json"
    lock.write_text(json.dumps({**json.loads(lock.read_text()), "host": "another-host"}))
    with Run.open(url, break_lock=True) as second:
        epoch1 = make_rows(1, [0, 1], 2, first_step=3)
        second.trajectory.append(epoch1, 1)
        before = {p: p.read_bytes() for p in url.rglob("*") if p.is_file()}
        for write in (lambda: first.trajectory.append(make_rows(1, [0, 1], 4, first_step=3), 1),
                      lambda: first.write_bytes("metrics/x.json", b"{}"), lambda: first.remove("run.json")):
            with pytest.raises(RunError) as excinfo:
                write()
            one_line_error(excinfo, "no longer holds the lock", "stopped before writing")
        assert {p: p.read_bytes() for p in url.rglob("*") if p.is_file()} == before
    first.close()  # leaves a lock it does not hold alone
    with Run.open(url, write=False) as reader:
        assert reader.trajectory.epochs() == {0: (0, 6), 1: (6, 10)}
        reader.trajectory.verify_rows()


def test_break_lock_never_takes_a_live_local_writer(tmp_path):
    with Run.create(tmp_path / "run", small_config()):
        for how in (True, "stale"):
            with pytest.raises(RunError) as excinfo:
                Run.open(tmp_path / "run", break_lock=how)
            one_line_error(excinfo, "still running", "never broken")


def test_a_schema_1_run_still_opens_checks_and_appends(tmp_path):
    """A run as nbody-dt wrote it before row digests and reduction shards: readable, checked
    as far as it can be, and it keeps computing what it computed (one reduction shard)."""
    from nbody_dt.storage.integrity import check_run

    url = tmp_path / "run"
    with Run.create(url, small_config()) as run:
        run.trajectory.append(make_rows(0, [0, 1], 3), 0)
    meta_file = url / "run.json"
    meta = json.loads(meta_file.read_text())
    meta["schema_version"] = 1
    del meta["config"]["compute"]["reduction_shards"]
    meta_file.write_text(json.dumps(meta))
    group = url / "trajectory.zarr" / "zarr.json"
    zmeta = json.loads(group.read_text())
    marker = zmeta["attributes"]["nbody_dt_commit"]
    marker["epochs"] = [e[:3] for e in marker["epochs"]]
    group.write_text(json.dumps(zmeta))
    with Run.open(url) as run:
        assert run.schema_version == 1 and run.config.compute.reduction_shards == 1
        check_run(run, deep=True)
        assert run.trajectory.append(make_rows(1, [0, 1], 2, first_step=3), 1) == 10
        run.trajectory.verify_rows()
        assert run.trajectory.epoch_digests(0) is None and run.trajectory.epoch_digests(1) is not None
