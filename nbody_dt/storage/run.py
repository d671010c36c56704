"""A run: one URL (local path or any fsspec URL) holding the frozen config, a writer lock,
the trajectory store, checkpoints, metrics and the ledger.

Layout under the URL:

    run.json            package, storage schema version, package version, creation time, config
    lock.json           the single writer's host, pid, time and token (absent when no writer)
    trajectory.zarr/    the Zarr v3 trajectory (trajectory_store.py)
    checkpoints/        <key>.pt + <key>.pt.json commit sidecars (checkpoints.py)
    metrics/, ledger/   one object per (epoch, stage) (metrics.py)

Every small file is written whole: on local paths to a temporary name that is then renamed,
on object stores with one PUT (which publishes an object atomically).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import uuid
from datetime import datetime, timezone
from pathlib import Path

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from zarr.storage import FsspecStore, LocalStore

from nbody_dt import __version__
from nbody_dt.config import Config, ConfigError, diff, from_stored, safe_keys
from nbody_dt.storage.errors import RunError, RunNotFound, one_line
from nbody_dt.storage.trajectory_store import TrajectoryStore

PACKAGE = "nbody-dt"
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # 1: no row digests, and all-fill-value chunks were not stored
STAGES = ("collect", "persist", "replay", "epoch")
META_FILE = "run.json"
LOCK_FILE = "lock.json"
TRAJECTORY_DIR = "trajectory.zarr"
CHECKPOINTS_DIR, METRICS_DIR, LEDGER_DIR = "checkpoints", "metrics", "ledger"
PROGRESS = (LEDGER_DIR, CHECKPOINTS_DIR, METRICS_DIR, TRAJECTORY_DIR)  # what --from-epoch 0 discards, in order

log = logging.getLogger(__name__)

_KEY = re.compile(r"e(\d+)-(\d)-([a-z]+)(\..+)?")


def stage_key(epoch: int, stage: str) -> str:
    """'e0000012-2-replay': object names that sort by (epoch, stage order)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (expected one of {', '.join(STAGES)})")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return f"e{epoch:07d}-{STAGES.index(stage)}-{stage}"


def parse_stage_key(name: str) -> tuple[int, str, str] | None:
    """(epoch, stage, suffix) of a stage_key name plus optional suffix ('.pt'); None for other names."""
    m = _KEY.fullmatch(name)
    if m is None or m.group(3) not in STAGES or STAGES.index(m.group(3)) != int(m.group(2)):
        return None
    return int(m.group(1)), m.group(3), m.group(4) or ""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


def _resolve(url: str | Path, storage_options: dict | None):
    url = str(url).rstrip("/") or "/"
    try:
        fs, root = url_to_fs(url, **(storage_options or {}))
    except Exception as exc:  # unknown protocol, missing driver, bad options: all "unreadable URL"
        raise RunError(f"cannot access run URL {url}: {one_line(exc)}") from exc
    return url, fs, root.rstrip("/")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe_holder(holder: dict | None) -> str:
    """'pid 12 on host h since T (process not running: stale lock)' for a lock file's content."""
    if not holder:
        return "unreadable lock file"
    text = f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('time')}"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        text += " (process still running)" if _pid_alive(holder["pid"]) else " (process not running: stale lock)"
    return text


def _alive_here(holder: dict | None) -> bool:
    """Held by a process of this host that is still running."""
    return (bool(holder) and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
            and _pid_alive(holder["pid"]))


def _stale_here(holder: dict | None) -> bool:
    """Held by a process of this host that is no longer running (a killed writer)."""
    return (bool(holder) and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
            and not _pid_alive(holder["pid"]))


