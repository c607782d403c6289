"""Where a :class:`~lossopt.blackbox.Study` keeps its trials: in memory, or in one SQLite file.

Both storages hold the study's metadata (k, names, the bound constraint, the seed) and its trials,
and implement the same four operations, each atomic:

- ``add(rows)``: append complete or failed trials, ids allocated inside the transaction;
- ``finish(id, ...)``: turn a pending trial into a complete or failed one (exactly once);
- ``reserve(propose)``: read every trial, let ``propose(trials)`` choose λs, and append them as
  pending trials — all under the write lock, so two processes asking at once never get the same
  suggestion and never miss each other's observations;
- ``trials()``: a consistent snapshot.

The SQLite file (stdlib ``sqlite3``) uses write-ahead logging, ``synchronous=FULL`` and a busy
timeout; every write is one ``BEGIN IMMEDIATE`` transaction, so a process killed at any point
leaves every acknowledged write in place and nothing half-written. Vectors are stored as raw
little-endian float64 bytes, the metadata as JSON: nothing read from the file is ever executed or
unpickled. The schema carries a version checked on open.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sqlite3
import threading
import time
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from lossopt.constraints import BoundConstraint

SCHEMA_VERSION = 1
STATES = ("pending", "complete", "failed")


@dataclasses.dataclass(frozen=True, eq=False)
class Trial:
    """One trial of a study.

    ``state`` is ``"pending"`` (asked, not yet told), ``"complete"`` or ``"failed"``. ``lam`` is the
    λ trained with (None when an imported observation did not say), ``features`` the observed f(θ)
    (None while pending, and for a failed trial told without features), ``value`` the validation
    loss (None while pending or when a failed trial had none). Arrays are read-only float64.
    """

    id: int
    state: str
    lam: Optional[np.ndarray]
    features: Optional[np.ndarray]
    value: Optional[float]

    def __repr__(self) -> str:
        fmt = lambda a: None if a is None else np.array2string(a, precision=4, threshold=8)
        return (f"Trial(id={self.id}, state={self.state!r}, value={self.value!r}, "
                f"lam={fmt(self.lam)}, features={fmt(self.features)})")


@dataclasses.dataclass(frozen=True, eq=False)
class StudyMeta:
    """What identifies a study: the size, the component names, the bound constraint, the seed."""

    k: int
    names: Tuple[str, ...]
    bound: BoundConstraint
    seed: int

    def to_json(self) -> dict:
        return {"k": self.k, "names": list(self.names), "constraint": bound_to_json(self.bound),
                "seed": self.seed}

    def same_as(self, other: "StudyMeta") -> bool:
        return self.to_json() == other.to_json()


Row = Tuple[str, Optional[np.ndarray], Optional[np.ndarray], Optional[float]]
"""(state, lam, features, value) of a trial to append."""


def bound_to_json(bound: BoundConstraint) -> dict:
    """The data of a bound constraint as plain JSON: ±inf bounds become null (unbounded); a fixed
    component is one whose lower and upper bounds are equal."""
    side = lambda a: [None if math.isinf(v) else float(v) for v in a]
    return {"lower": side(bound.lower), "upper": side(bound.upper),
            "sum_mask": None if bound.sum_mask is None else [bool(b) for b in bound.sum_mask],
            "total": bound.total}


def bound_from_json(data: dict, k: int, names: Sequence[str]) -> BoundConstraint:
    """Inverse of :func:`bound_to_json` (ValueError on malformed data)."""
    try:
        lower = np.array([-np.inf if v is None else float(v) for v in data["lower"]])
        upper = np.array([np.inf if v is None else float(v) for v in data["upper"]])
        mask = data["sum_mask"]
        mask = None if mask is None else np.array([bool(b) for b in mask])
        total = data["total"]
        total = None if total is None else float(total)
        if len(lower) != k or len(upper) != k or (mask is not None and len(mask) != k):
            raise ValueError(f"bounds of the wrong length for k = {k}")
        return BoundConstraint(k, tuple(names), lower, upper, mask, total)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed constraint data {data!r}: {e}") from None


class Storage:
    """The interface both storages implement (see the module docstring)."""

    def load_meta(self) -> Optional[StudyMeta]:
        raise NotImplementedError

    def create(self, meta: StudyMeta) -> StudyMeta:
        """Stores ``meta`` unless the storage already holds a study; returns the stored one."""
        raise NotImplementedError

    def trials(self) -> List[Trial]:
        raise NotImplementedError

    def add(self, rows: Sequence[Row]) -> List[int]:
        raise NotImplementedError

    def finish(self, trial_id: int, state: str, features: Optional[np.ndarray],
               value: Optional[float], check: Callable[[Trial], None]) -> None:
        """Completes the pending trial ``trial_id``; ``check(trial)`` may raise to refuse."""
        raise NotImplementedError

    def reserve(self, propose: Callable[[List[Trial]], np.ndarray]) -> List[Tuple[int, np.ndarray]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _refuse_finish(trial: Optional[Trial], trial_id: int) -> None:
    if trial is None:
        raise ValueError(f"no trial with id {trial_id}: tell id= only with the id of a suggestion "
                         "from ask()")
    if trial.state != "pending":
        value = "" if trial.value is None else f", value {trial.value!r}"
        raise ValueError(f"trial {trial_id} was already told (state {trial.state!r}{value}); a "
                         "suggestion is told once — to record another training at the same λ, "
                         "tell it without id= and pass lam=")


class InMemoryStorage(Storage):
    """Trials in a Python list (thread-safe; lost when the process ends)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._meta: Optional[StudyMeta] = None
        self._trials: List[Trial] = []

    def __repr__(self) -> str:
        return "InMemoryStorage()"

    def load_meta(self) -> Optional[StudyMeta]:
        return self._meta

    def create(self, meta: StudyMeta) -> StudyMeta:
        with self._lock:
            if self._meta is None:
                self._meta = meta
            return self._meta

    def trials(self) -> List[Trial]:
        with self._lock:
            return list(self._trials)

    def add(self, rows: Sequence[Row]) -> List[int]:
        with self._lock:
            start = len(self._trials)
            new = [Trial(start + i, *_frozen_row(row)) for i, row in enumerate(rows)]
            self._trials.extend(new)
            return [t.id for t in new]

    def finish(self, trial_id, state, features, value, check) -> None:
        with self._lock:
            trial = self._trials[trial_id] if 0 <= trial_id < len(self._trials) else None
            _refuse_finish(trial, trial_id)
            check(trial)
            self._trials[trial_id] = Trial(trial_id, *_frozen_row((state, trial.lam, features,
                                                                    value)))

    def reserve(self, propose):
        with self._lock:
            lams = np.asarray(propose(list(self._trials)), dtype=np.float64)
            ids = self.add([("pending", lam, None, None) for lam in lams])
            return [(i, self._trials[i].lam) for i in ids]


