"""The trajectory as Zarr v3 arrays growing along the row axis, and replay windows over it.

Arrays: position, velocity (R, N, D); mass (R, N); dt, time, energy, rel_dE (R,) in the run's
float dtype; orbit, step, epoch, prev (R,) int64; warmup (R,) bool. Blosc/zstd compressed,
`chunk_rows` rows per chunk, no sharding (a shard is rewritten whole on every append).

Systems of different N (a mixture of initial conditions) share the store: N is the run's largest
N, and a row of a smaller system is padded with zero-mass bodies (position and velocity 0). The
mass column is the mask: a row's body count is its number of non-zero masses, and gravity, the
energy and the set network ignore padding (nbody_dt.physics.gravity), so a padded row replays
exactly as the unpadded system. A fixed-N run has no padding; its layout is unchanged.

Crash safety: an append resizes and writes every array first and then commits with one write
of the group attributes (the commit marker): the committed row count, each orbit's last row
(for the next prev links), and per committed epoch its row range and a digest of every column
of its rows. Readers use only committed rows and never trust array shapes; rows beyond the
commit (an append that never committed) are overwritten by the next append.

Nothing is written when a store is opened (the group is created by the first append).
`check_commit` (run by every append and by integrity.check_run) refuses, naming the object, a
marker that is missing, contradicts itself or the arrays' lengths, or a missing array. `verify_rows` reads every
committed row and checks it against the digests and the prev links (resume does this);
`missing_chunks` finds chunk objects that a committed row needs but storage lacks (every chunk
is written, even when it holds only fill values, so a missing one is always damage).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from nbody_dt.faults import pause_point
from nbody_dt.model.trajectory import (
    FLOAT_COLUMNS,
    INT_COLUMNS,
    Minibatch,
    Rows,
    link_previous,
    minibatch_from_arrays,
    window_bounds,
)
from nbody_dt.physics.state import State
from nbody_dt.storage.errors import RunError, one_line

COMMIT_ATTR = "nbody_dt_commit"
EMPTY_COMMIT = {"rows": 0, "last_row_of_orbit": [], "epochs": []}
ARRAY_CONFIG = {"write_empty_chunks": True}
ROW_COLUMNS = ("position", "velocity", "mass", *FLOAT_COLUMNS, *INT_COLUMNS, "warmup")
COLUMNS = (*ROW_COLUMNS, "prev")
_COMPRESSOR = BloscCodec(cname="zstd", clevel=3)


def _each(function, items) -> list:
    """[function(item) for item in items], called from one thread per item: Zarr's synchronous
    array calls then overlap on Zarr's own I/O loop, one round of I/O for all columns instead of
    one per column (matters most on object stores)."""
    items = list(items)
    if len(items) < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(function, items))


class TrajectoryStore:
    """The committed rows of one run's trajectory.zarr. A read-only store is a snapshot taken at open."""

    def __init__(self, store, group: zarr.Group | None, arrays: dict[str, zarr.Array], dtype: torch.dtype,
                 chunk_rows: int, writable: bool, where: str, commit: dict, fence=None):
        self.where = where
        self.writable = writable
        self._store = store
        self._group = group
        self._fence = fence
        self._np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        self._chunk_rows = chunk_rows
        self._arrays = arrays
        self._rows: int = commit["rows"]
        self._last = np.asarray(commit["last_row_of_orbit"], dtype=np.int64)
        self._epochs: dict[int, tuple[int, int]] = {int(e[0]): (int(e[1]), int(e[2])) for e in commit["epochs"]}
        self._digests: dict[int, dict] = {int(e[0]): e[3] for e in commit["epochs"] if len(e) > 3}
        self._damage: str | None = None

    @classmethod
    def open(cls, store, *, writable: bool, dtype: torch.dtype, chunk_rows: int, where: str, present: bool,
             fence=None) -> TrajectoryStore:
        """Open the store without writing anything; `present`: whether storage holds any object of it
        (then its group metadata and commit marker must be there). `where` names it in errors;
        `fence(what)` is called before every commit (the writer lock check)."""
        group = None
        if present:
            try:
                group = zarr.open_group(store, mode="r+" if writable else "r", zarr_format=3)
            except FileNotFoundError:
                raise RunError(f"damaged trajectory store: {where}/zarr.json (the group metadata holding the "
                               "commit marker) is missing") from None
            except Exception as exc:
                raise RunError(f"damaged trajectory store: {where}/zarr.json is unreadable: {one_line(exc)}") from exc
        arrays = {}
        for name in COLUMNS if group is not None else ():
            try:
                arrays[name] = group[name].with_config(ARRAY_CONFIG)
            except KeyError:
                continue  # not created yet (or lost: _check_commit tells which)
            except Exception as exc:
                raise RunError(f"damaged trajectory store: {where}/{name}/zarr.json (array metadata) is "
                               f"unreadable: {one_line(exc)}") from exc
        damage = None
        try:
            commit = EMPTY_COMMIT if group is None else group.attrs[COMMIT_ATTR]
            out = cls(store, group, arrays, dtype, chunk_rows, writable, where, commit, fence)
        except Exception as exc:
            damage = (f"damaged trajectory store: {where}/zarr.json holds no commit marker ({COMMIT_ATTR})"
                      if isinstance(exc, KeyError) else
                      f"damaged trajectory store: the commit marker in {where}/zarr.json is unreadable: "
                      f"{one_line(exc)}")
            out = cls(store, group, arrays, dtype, chunk_rows, writable, where, EMPTY_COMMIT, fence)
        out._damage = damage
        return out

    def check_commit(self) -> None:
        """RunError unless the commit marker exists and agrees with itself and with the arrays (no
        data read). Appends check it first; integrity.check_run checks it with the ledger."""
        if self._damage:
            raise RunError(self._damage)
        bad = f"damaged trajectory store: the commit marker in {self.where}/zarr.json"
        expected_start = 0
        for epoch in sorted(self._epochs):
            start, stop = self._epochs[epoch]
            if start != expected_start or stop < start:
                raise RunError(f"{bad} has epoch {epoch} at rows [{start}, {stop}), which does not follow "
                               f"the previous epoch's end {expected_start}")
            expected_start = stop
        if expected_start != self._rows:
            raise RunError(f"{bad} counts {self._rows} rows, its epochs cover {expected_start}")
        if self._last.size and (self._last.max() >= self._rows or self._last.min() < -1):
            raise RunError(f"{bad} links orbits to rows beyond its {self._rows} committed rows")
        if self._rows == 0:
            return
        for name in COLUMNS:
            arr = self._arrays.get(name)
            if arr is None:
                raise RunError(f"damaged trajectory store: {self.where}/{name}/zarr.json (array metadata) is missing")
            if arr.shape[0] < self._rows:
                raise RunError(f"damaged trajectory store: {self.where}/{name} holds {arr.shape[0]} rows, "
                               f"{self._rows} are committed")

    # -- the commit -------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        """Committed rows."""
        return self._rows

    def epochs(self) -> dict[int, tuple[int, int]]:
        """Committed epochs and their row ranges [start, stop)."""
        return dict(self._epochs)

    def epoch_range(self, epoch: int) -> tuple[int, int]:
        if epoch not in self._epochs:
            raise ValueError(f"epoch {epoch} has no committed rows in {self.where}")
        return self._epochs[epoch]

    def append(self, rows: Rows, epoch: int) -> int:
        """Append one epoch's rows (all with this epoch) and commit; returns the committed row count.

        Idempotent per epoch: when `epoch` is already committed (a persist re-run after a crash
        between commit and ledger), nothing is written and the current count is returned.
        Epochs are appended in increasing order, each in one call.
        """
        if not self.writable:
            raise RunError(f"trajectory store {self.where} is not open for writing")
        self.check_commit()
        if epoch in self._epochs:
            return self._rows
        if self._epochs and epoch < max(self._epochs):
            raise ValueError(f"epoch {epoch} comes after committed epoch {max(self._epochs)}; epochs are "
                             "appended in increasing order")
        cols = self._validated(rows, epoch)
        start = self._rows
        stop = start + len(rows)
        last = np.full(max(len(self._last), int(cols["orbit"].max(initial=-1)) + 1), -1, dtype=np.int64)
        last[:len(self._last)] = self._last
        cols["prev"], last = link_previous(cols["orbit"], last, start)
        if self._fence:
            self._fence(f"{self.where} (rows of epoch {epoch})")
        if self._group is None:
            self._group = zarr.create_group(self._store, zarr_format=3, attributes={COMMIT_ATTR: EMPTY_COMMIT})
        if stop > start:
            arrays = {name: self._array(name, data) for name, data in cols.items()}
            _each(lambda a: a.resize((stop, *a.shape[1:])), arrays.values())
            _each(lambda name: arrays[name].set_basic_selection(slice(start, stop), cols[name]), arrays)
        pause_point("before-commit")  # crash tests: killed with the rows written, not committed
        epochs = {**self._epochs, epoch: (start, stop)}
        digests = {**self._digests, epoch: column_digests(cols)}
        if self._fence:
            self._fence(f"the commit marker of {self.where}")
        self._group.attrs.update({COMMIT_ATTR: _commit(stop, last, epochs, digests)})
        self._rows, self._last, self._epochs, self._digests = stop, last, epochs, digests
        return stop

    def epoch_digests(self, epoch: int) -> dict | None:
        """{column: digest} of a committed epoch's rows (None for a store written before digests)."""
        return self._digests.get(epoch)

    def rollback(self, epochs: dict[int, tuple[int, int]], digests: dict[int, dict]) -> None:
        """Commit exactly `epochs` (ranges from 0, as they were committed before) and their digests,
        dropping every later row: the explicit rollback of `nbody-dt resume --from-epoch`. The kept
        rows must pass `verify_rows` first; the orbits' last rows are derived from them."""
        if not self.writable:
            raise RunError(f"trajectory store {self.where} is not open for writing")
        rows = max((b for _, b in epochs.values()), default=0)
        orbit = self._read_checked("orbit", 0, rows) if rows else np.zeros(0, dtype=np.int64)
        last = np.full(int(orbit.max(initial=-1)) + 1, -1, dtype=np.int64)
        last[orbit] = np.arange(rows)  # numpy assigns in order: each orbit ends at its last row
        if self._fence:
            self._fence(f"the commit marker of {self.where} (rollback)")
        commit = _commit(rows, last, epochs, digests)
        if self._group is None:
            self._group = zarr.create_group(self._store, zarr_format=3, attributes={COMMIT_ATTR: commit})
        else:
            self._group.attrs.update({COMMIT_ATTR: commit})
        self._rows, self._last, self._epochs = rows, last, dict(epochs)
        self._digests = {e: d for e, d in digests.items() if e in epochs}
        self._damage = None

    def _validated(self, rows: Rows, epoch: int) -> dict[str, np.ndarray]:
        """The rows as numpy columns, checked against the run's dtype, shapes and `epoch`."""
        cols = {name: t.detach().cpu().numpy() for name, t in rows.as_dict().items()}
        r = len(rows)
        for name in ("position", "velocity", "mass", *FLOAT_COLUMNS):
            if cols[name].dtype != self._np_dtype:
                raise ValueError(f"rows.{name} is {cols[name].dtype}; this run stores {self._np_dtype}")
        for name in INT_COLUMNS:
            cols[name] = cols[name].astype(np.int64, copy=False)
        cols["warmup"] = cols["warmup"].astype(bool, copy=False)
        pos = cols["position"]
        if pos.ndim != 3 or cols["velocity"].shape != pos.shape or cols["mass"].shape != pos.shape[:2] or any(
                cols[n].shape != (r,) for n in (*FLOAT_COLUMNS, *INT_COLUMNS, "warmup")):
            raise ValueError("rows: position/velocity must be (R, N, D), mass (R, N) and the rest (R,)")
        if (cols["epoch"] != epoch).any():
            raise ValueError(f"rows hold epochs {sorted(set(cols['epoch'].tolist()))}, appending epoch {epoch}")
        if (cols["orbit"] < 0).any():
            raise ValueError("rows: orbit ids must be >= 0")
        return cols

    def _array(self, name: str, data: np.ndarray) -> zarr.Array:
        """The array for column `name`, created on first use with `data`'s trailing shape."""
        tail = data.shape[1:]
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._group.create_array(name, shape=(0, *tail), chunks=(self._chunk_rows, *tail),
                                           dtype=data.dtype, compressors=_COMPRESSOR, fill_value=0,
                                           config=ARRAY_CONFIG)
            self._arrays[name] = arr
        elif arr.shape[1:] != tail:
            raise ValueError(f"rows.{name} has per-row shape {tail}; {self.where} holds {arr.shape[1:]}")
        return arr

    # -- checking stored rows -------------------------------------------------------------------

    def verify_rows(self, epochs: dict[int, tuple[int, int]] | None = None,
                    digests: dict[int, dict] | None = None) -> None:
        """Read committed rows: each epoch's columns must match their digests, rows carry their
        epoch, and prev links point back to an earlier row of the same orbit; by default every
        committed epoch against the commit marker (then also each orbit's last row), or the given
        `epochs` and `digests` (a rollback's). RunError naming the damaged array and chunks."""
        whole = epochs is None
        epochs = self._epochs if whole else epochs
        digests = self._digests if whole else digests
        rows = max((b for _, b in epochs.values()), default=0)
        orbit = self._read_checked("orbit", 0, rows)
        for epoch, (start, stop) in sorted(epochs.items()):
            epoch_digests = digests.get(epoch)
            for name in COLUMNS:
                data = orbit[start:stop] if name == "orbit" else self._read_checked(name, start, stop)
                if epoch_digests is not None and stop > start and _digest(data) != epoch_digests.get(name):
                    raise RunError(f"damaged trajectory store: {self._chunks_of(name, start, stop)} (rows "
                                   f"[{start}, {stop}) of epoch {epoch}) do not match their commit digest")
                if name == "epoch" and (data != epoch).any():
                    raise RunError(f"damaged trajectory store: {self._chunks_of(name, start, stop)} hold rows "
                                   f"of another epoch than {epoch}")
                if name == "prev":
                    here = np.arange(start, stop)
                    linked = data >= 0
                    if (data >= here).any() or (data < -1).any() or (
                            orbit[data[linked]] != orbit[start:stop][linked]).any():
                        raise RunError(f"damaged trajectory store: {self._chunks_of(name, start, stop)} link "
                                       "rows to rows that are not earlier steps of the same orbit")
        if not whole:
            return
        if rows and orbit.max() >= len(self._last):
            raise RunError(f"damaged trajectory store: the commit marker in {self.where}/zarr.json lacks orbits "
                           "that its rows hold")
        last = np.full(len(self._last), -1, dtype=np.int64)
        last[orbit] = np.arange(rows)
        if not np.array_equal(last, self._last):
            raise RunError(f"damaged trajectory store: the commit marker in {self.where}/zarr.json disagrees "
                           "with its rows about each orbit's last row")

    def _read_checked(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one column as stored (committed or not); RunError naming what is damaged."""
        if stop == start:
            return self._empty(name)
        arr = self._arrays.get(name)
        if arr is None or arr.shape[0] < stop:
            raise RunError(f"damaged trajectory store: {self.where}/{name} is missing or holds fewer than "
                           f"{stop} rows")
        try:
            return arr[start:stop]
        except Exception as exc:  # a truncated or garbage chunk fails to decode
            raise RunError(f"damaged trajectory store: {self._chunks_of(name, start, stop)} cannot be read: "
                           f"{one_line(exc)}") from exc

    def _chunks_of(self, name: str, start: int, stop: int) -> str:
        """'<where>/<name>/c/<i>..' naming the chunk objects of rows [start, stop)."""
        size = self._arrays[name].chunks[0] if name in self._arrays else self._chunk_rows
        first, last = start // size, max(start, stop - 1) // size
        return f"{self.where}/{name}/c/{first}" + ("" if first == last else f"..{last}")

    def expected_chunks(self) -> list[str]:
        """The chunk object keys (relative to the store) that the committed rows need."""
        keys = []
        for name in COLUMNS:
            arr = self._arrays.get(name)
            if arr is None or not self._rows:
                continue
            tail = "/0" * (arr.ndim - 1)
            keys += [f"{name}/c/{i}{tail}" for i in range(-(-self._rows // arr.chunks[0]))]
        return keys

    # -- reading --------------------------------------------------------------------------------

    def columns(self, names=COLUMNS, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Committed rows [start, stop) of the named columns (one sequential read per column)."""
        stop = self._rows if stop is None else stop
        if not 0 <= start <= stop <= self._rows:
            raise ValueError(f"rows [{start}, {stop}) are outside the {self._rows} committed rows of {self.where}")
        present = [name for name in names if name in self._arrays]
        data = _each(lambda name: self._arrays[name].get_basic_selection(slice(start, stop)), present)
        out = dict(zip(present, data, strict=True))
        return {name: out[name] if name in out else self._empty(name) for name in names}

    def take(self, names, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The named columns at sorted committed row indices (chunk-wise reads)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows[-1] >= self._rows or rows[0] < 0 or (np.diff(rows) <= 0).any()):
            raise ValueError("take: row indices must be sorted, unique and committed")
        if not rows.size:
            return self.columns(names, 0, 0)
        return {name: self._arrays[name].oindex[rows] for name in names}

    def _empty(self, name: str) -> np.ndarray:
        """A zero-row column for a store whose arrays do not exist yet (N and D unknown: 0)."""
        shape = {"position": (0, 0, 0), "velocity": (0, 0, 0), "mass": (0, 0)}.get(name, (0,))
        dtype = np.int64 if name in (*INT_COLUMNS, "prev") else bool if name == "warmup" else self._np_dtype
        return np.zeros(shape, dtype=dtype)

    def rows(self, start: int = 0, stop: int | None = None) -> Rows:
        """Committed rows [start, stop) as Rows."""
        return Rows(**{k: torch.from_numpy(v) for k, v in self.columns(ROW_COLUMNS, start, stop).items()})

    def epoch_rows(self, epoch: int) -> Rows:
        """All committed rows of one epoch."""
        return self.rows(*self.epoch_range(epoch))

    def window(self, kind: str = "all", *, epoch: int | None = None, last_rows: int | None = None,
               history_len: int = 0) -> StoredWindow:
        """A ReplaySource: 'epoch' (the rows of `epoch`), 'all', or the 'last' `last_rows` committed rows."""
        if kind == "epoch" and epoch is None:
            raise ValueError("the 'epoch' window needs epoch=")
        if kind == "last" and (last_rows is None or last_rows < 1):
            raise ValueError("the 'last' window needs last_rows >= 1")
        epoch_range = self.epoch_range(epoch) if kind == "epoch" else (0, 0)
        start, stop = window_bounds(kind, epoch_range, self._rows, last_rows or 0)
        return StoredWindow(self, start, stop, history_len)


def _digest(data: np.ndarray) -> str:
    """A short content digest of one column block (dtype, shape and bytes)."""
    h = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
    h.update(np.ascontiguousarray(data).tobytes())
    return h.hexdigest()[:32]


def column_digests(cols: dict[str, np.ndarray]) -> dict[str, str]:
    return {name: _digest(cols[name]) for name in COLUMNS}


def _commit(rows: int, last: np.ndarray, epochs: dict, digests: dict) -> dict:
    """The commit marker: row count, orbits' last rows, [epoch, start, stop, digests] per epoch
    (epochs a schema-1 run committed before digests keep [epoch, start, stop])."""
    return {"rows": rows, "last_row_of_orbit": np.asarray(last).tolist(),
            "epochs": [[e, a, b, digests[e]] if e in digests else [e, a, b] for e, (a, b) in sorted(epochs.items())]}


class StoredWindow:
    """ReplaySource over committed rows [start, stop), warm-up rows excluded.

    Reads the window once (one sequential read per column) plus the few rows before `start` that
    history windows reach (at most history_len per orbit), so `gather` never touches storage.
    Gathers equal InMemoryTrajectory's for the same rows.
    """

    def __init__(self, store: TrajectoryStore, start: int, stop: int, history_len: int):
        self.start, self.stop, self.history_len = start, stop, history_len
        cols = store.columns(("position", "velocity", "mass", "prev", "warmup"), start, stop)
        before = _rows_reached_before(store, cols["prev"], start, history_len)
        extra = store.take(("position", "velocity", "mass", "prev"), before)
        table = {k: np.concatenate([cols[k], extra[k]]) for k in ("position", "velocity", "mass")}
        self._table = State(*(torch.from_numpy(table[k]) for k in ("position", "velocity", "mass")))
        self._prev = _local_links(np.concatenate([cols["prev"], extra["prev"]]), start, stop, before)
        self._replayable = np.nonzero(~cols["warmup"])[0]

    def __len__(self) -> int:
        return len(self._replayable)

    def gather(self, positions: torch.Tensor) -> Minibatch:
        local = self._replayable[np.asarray(positions, dtype=np.int64)]
        mb = minibatch_from_arrays(local, self._table, self._prev, self.history_len)
        return Minibatch(mb.state, mb.history, mb.rows + self.start)


def _rows_reached_before(store: TrajectoryStore, prev: np.ndarray, start: int, history_len: int) -> np.ndarray:
    """Sorted rows before `start` within history_len prev-hops of the window rows (whose links are `prev`)."""
    found = np.zeros(0, dtype=np.int64)
    level = np.unique(prev[(prev >= 0) & (prev < start)])
    for _ in range(history_len):
        if not level.size:
            break
        found = np.union1d(found, level)
        up = store.take(("prev",), level)["prev"]
        level = np.setdiff1d(up[up >= 0], found)
    return found


def _local_links(prev: np.ndarray, start: int, stop: int, before: np.ndarray) -> np.ndarray:
    """Global prev links -> indices into the loaded table (window rows, then `before`); -1 where not loaded."""
    out = np.full_like(prev, -1)
    inside = prev >= start
    out[inside] = prev[inside] - start
    if len(before):
        pos = np.minimum(np.searchsorted(before, prev), len(before) - 1)
        hit = ~inside & (before[pos] == prev)
        out[hit] = (stop - start) + pos[hit]
    return out