class Run:
    """An opened run. Get one from `Run.create` or `Run.open`; `close()` (or `with`) releases the lock.

    Attributes: url, config (the validated Config), writable, trajectory (TrajectoryStore),
    created and package_version (from run.json).
    """

    def __init__(self, url: str, fs, root: str, meta: dict, writable: bool, storage_options: dict | None):
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.writable = writable
        self.config: Config = from_stored(meta["config"])
        self.created: str = meta["created"]
        self.package_version: str = meta["package_version"]
        self.schema_version: int = meta["schema_version"]
        self._fs = fs
        self._root = root
        self._meta = meta
        self._local = isinstance(fs, LocalFileSystem)
        self._lock_token: str | None = None
        self._config_changed = False
        self.trajectory: TrajectoryStore | None = None

    # -- creating and opening -------------------------------------------------------------

    @classmethod
    def create(cls, url: str | Path, config: Config, *, storage_options: dict | None = None) -> Run:
        """A new run at `url` (missing or an empty directory), opened for writing and locked."""
        url, fs, root = _resolve(url, storage_options)
        exists = RunError(f"a run already exists at {url}; resume it instead of creating it")
        try:
            if fs.exists(f"{root}/{META_FILE}"):
                raise exists
            if fs.exists(root) and (not fs.isdir(root) or fs.ls(root, detail=False)):
                raise RunError(f"{url} exists and is not an empty directory; not creating a run there")
        except RunError:
            raise
        except Exception as exc:
            raise RunError(f"cannot access run URL {url}: {one_line(exc)}") from exc
        meta = {"package": PACKAGE, "schema_version": SCHEMA_VERSION, "package_version": __version__,
                "created": now_iso(), "config": config.to_dict()}
        run = cls(url, fs, root, meta, True, storage_options)
        try:
            run._create_exclusive(META_FILE, _json_bytes(meta))  # never creates buckets, only objects
        except FileExistsError:
            raise exists from None
        except Exception as exc:
            raise RunError(f"cannot create a run at {url}: {one_line(exc)}") from exc
        run._start(break_lock=False)
        return run

    @classmethod
    def open(cls, url: str | Path, config: Config | None = None, *, write: bool = True,
             break_lock: bool | str = False, storage_options: dict | None = None, reset: bool = False) -> Run:
        """An existing run (RunNotFound where nothing is stored). With `config`, it must equal the
        stored one except in resume-safe keys, whose new values `save_config()` stores. `write`
        takes the writer lock; `break_lock` takes it over from a dead writer (with a warning naming
        it), never from a writer still running on this host; `break_lock="stale"` only from a
        writer of this host whose process is gone. `reset` (a writer only) discards all progress
        first: ledger, checkpoints, metrics, trajectory."""
        url, fs, root = _resolve(url, storage_options)
        meta = _read_meta(fs, root, url)
        changed = False
        if config is not None:
            meta, changed = _adopt_config(meta, config, url)
        run = cls(url, fs, root, meta, write, storage_options)
        if write:
            run._config_changed = changed
            run._start(break_lock, reset=reset)
        else:
            run._open_trajectory()
        return run

    def _start(self, break_lock: bool | str, reset: bool = False) -> None:
        """Take the writer lock, (reset,) open the trajectory; release the lock on failure."""
        self._acquire_lock(break_lock)
        try:
            if reset:
                self._discard_progress()
            self._open_trajectory()
        except BaseException:
            self.close()
            raise

    def reset(self) -> None:
        """Discard all progress of this writable run (--from-epoch 0): ledger, checkpoints, metrics,
        trajectory; the run then stands as just created."""
        self._require_writable()
        self._discard_progress()
        self._open_trajectory()

    def _discard_progress(self) -> None:
        for folder in PROGRESS:
            self.check_lock(f"(discarding) {self.url}/{folder}")
            log.warning("discarding %s/%s (--from-epoch 0)", self.url, folder)
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm(self._path(folder), recursive=True)

    def adopt_config(self, config: Config) -> None:
        """Take `config` as this writable run's config (as `open(config=...)` does): RunError unless
        it differs from the stored one only in resume-safe keys; `save_config()` stores a change."""
        self._require_writable()
        self._meta, changed = _adopt_config(self._meta, config, self.url)
        self.config = config
        self._config_changed = self._config_changed or changed

    def save_config(self) -> None:
        """Store the resume-safe config changes this writer was opened with (run.json); called once
        the run has been checked, so that a refused resume leaves run.json as it was."""
        if self._config_changed:
            self.write_bytes(META_FILE, _json_bytes(self._meta))
            self._config_changed = False

    def _open_trajectory(self) -> None:
        try:
            self.trajectory = self._trajectory_store()
        except RunError as exc:  # unreadable group metadata: only a fresh start can go on from here
            raise RunError(f"{exc}; to discard all progress and start over under the stored config, run "
                           f"'nbody-dt resume {self.url} --from-epoch 0'") from exc

    def _trajectory_store(self) -> TrajectoryStore:
        return TrajectoryStore.open(self._zarr_store(), writable=self.writable, dtype=self.config.torch_dtype,
                                    chunk_rows=self.config.storage.chunk_rows, where=self._where(),
                                    present=bool(self.listdir(TRAJECTORY_DIR)), fence=self.check_lock)

    def _where(self) -> str:
        return f"{self.url}/{TRAJECTORY_DIR}"

    def _zarr_store(self):
        if self._local:
            return LocalStore(Path(self._root) / TRAJECTORY_DIR, read_only=not self.writable)
        return FsspecStore.from_url(self._where(), storage_options=self.storage_options, read_only=not self.writable)

    # -- the writer lock --------------------------------------------------------------------

    def _acquire_lock(self, break_lock: bool | str) -> None:
        token = uuid.uuid4().hex
        holder = _json_bytes({"host": socket.gethostname(), "pid": os.getpid(), "time": now_iso(), "token": token})
        try:
            self._create_exclusive(LOCK_FILE, holder)
        except FileExistsError:
            current = self._read_lock()
            desc = _describe_holder(current)
            if _alive_here(current):
                raise RunError(f"run {self.url} is locked by a writer that is still running ({desc}); "
                               "stop it first (a live writer's lock is never broken)") from None
            if break_lock == "stale":
                break_lock = _stale_here(current)
            if not break_lock:
                raise RunError(f"run {self.url} is locked by another writer ({desc}); if that writer is dead, "
                               "open it with break_lock=True (--break-lock)") from None
            self._break_lock(current, holder, desc)
        self._lock_token = token

    def _break_lock(self, stale: dict | None, holder: bytes, desc: str) -> None:
        """Replace the lock `stale` by `holder` as one compare-and-swap, built from exclusive creates
        only (O_EXCL-style links locally, If-None-Match PUTs on object stores): a breaker first
        claims `lock.json.break-<stale token>`, which exactly one breaker of that lock can create,
        then checks that the lock still holds that token, and only then replaces it."""
        lost = RunError(f"run {self.url}: another writer took the lock while it was being broken")
        stale_token = (stale or {}).get("token")
        claim = f"{LOCK_FILE}.break-{stale_token if isinstance(stale_token, str) else 'unreadable'}"
        try:
            self._create_exclusive(claim, holder)
        except FileExistsError:
            raise lost from None
        try:
            if self._read_lock() != stale:
                raise lost
            log.warning("breaking the lock of run %s held by %s", self.url, desc)
            self._fs.rm_file(self._path(LOCK_FILE))
            try:
                self._create_exclusive(LOCK_FILE, holder)
            except FileExistsError:
                raise lost from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm_file(self._path(claim))

    def check_lock(self, what: str) -> None:
        """Fence a write: RunError unless this run still holds its writer lock (another process
        may have broken it), raised before `what` is written."""
        holder = self._read_lock()
        if self._lock_token is None or holder is None or holder.get("token") != self._lock_token:
            raise RunError(f"run {self.url}: this writer no longer holds the lock "
                           f"({'no lock file' if holder is None else _describe_holder(holder)}); "
                           f"stopped before writing {what}")

    def _read_lock(self) -> dict | None:
        path = self._path(LOCK_FILE)
        self._fs.invalidate_cache(path)
        try:
            holder = json.loads(self._fs.cat_file(path))
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def close(self) -> None:
        """Release the writer lock (if this run holds it); the run is read-only afterwards."""
        token, self._lock_token = self._lock_token, None
        self.writable = False
        if self.trajectory is not None:
            self.trajectory.writable = False
        if token is None:
            return
        holder = self._read_lock()
        if holder is not None and holder.get("token") == token:
            self._fs.rm_file(self._path(LOCK_FILE))
        else:
            log.warning("the lock of run %s was taken over by another writer; left in place", self.url)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Run({self.url!r}, {'write' if self.writable else 'read-only'})"

    # -- object access for the storage modules ------------------------------------------------

    def _path(self, rel: str) -> str:
        return f"{self._root}/{rel}"

    def _require_writable(self) -> None:
        if not self.writable:
            raise RunError(f"run {self.url} is not open for writing")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole object: local temp file + fsync + rename (+ fsync of the folder), or one
        PUT on object stores. Fenced: refused once this writer has lost its lock."""
        self._require_writable()
        self.check_lock(f"{self.url}/{rel}")
        path = self._path(rel)
        if not self._local:
            self._fs.pipe_file(path, data)
            return
        tmp = self._local_temp(path, data)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))

    def _create_exclusive(self, rel: str, data: bytes) -> None:
        """Write a whole object that must not exist yet; FileExistsError if it does."""
        path = self._path(rel)
        if not self._local:
            self._fs.pipe_file(path, data, mode="create")  # S3: a conditional PUT (If-None-Match)
            return
        tmp = self._local_temp(path, data)
        try:
            os.link(tmp, path)  # atomic, and unlike rename it refuses to replace
        finally:
            os.unlink(tmp)
        _fsync_dir(os.path.dirname(path))

    @staticmethod
    def _local_temp(path: str, data: bytes) -> str:
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def read_bytes(self, rel: str) -> bytes:
        return self._fs.cat_file(self._path(rel))

    def exists(self, rel: str) -> bool:
        return self._fs.exists(self._path(rel))

    def listdir(self, rel: str) -> list[str]:
        """Names in a folder of the run, freshly listed (object-store listings are cached); [] if absent."""
        path = self._path(rel)
        self._fs.invalidate_cache(path)
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self._fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def find(self, rel: str) -> set[str]:
        """Every object below a folder of the run, as paths relative to that folder (freshly listed)."""
        path = self._path(rel)
        self._fs.invalidate_cache(path)
        try:
            return {p[len(path) + 1:] for p in self._fs.find(path)}
        except FileNotFoundError:
            return set()

    def remove(self, rel: str) -> None:
        """Delete an object if it exists (fenced like write_bytes)."""
        self._require_writable()
        self.check_lock(f"(removing) {self.url}/{rel}")
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm_file(self._path(rel))


def _fsync_dir(folder: str) -> None:
    """Make a rename or link in `folder` durable (POSIX: the directory entry needs its own fsync)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_meta(fs, root: str, url: str) -> dict:
    """run.json, checked to be an nbody-dt run of this schema version with a valid config."""
    where = f"{url}/{META_FILE}"
    try:
        raw = fs.cat_file(f"{root}/{META_FILE}")
    except FileNotFoundError:
        try:
            present = fs.exists(root)
        except Exception as exc:
            raise RunError(f"cannot access run URL {url}: {one_line(exc)}") from exc
        if present:
            raise RunError(f"{url} is not an nbody-dt run (no {META_FILE})") from None
        raise RunNotFound(f"no run at {url}") from None
    except Exception as exc:  # permissions, network, a folder named run.json, ...
        raise RunError(f"cannot read {where}: {one_line(exc)}") from exc
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise RunError(f"corrupt run metadata {where}: {one_line(exc)}") from exc
    if not isinstance(meta, dict) or meta.get("package") != PACKAGE:
        raise RunError(f"{url} is not an nbody-dt run ({META_FILE} was written by something else)")
    if meta.get("schema_version") not in READABLE_SCHEMAS:
        raise RunError(f"run {url} has storage schema version {meta.get('schema_version')!r}; nbody-dt "
                       f"{__version__} reads versions {', '.join(map(str, READABLE_SCHEMAS))}")
    missing = {"config", "created", "package_version"} - meta.keys()
    if missing:
        raise RunError(f"corrupt run metadata {where}: {', '.join(sorted(missing))} missing")
    _upgrade_config(meta)
    try:
        from_stored(meta["config"])
    except (ConfigError, TypeError, AttributeError) as exc:
        if "unknown key" in str(exc):  # most likely a run of a newer nbody-dt, not a damaged file
            writer = meta["package_version"]
            hint = (f"it was written by nbody-dt {writer}, open it with that version" if writer != __version__
                    else f"it was written by another build of nbody-dt {writer} that has this key")
            raise RunError(f"run metadata {where} has a config key nbody-dt {__version__} does not know "
                           f"({one_line(exc)}); {hint}") from exc
        raise RunError(f"corrupt run metadata {where}: {one_line(exc)}") from exc
    return meta


def _upgrade_config(meta: dict) -> None:
    """Keys added since schema 1 get the value that reproduces what such a run computed:
    compute.reduction_shards = 1 is the single-pass reduction of runs created before it."""
    if meta["schema_version"] == 1 and isinstance(meta["config"], dict):
        compute = meta["config"].setdefault("compute", {})
        if isinstance(compute, dict):
            compute.setdefault("reduction_shards", 1)


def _lookup(tree: dict, dotted: str):
    """The value at a dotted key of a nested dict (None where absent)."""
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _adopt_config(meta: dict, config: Config, url: str) -> tuple[dict, bool]:
    """(meta with `config` in it, whether it changed); RunError unless only resume-safe keys differ."""
    new = config.to_dict()
    changed = diff(meta["config"], new)
    unsafe = [k for k in changed if k not in safe_keys()]
    if unsafe:
        details = ", ".join(f"{k} ({_lookup(meta['config'], k)!r} -> {_lookup(new, k)!r})" for k in unsafe)
        raise RunError(f"config differs from the one run {url} was created with: {details}; only "
                       f"{', '.join(sorted(safe_keys()))} may change on resume")
    if not changed:
        return meta, False
    return {**meta, "config": new, "updated": now_iso()}, True
