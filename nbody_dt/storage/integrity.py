"""What a run must prove before it is resumed or reported, and the one explicit way back.

The objects of a run vouch for each other: the ledger of completed stages must be a prefix of
the stage sequence; every persisted epoch must be in the trajectory's commit marker with the row
range and digests that its ledger mark recorded; the newest committed checkpoint must cover the
newest checkpointed stage of the ledger; every completed stage has its metrics record; every
chunk that a committed row needs exists. Anything else is damage: `check_run` raises RunError
naming the damaged object and the way out, before anything is written. `rollback` is that way
out: it discards everything from an epoch on, and only when the user asks for it.
"""

from __future__ import annotations

from nbody_dt.storage.checkpoints import FOLDER as CHECKPOINTS
from nbody_dt.storage.checkpoints import SIDECAR, list_checkpoints, load_checkpoint, verified_checkpoint_bytes
from nbody_dt.storage.errors import RunError
from nbody_dt.storage.metrics import LEDGER, METRICS, completed, read_mark, read_metrics
from nbody_dt.storage.run import STAGES, TRAJECTORY_DIR, Run, parse_stage_key, stage_key

CHECKPOINTED = ("collect", "replay")


def _index(epoch: int, stage: str) -> int:
    """Position of (epoch, stage) in the run's stage sequence."""
    return len(STAGES) * epoch + STAGES.index(stage)


def rollback_points(run: Run) -> list[int]:
    """The epochs K that `--from-epoch K` can restart from: 0, and every K whose previous epoch's
    replay checkpoint is still stored."""
    return [0] + sorted(e + 1 for e, s in list_checkpoints(run) if s == "replay")


def _way_out(run: Run) -> str:
    points = ", ".join(map(str, rollback_points(run)))
    return (f"to discard everything from an epoch K on and continue from there, run "
            f"'nbody-dt resume {run.url} --from-epoch K' (K one of {points})")


def check_run(run: Run, *, deep: bool) -> None:
    """RunError naming the first damaged object of `run`, unless its objects agree (above).
    `deep` also reads every committed trajectory row against its digests and links, and the
    newest checkpoint against its sidecar (resume); without it only metadata, records and
    listings are read (report)."""
    try:
        _check(run, deep)
    except RunError as exc:
        raise RunError(f"{exc}; {_way_out(run)}") from exc


def _check(run: Run, deep: bool) -> None:
    done = completed(run)
    for i, (epoch, stage) in enumerate(done):
        want = (i // len(STAGES), STAGES[i % len(STAGES)])
        if (epoch, stage) != want:
            raise RunError(f"damaged ledger: {run.url}/{LEDGER}/{stage_key(*want)} is missing although later "
                           "stages are marked done")
    marks = {(e, s): read_mark(run, e, s) for e, s in done}

    store = run.trajectory
    store.check_commit()
    committed = store.epochs()
    persisted = [e for e, s in done if s == "persist"]
    for epoch in persisted:
        mark, key = marks[(epoch, "persist")], f"{run.url}/{LEDGER}/{stage_key(epoch, 'persist')}"
        if epoch not in committed:
            raise RunError(f"damaged trajectory store: the commit marker in {store.where}/zarr.json lacks epoch "
                           f"{epoch}, which {key} records as persisted (the marker is lost, damaged or stale)")
        if "rows" in mark and (list(committed[epoch]) != mark["rows"]
                               or store.epoch_digests(epoch) != mark.get("digests")):
            raise RunError(f"damaged trajectory store: the commit marker in {store.where}/zarr.json disagrees "
                           f"with {key} about the rows of epoch {epoch}")
    unpersisted = sorted(set(committed) - set(persisted))
    if unpersisted and (len(unpersisted) > 1 or unpersisted[0] != len(persisted)):
        raise RunError(f"damaged ledger: {store.where} holds epochs {unpersisted} that the ledger in "
                       f"{run.url}/{LEDGER} does not record as persisted")
    if run.schema_version >= 2:
        missing = sorted(set(store.expected_chunks()) - run.find(TRAJECTORY_DIR))
        if missing:
            raise RunError(f"damaged trajectory store: chunk {store.where}/{missing[0]} is missing "
                           f"({len(missing)} chunk(s) in all)")

    checkpoints = list_checkpoints(run)
    newest = _index(*checkpoints[-1]) if checkpoints else -1
    marked = [(e, s) for e, s in done if s in CHECKPOINTED]
    if marked and newest < _index(*marked[-1]):
        raise RunError(f"damaged checkpoints: {run.url}/{CHECKPOINTS}/{stage_key(*marked[-1])}.pt is missing "
                       f"or uncommitted (no {SIDECAR} sidecar) although the ledger marks that stage done")
    if newest > len(done):
        raise RunError(f"damaged ledger: {run.url}/{LEDGER}/{stage_key(*done[-1]) if done else '(empty)'} is the "
                       f"last mark, but checkpoint {stage_key(*checkpoints[-1])}.pt is further on")

    recorded = {(r["epoch"], r["stage"]) for r in read_metrics(run)}
    for epoch, stage in done:
        if (epoch, stage) not in recorded:
            raise RunError(f"damaged metrics: {run.url}/{METRICS}/{stage_key(epoch, stage)}.json is missing "
                           "although the ledger marks that stage done")
    if deep:
        store.verify_rows()
        if checkpoints:
            verified_checkpoint_bytes(run, *checkpoints[-1])


def rollback(run: Run, from_epoch: int) -> None:
    """Discard epochs >= from_epoch (>= 1): their trajectory rows, checkpoints, metrics and ledger
    marks, keeping epochs before it as the ledger recorded them (their rows are verified first).
    The explicit way out of damage; needs the replay checkpoint of epoch from_epoch - 1."""
    points = rollback_points(run)
    if from_epoch not in points:
        raise RunError(f"--from-epoch {from_epoch}: run {run.url} can restart only from epoch "
                       f"{', '.join(map(str, points))} (a later epoch needs the replay checkpoint of the "
                       "epoch before it)")
    if from_epoch == 0:
        raise ValueError("--from-epoch 0 discards everything: open the run with Run.open(..., reset=True)")
    load_checkpoint(run, from_epoch - 1, "replay")  # refuses a damaged one before anything changes
    epochs, digests = {}, {}
    for epoch in range(from_epoch):
        mark = read_mark(run, epoch, "persist")
        if "rows" not in mark:
            raise RunError(f"--from-epoch {from_epoch}: {run.url}/{LEDGER}/{stage_key(epoch, 'persist')} predates "
                           "row digests; only --from-epoch 0 is possible for this run")
        epochs[epoch], digests[epoch] = tuple(mark["rows"]), mark["digests"]
    run.trajectory.verify_rows(epochs, digests)
    run.trajectory.rollback(epochs, digests)
    first = _index(from_epoch, STAGES[0])
    for folder, suffixes in ((LEDGER, ("",)), (CHECKPOINTS, (f".pt{SIDECAR}", ".pt")), (METRICS, (".json",))):
        names = run.listdir(folder)
        for suffix in suffixes:
            doomed = [n for n in names if n.endswith(suffix) and _stage_of(n.removesuffix(suffix)) >= first]
            for name in sorted(doomed, reverse=True):
                run.remove(f"{folder}/{name}")


def _stage_of(key: str) -> int:
    """The stage-sequence index of a stage_key name (-1 for other names)."""
    parsed = parse_stage_key(key)
    return -1 if parsed is None or parsed[2] else _index(parsed[0], parsed[1])