def _frozen_row(row: Row) -> tuple:
    state, lam, features, value = row
    if state not in STATES:
        raise ValueError(f"unknown trial state {state!r}")

    def frozen(a):
        if a is None:
            return None
        a = np.array(a, dtype=np.float64)
        a.setflags(write=False)
        return a

    return state, frozen(lam), frozen(features), None if value is None else float(value)


_SCHEMA = """
CREATE TABLE lossopt_schema (version INTEGER NOT NULL);
CREATE TABLE study (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    k INTEGER NOT NULL,
    names TEXT NOT NULL,          -- JSON list of str
    bound TEXT NOT NULL,          -- JSON: lower, upper (null = unbounded), sum_mask, total
    seed INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE trials (
    id INTEGER PRIMARY KEY,       -- 0, 1, 2, ... allocated inside the writing transaction
    state TEXT NOT NULL CHECK (state IN ('pending', 'complete', 'failed')),
    lam BLOB,                     -- k little-endian float64, or NULL when unknown
    features BLOB,                -- k little-endian float64, or NULL
    value REAL,                   -- validation loss, or NULL
    created REAL NOT NULL,
    finished REAL
);
"""


class SQLiteStorage(Storage):
    """A study in one SQLite file, shared safely by several processes (see the module docstring).

    ``create=False`` refuses a path where no file exists (instead of creating an empty study).
    ``timeout`` is how long (seconds) a write waits for another process's write to finish.
    """

    def __init__(self, path: "os.PathLike[str] | str", *, create: bool = True,
                 timeout: float = 120.0) -> None:
        self.path = os.fspath(path)
        self.timeout = float(timeout)
        if os.path.isdir(self.path):
            raise ValueError(f"storage {self.path!r} is a directory; give a file name such as "
                             "study.db")
        if not create and not os.path.exists(self.path):
            raise ValueError(f"no study storage at {self.path!r} (create one first, e.g. "
                             "`lossopt study create PATH --names ...`)")
        self._conn: Optional[sqlite3.Connection] = None
        self._pid = -1
        self._k: Optional[int] = None
        self._open_schema()

    def __repr__(self) -> str:
        return f"SQLiteStorage({self.path!r})"

    # -- connection and transactions
    def _connection(self) -> sqlite3.Connection:
        """One connection per process (a connection inherited through fork is not reused)."""
        if self._conn is None or self._pid != os.getpid():
            try:
                conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                       check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
            except sqlite3.DatabaseError as e:
                raise ValueError(self._describe(e)) from None
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _describe(self, e: Exception) -> str:
        if "not a database" in str(e):
            return f"storage {self.path!r} is not an SQLite database (a lossopt study file)"
        return f"storage {self.path!r}: {e}"

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One BEGIN IMMEDIATE transaction: committed on success, rolled back on any error."""
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as e:
            raise ValueError(self._describe(e)) from None
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def _open_schema(self) -> None:
        with self._write() as c:
            tables = {r[0] for r in c.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "lossopt_schema" not in tables:
                if tables:
                    raise ValueError(f"storage {self.path!r} is an SQLite database but not a "
                                     f"lossopt study (it has the tables {sorted(tables)})")
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    c.execute(statement)
                c.execute("INSERT INTO lossopt_schema (version) VALUES (?)", (SCHEMA_VERSION,))
                return
            versions = [r[0] for r in c.execute("SELECT version FROM lossopt_schema")]
            if versions != [SCHEMA_VERSION]:
                found = versions[0] if len(versions) == 1 else versions
                raise ValueError(f"storage {self.path!r} has schema version {found}, but this "
                                 f"lossopt reads schema version {SCHEMA_VERSION}; open it with "
                                 "the lossopt version that wrote it (nothing was changed)")

    # -- metadata
    def load_meta(self) -> Optional[StudyMeta]:
        row = self._connection().execute(
            "SELECT k, names, bound, seed FROM study WHERE id = 1").fetchone()
        return None if row is None else self._meta_from_row(row)

    def _meta_from_row(self, row) -> StudyMeta:
        k, names, bound, seed = row
        try:
            names = tuple(json.loads(names))
            meta = StudyMeta(int(k), names, bound_from_json(json.loads(bound), int(k), names),
                             int(seed))
        except (ValueError, TypeError) as e:
            raise ValueError(f"storage {self.path!r}: corrupt study metadata: {e}") from None
        self._k = meta.k
        return meta

    def create(self, meta: StudyMeta) -> StudyMeta:
        with self._write() as c:
            row = c.execute("SELECT k, names, bound, seed FROM study WHERE id = 1").fetchone()
            if row is not None:
                return self._meta_from_row(row)
            c.execute("INSERT INTO study (id, k, names, bound, seed, created) "
                      "VALUES (1, ?, ?, ?, ?, ?)",
                      (meta.k, json.dumps(list(meta.names)), json.dumps(bound_to_json(meta.bound)),
                       meta.seed, time.time()))
        self._k = meta.k
        return meta

    # -- trials
    def _decode(self, blob: Optional[bytes], trial_id: int, column: str) -> Optional[np.ndarray]:
        if blob is None:
            return None
        if self._k is not None and len(blob) != 8 * self._k:
            raise ValueError(f"storage {self.path!r}: trial {trial_id}: corrupt {column} "
                             f"({len(blob)} bytes, expected {8 * self._k})")
        return np.frombuffer(blob, dtype="<f8").astype(np.float64)

    def _read(self, c: sqlite3.Connection) -> List[Trial]:
        if self._k is None:
            self.load_meta()
        out = []
        for trial_id, state, lam, features, value in c.execute(
                "SELECT id, state, lam, features, value FROM trials ORDER BY id"):
            lam, features = (self._decode(b, trial_id, col)
                             for b, col in ((lam, "lam"), (features, "features")))
            for a in (lam, features):
                if a is not None:
                    a.setflags(write=False)
            out.append(Trial(int(trial_id), state, lam, features,
                             None if value is None else float(value)))
        return out

    def trials(self) -> List[Trial]:
        conn = self._connection()
        try:
            conn.execute("BEGIN")  # one snapshot (WAL readers never block writers)
            try:
                return self._read(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            raise ValueError(self._describe(e)) from None

    @staticmethod
    def _blob(a: Optional[np.ndarray]) -> Optional[bytes]:
        return None if a is None else np.asarray(a, dtype="<f8").tobytes()

    def _insert(self, c: sqlite3.Connection, rows: Sequence[Row]) -> List[int]:
        start = c.execute("SELECT COALESCE(MAX(id) + 1, 0) FROM trials").fetchone()[0]
        now = time.time()
        ids = []
        for i, (state, lam, features, value) in enumerate(rows):
            if state not in STATES:
                raise ValueError(f"unknown trial state {state!r}")
            c.execute("INSERT INTO trials (id, state, lam, features, value, created, finished) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (start + i, state, self._blob(lam), self._blob(features),
                       None if value is None else float(value), now,
                       None if state == "pending" else now))
            ids.append(start + i)
        return ids

    def add(self, rows: Sequence[Row]) -> List[int]:
        with self._write() as c:
            return self._insert(c, rows)

    def finish(self, trial_id, state, features, value, check) -> None:
        with self._write() as c:
            row = c.execute("SELECT id, state, lam, features, value FROM trials WHERE id = ?",
                            (int(trial_id),)).fetchone()
            trial = None
            if row is not None:
                trial = Trial(row[0], row[1], self._decode(row[2], row[0], "lam"),
                              self._decode(row[3], row[0], "features"), row[4])
            _refuse_finish(trial, trial_id)
            check(trial)
            c.execute("UPDATE trials SET state = ?, features = ?, value = ?, finished = ? "
                      "WHERE id = ? AND state = 'pending'",
                      (state, self._blob(features), None if value is None else float(value),
                       time.time(), int(trial_id)))

    def reserve(self, propose):
        with self._write() as c:
            lams = np.asarray(propose(self._read(c)), dtype=np.float64)
            ids = self._insert(c, [("pending", lam, None, None) for lam in lams])
        out = []
        for i, lam in zip(ids, lams):
            lam = np.array(lam)
            lam.setflags(write=False)
            out.append((i, lam))
        return out

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None


def open_storage(storage: "None | str | os.PathLike[str] | Storage", *,
                 create: bool = True) -> Storage:
    """None → a new :class:`InMemoryStorage`; a path → :class:`SQLiteStorage`; a Storage →
    itself."""
    if storage is None:
        return InMemoryStorage()
    if isinstance(storage, Storage):
        return storage
    if isinstance(storage, (str, os.PathLike)):
        if str(storage).startswith("sqlite:///"):  # Optuna-style URL
            storage = str(storage)[len("sqlite:///"):]
        return SQLiteStorage(storage, create=create)
    raise TypeError(f"storage must be None, a file path or a Storage, got {storage!r}")
