"""SQLite storage: reopening, schema version, several processes at once, a SIGKILLed writer."""

import multiprocessing as mp
import os
import signal
import sqlite3

import numpy as np
import pytest

from lossopt.blackbox import SQLiteStorage, Study
from lossopt.blackbox.storage import SCHEMA_VERSION, InMemoryStorage, StudyMeta
from lossopt.constraints import box, fixed, nonnegative, simplex

# Children are forked: they inherit the imported modules (no second JAX import) and never touch
# JAX; each opens its own SQLite connection (the storage reconnects when the pid changes).
FORK = mp.get_context("fork")
pytestmark = pytest.mark.filterwarnings(
    "ignore:os.fork:RuntimeWarning", "ignore:This process .* is multi-threaded:DeprecationWarning")


def test_reopen_by_path_keeps_names_constraint_seed_and_trials(tmp_path):
    path = tmp_path / "s.db"
    constraint = nonnegative() & fixed({"data": 1.0}) & box(upper={"l2": 10.0})
    study = Study(names=["data", "l2", "aug"], constraint=constraint, storage=path, seed=7)
    study.tell([1.0, 2.0, 3.0], 0.5, lam=[1.0, 0.1, 0.2])
    study.tell(None, None, failed=True)
    study.close()

    again = Study(storage=path)
    assert again.k == 3 and again.names == ("data", "l2", "aug") and again.seed == 7
    assert again.constraint.lower.tolist() == [1.0, 0.0, 0.0]
    assert again.constraint.upper.tolist() == [1.0, 10.0, np.inf]
    assert again.constraint.sum_mask is None
    trials = again.trials
    assert [(t.id, t.state, t.value) for t in trials] == [(0, "complete", 0.5), (1, "failed", None)]
    assert trials[0].features.tolist() == [1.0, 2.0, 3.0]
    assert trials[0].lam.tolist() == [1.0, 0.1, 0.2]
    assert trials[1].features is None and trials[1].lam is None
    # Passing the same description again is fine; a different one is refused, naming both.
    Study(names=["data", "l2", "aug"], constraint=constraint, storage=path).close()
    with pytest.raises(ValueError, match="has the constraint"):
        Study(constraint=simplex(), storage=path)
    with pytest.raises(ValueError, match="has seed 7, got seed=1"):
        Study(storage=path, seed=1)
    with pytest.raises(ValueError, match="has names"):
        Study(names=["a", "b", "c"], storage=path)
    assert len(Study(storage=path).trials) == 2  # the refusals changed nothing


def test_simplex_constraint_round_trips(tmp_path):
    path = tmp_path / "s.db"
    Study(k=3, constraint=simplex(2.0, over=[0, 2]), storage=path).close()
    bound = Study(storage=path).constraint
    assert bound.sum_mask.tolist() == [True, False, True] and bound.total == 2.0
    assert bound.lower.tolist() == [0.0, -np.inf, 0.0]


def test_schema_version_mismatch_is_a_clear_error_that_changes_nothing(tmp_path):
    path = tmp_path / "s.db"
    Study(k=2, storage=path).tell([1.0, 2.0], 0.3)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE lossopt_schema SET version = 999")
    with pytest.raises(ValueError, match=rf"schema version 999.*reads schema version "
                                         rf"{SCHEMA_VERSION}"):
        Study(storage=path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE lossopt_schema SET version = ?", (SCHEMA_VERSION,))
    assert [t.value for t in Study(storage=path).trials] == [0.3]


def test_not_a_study_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a database\n" * 100)
    with pytest.raises(ValueError, match="not an SQLite database"):
        Study(storage=text)
    assert text.read_text().startswith("hello")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(ValueError, match=r"not a lossopt study.*users"):
        Study(storage=other)
    with pytest.raises(ValueError, match="no study storage"):
        SQLiteStorage(tmp_path / "missing.db", create=False)
    with pytest.raises(ValueError, match="is a directory"):
        Study(storage=tmp_path)


def _teller(path, worker, count):
    study = Study(storage=path)
    for i in range(count):
        study.tell([float(worker), float(i)], worker + i / 1000, lam=[1.0, float(i)])
    study.close()


def test_four_processes_telling_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "s.db")
    Study(names=["worker", "i"], storage=path).close()
    procs = [FORK.Process(target=_teller, args=(path, w, 50)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    trials = Study(storage=path).trials
    assert len(trials) == 200
    assert [t.id for t in trials] == list(range(200))
    got = sorted((int(t.features[0]), int(t.features[1])) for t in trials)
    assert got == [(w, i) for w in range(4) for i in range(50)]
    for t in trials:  # each record intact: value and λ belong to its own features
        w, i = t.features
        assert t.value == w + i / 1000 and t.lam.tolist() == [1.0, i]


def _reserver(path, count, out):
    storage = SQLiteStorage(path)
    seen = []
    for _ in range(count):
        # λ = the number of trials visible inside the transaction: if two reservations ever saw
        # the same history, two pending trials would get the same λ.
        (tid, lam), = storage.reserve(lambda trials: np.array([[float(len(trials)), 1.0]]))
        seen.append((tid, lam[0]))
    out.put(seen)


def test_concurrent_reservations_are_atomic(tmp_path):
    path = str(tmp_path / "s.db")
    Study(k=2, storage=path).close()
    out = FORK.Queue()
    procs = [FORK.Process(target=_reserver, args=(path, 25, out)) for _ in range(4)]
    for p in procs:
        p.start()
    seen = [pair for _ in procs for pair in out.get(timeout=120)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(tid for tid, _ in seen) == list(range(100))
    assert all(lam == tid for tid, lam in seen)  # each saw exactly the trials before it
    assert [t.state for t in Study(storage=path).trials] == ["pending"] * 100


def _killed_teller(path, conn):
    study = Study(storage=path)
    for i in range(100000):
        tid = study.tell([float(i), 1.0], float(i))
        conn.send(tid)  # acknowledged: tell returned


def test_sigkill_mid_telling_loses_nothing_acknowledged(tmp_path):
    path = str(tmp_path / "s.db")
    Study(k=2, storage=path).close()
    parent, child = FORK.Pipe(duplex=False)
    proc = FORK.Process(target=_killed_teller, args=(path, child))
    proc.start()
    child.close()
    acked = []
    while len(acked) < 40:
        acked.append(parent.recv())
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    while parent.poll():  # acknowledgements already in the pipe
        try:
            acked.append(parent.recv())
        except EOFError:
            break
    trials = Study(storage=path).trials
    by_id = {t.id: t for t in trials}
    assert len(acked) >= 40
    for tid in acked:
        assert by_id[tid].state == "complete"
        assert by_id[tid].value == float(tid) and by_id[tid].features.tolist() == [tid, 1.0]
    # Nothing half-written: every stored record is complete and consistent.
    assert [t.id for t in trials] == list(range(len(trials)))
    assert all(t.state == "complete" and t.value == t.features[0] for t in trials)
    # The file still takes writes after the crash.
    assert Study(storage=path).tell([0.5, 0.5], 1.0) == len(trials)


def test_in_memory_storage_create_keeps_the_first_meta():
    from lossopt.constraints import BoundConstraint

    storage = InMemoryStorage()
    bound = nonnegative().bind(2, ["a", "b"])
    first = storage.create(StudyMeta(2, ("a", "b"), bound, 0))
    second = storage.create(StudyMeta(2, ("a", "b"), bound, 5))
    assert first is second and second.seed == 0
    assert isinstance(second.bound, BoundConstraint)
