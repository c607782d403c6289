"""Study: ask for the next λ to train with, tell what the trained model did.

    study = Study(names=["data", "l2"], constraint=nonnegative() & fixed({"data": 1.0}))
    s = study.ask()                       # s.id, s.lam (numpy), s.params {name: value}
    ... train θ = argmin λ·f elsewhere with λ = s.lam, measure f(θ) and V(θ) ...
    study.tell(features, val_loss, id=s.id)

The recommender (:mod:`lossopt.blackbox.recommend`) sees every complete observation
(f(θ_i), V(θ_i)); failed trials are kept in the record but never modelled, and the λ of every
trial told, failed or still pending is passed as ``avoid`` so it is not suggested again. The
random stream of each ask is derived from (seed, number of trials so far), so a study given the
same seed and the same sequence of observations — reopened from storage or rebuilt in another
process — suggests the same λ.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from lossopt.blackbox._checks import (MAX_K, as_value, as_vector, check_k, check_names,
                                      negative_lam, negative_lam_problem)
from lossopt.blackbox.files import (Observations, ObservationsError, read_observations,
                                    write_observations)
from lossopt.blackbox.storage import (Storage, StudyMeta, Trial, bound_to_json, open_storage)
from lossopt.constraints import BoundConstraint, Constraint, nonnegative

ConstraintLike = Union[None, Constraint, BoundConstraint]


@dataclasses.dataclass(frozen=True, eq=False)
class Suggestion:
    """A λ to train with. ``lam`` is a read-only float64 array in the order of ``names``;
    ``params`` the same by name; ``probabilities`` (only under a simplex constraint, else None)
    maps each component of the simplex to λ_i / total."""

    id: int
    lam: np.ndarray
    names: Tuple[str, ...]
    probabilities: Optional[Dict[str, float]] = None

    @property
    def params(self) -> Dict[str, float]:
        return {name: float(v) for name, v in zip(self.names, self.lam)}

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={v:.4g}" for n, v in list(self.params.items())[:10])
        return f"Suggestion(id={self.id}, {shown}{', ...' if len(self.names) > 10 else ''})"


def probabilities(lam: np.ndarray, bound: BoundConstraint) -> Optional[Dict[str, float]]:
    """{name: λ_i / total} over the simplex components S, or None without a sum constraint."""
    if bound.sum_mask is None:
        return None
    return {bound.names[i]: float(lam[i] / bound.total) for i in np.flatnonzero(bound.sum_mask)}


def next_lams(features: np.ndarray, values: np.ndarray, avoid: Optional[np.ndarray],
              bound: BoundConstraint, seed: int, n_seen: int, n: int) -> np.ndarray:
    """The next n λ from complete observations (features (m, k), values (m,)).

    ``n_seen`` (every trial so far, failed and pending included) and ``seed`` determine the random
    stream, so the same history gives the same suggestions in any process. Shared by
    :meth:`Study.ask` and the stateless ``lossopt recommend``.
    """
    from lossopt.blackbox.recommend import recommend

    rng = np.random.default_rng([int(seed), int(n_seen)])
    k = bound.k
    features = np.asarray(features, np.float64).reshape(-1, k)
    values = np.asarray(values, np.float64).reshape(-1)
    if avoid is not None:
        avoid = _on_scale(np.asarray(avoid, np.float64).reshape(-1, k), bound)
        if not len(avoid):
            avoid = None
    lams = np.asarray(recommend(features, values, bound, rng=rng, n=n, avoid=avoid), np.float64)
    if lams.shape != (n, k) or not np.isfinite(lams).all():
        raise RuntimeError(f"the recommender returned an array of shape {lams.shape} with "
                           f"non-finite entries or the wrong shape (expected ({n}, {k}))")
    return lams


def _on_scale(lams: np.ndarray, bound: BoundConstraint) -> np.ndarray:
    """Told λ as the recommender expects them: finite, >= 0 where the constraint requires it (rows
    that are not — only possible in storage written before told λ were checked — are dropped),
    and rescaled onto the constraint's scale when they are off only by a common positive factor
    from its fixed components (e.g. data = 2, l2 = 0.6 where data is fixed at 1 becomes data = 1,
    l2 = 0.3: the same trained model, since argmin_θ (cλ)·f = argmin_θ λ·f)."""
    keep = np.isfinite(lams).all(1) & ~((bound.lower >= 0) & (lams < 0)).any(1)
    lams = lams[keep].copy()
    pinned = bound.fixed_mask & (bound.lower > 0)
    if pinned.any() and len(lams):
        ratio = lams[:, pinned] / bound.lower[pinned]
        c = ratio[:, 0]
        same = (c > 0) & np.all(np.abs(ratio - c[:, None]) <= 1e-9 * c[:, None], axis=1) & (c != 1)
        lams[same] /= c[same, None]
    return lams


def check_told_lams(obs: Observations, bound: BoundConstraint) -> None:
    """Raises ObservationsError (row and lam_ column named) for the first row of a file whose λ
    is negative where ``bound`` requires λ >= 0."""
    for r in range(len(obs)):
        lam = obs.lams[r]
        if np.isnan(lam).any():
            continue
        i = negative_lam(lam, bound)
        if i is not None:
            raise ObservationsError(obs.path, int(obs.lines[r]), f"lam_{bound.names[i]}",
                                    negative_lam_problem(lam, i, bound))


class Study:
    """An ask/tell study of λ for a linear loss λ·f(θ) trained outside lossopt.

    Args:
      k: the number of features (1 <= k <= ``MAX_K`` = 1000; a larger k is a ValueError, since the
        recommender's linear programs grow with k). Inferred from ``names``, from a
        ``BoundConstraint``, or from the first observation told when not given.
      names: one name per component (default "0", "1", ...); they name the ``f_<name>`` and
        ``lam_<name>`` columns of observation files.
      constraint: the feasible set of λ, from :mod:`lossopt.constraints` (default
        ``nonnegative()``; a given constraint replaces the default, so write
        ``nonnegative() & box(...)`` to keep λ >= 0). Bound to (k, names) here.
      storage: None (in memory), a path to an SQLite file (created if missing, reopened with its
        names, constraint and seed if it exists; several processes may share it), or a Storage.
      seed: seed of the recommender's random choices (default 0; a reopened study keeps its own).

    Scale: argmin_θ (cλ)·f = argmin_θ λ·f for c > 0. When the feasible set is a cone (no fixed
    component, no finite upper bound, no sum constraint) every suggestion is normalized by the
    recommender (see :func:`lossopt.blackbox.recommend.normalize`); fix a component or use a
    simplex to choose the scale yourself.

    Duplicate observations (the same features told again, e.g. a retraining with another seed)
    are accepted and recorded: they are harmless to the recommender's linear programs.
    """

    def __init__(self, k: Optional[int] = None, names: Optional[Sequence[str]] = None,
                 constraint: ConstraintLike = None,
                 storage: Union[None, str, "os.PathLike[str]", Storage] = None,
                 seed: Optional[int] = None) -> None:
        if k is not None:
            k = check_k(k)
        if names is not None:
            names = check_names(names, k)
            k = len(names)
        if constraint is not None and not isinstance(constraint, (Constraint, BoundConstraint)):
            raise TypeError("constraint must be None or built from lossopt.constraints "
                            f"(nonnegative(), box(), fixed(), simplex(), combined with &), got "
                            f"{constraint!r}")
        if isinstance(constraint, BoundConstraint):
            check_k(constraint.k, "the constraint's k")
            if k is not None and constraint.k != k:
                raise ValueError(f"the constraint is bound to k = {constraint.k}, got k = {k}")
            if names is not None and tuple(names) != constraint.names:
                raise ValueError(f"the constraint is bound to names {list(constraint.names)}, "
                                 f"got {list(names)}")
            k, names = constraint.k, constraint.names
        if seed is not None:
            if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
                raise TypeError(f"seed must be an int, got {seed!r}")
            if not 0 <= seed < 2 ** 63:
                raise ValueError(f"seed must be in [0, 2**63), got {seed}")
            seed = int(seed)
        self._constraint = constraint
        self._seed_arg = seed
        self._names_arg = names
        self._storage = open_storage(storage)
        self._meta: Optional[StudyMeta] = None
        stored = self._storage.load_meta()
        if stored is not None:
            self._adopt(stored, k, names)
        elif k is not None:
            self._create(k)

    # -- metadata
    def _bind(self, k: int, names: Sequence[str]) -> BoundConstraint:
        constraint = nonnegative() if self._constraint is None else self._constraint
        if isinstance(constraint, BoundConstraint):
            return constraint
        return constraint.bind(k, names)

    def _create(self, k: int) -> None:
        names = self._names_arg if self._names_arg is not None else tuple(map(str, range(k)))
        meta = StudyMeta(k, tuple(names), self._bind(k, names),
                         0 if self._seed_arg is None else self._seed_arg)
        stored = self._storage.create(meta)
        self._adopt(stored, k, self._names_arg)

    def _adopt(self, stored: StudyMeta, k: Optional[int], names: Optional[Sequence[str]]) -> None:
        """Uses the stored study after checking that what was passed agrees with it."""
        where = f"the study in {self._storage!r}"
        if k is not None and k != stored.k:
            raise ValueError(f"{where} has k = {stored.k} (names {list(stored.names)[:20]}), "
                             f"got k = {k}")
        if names is not None and tuple(names) != stored.names:
            raise ValueError(f"{where} has names {list(stored.names)}, got {list(names)}")
        if self._seed_arg is not None and self._seed_arg != stored.seed:
            raise ValueError(f"{where} has seed {stored.seed}, got seed={self._seed_arg}; omit "
                             "seed= to reopen it")
        if self._constraint is not None:
            mine = self._bind(stored.k, stored.names)
            if bound_to_json(mine) != bound_to_json(stored.bound):
                raise ValueError(f"{where} has the constraint {stored.bound!r}, got {mine!r}; "
                                 "omit constraint= to reopen it")
        self._meta = stored

    def _require_meta(self, what: str) -> StudyMeta:
        if self._meta is None:
            stored = self._storage.load_meta()  # another process may have created it
            if stored is not None:
                self._adopt(stored, None, self._names_arg)
            else:
                raise ValueError(f"cannot {what}: k is unknown; pass k= or names= to Study, or "
                                 "tell a first observation")
        return self._meta

    @property
    def k(self) -> Optional[int]:
        return None if self._meta is None else self._meta.k

    @property
    def names(self) -> Optional[Tuple[str, ...]]:
        return None if self._meta is None else self._meta.names

    @property
    def constraint(self) -> Optional[BoundConstraint]:
        """The bound constraint (None until k is known)."""
        return None if self._meta is None else self._meta.bound

    @property
    def seed(self) -> int:
        if self._meta is not None:
            return self._meta.seed
        return 0 if self._seed_arg is None else self._seed_arg

    @property
    def storage(self) -> Storage:
        return self._storage

    # -- ask / tell
    def ask(self, n: Optional[int] = None) -> Union[Suggestion, List[Suggestion]]:
        """One suggestion, or (with n) a list of n distinct suggestions for parallel workers.

        Each is recorded as a pending trial (atomically, even across processes sharing a storage
        file) and is not suggested again; tell its result with ``tell(..., id=s.id)``.
        """
        if n is not None:
            if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
                raise TypeError(f"n must be a positive int, got {n!r}")
            if n < 1:
                raise ValueError(f"n must be >= 1, got {n}")
        meta = self._require_meta("ask")
        count = 1 if n is None else int(n)

        def propose(trials: List[Trial]) -> np.ndarray:
            complete = [t for t in trials if t.state == "complete"]
            avoid = [t.lam for t in trials if t.lam is not None]
            return next_lams(np.array([t.features for t in complete]).reshape(-1, meta.k),
                             np.array([t.value for t in complete], np.float64),
                             np.array(avoid).reshape(-1, meta.k) if avoid else None,
                             meta.bound, meta.seed, len(trials), count)

        out = [self._suggestion(i, lam) for i, lam in self._storage.reserve(propose)]
        return out[0] if n is None else out

    def _suggestion(self, trial_id: int, lam: np.ndarray) -> Suggestion:
        lam = np.array(lam, np.float64)
        lam.setflags(write=False)
        return Suggestion(int(trial_id), lam, self._meta.names,
                          probabilities(lam, self._meta.bound))

    def tell(self, features: Any, value: Any = None, lam: Any = None, id: Optional[int] = None,
             failed: bool = False) -> int:
        """Records an observation and returns its trial id.

        Args:
          features: f(θ) of the trained model, length k, finite. May be None only when
            ``failed=True`` (a failed trial's features, if given, may hold NaN/inf).
          value: the validation loss V(θ), finite (for a failed trial: None or anything).
          lam: the λ trained with (optional; known anyway when ``id`` is given). It must be finite,
            and nonnegative wherever the study's constraint requires λ_i >= 0 (a ValueError
            naming the component otherwise). Otherwise an imported result may come from outside
            the constraint: a λ off only by scale from the fixed components (e.g. data = 2 where
            data is fixed at 1) is the same trained model as its rescaled λ and is accepted as
            told (the recommender sees it rescaled), and so is one outside a box.
          id: the id of a pending suggestion from :meth:`ask` (each is told exactly once).
          failed: the training failed or diverged: recorded, never used by the model.

        Raises TypeError/ValueError naming the offending component before anything is stored.
        """
        if not isinstance(failed, (bool, np.bool_)):
            raise TypeError(f"failed must be True or False, got {failed!r}")
        failed = bool(failed)
        if features is None and not failed:
            raise TypeError("features is None: only a failed trial (failed=True) may be told "
                            "without features")
        if id is not None and (isinstance(id, (bool, np.bool_))
                               or not isinstance(id, (int, np.integer))):
            raise TypeError(f"id must be an int (a Suggestion's .id), got {id!r}")
        if not failed:
            value = as_value(value, "value (the validation loss)")
        elif value is not None:
            value = _failed_value(value)
        meta = self._meta
        if meta is None and self._storage.load_meta() is not None:
            meta = self._require_meta("tell")
        if meta is None:  # k is inferred from the first features told
            if features is None:
                raise ValueError("cannot tell a failed trial without features before k is known; "
                                 "pass k= or names= to Study")
            shape = np.shape(features)
            if len(shape) != 1:
                raise ValueError(f"features must be a 1-D vector, got shape {shape}")
            k = check_k(shape[0], "the length of features")
            names = self._names_arg if self._names_arg is not None else tuple(map(str, range(k)))
        else:
            k, names = meta.k, meta.names
        if features is not None:
            if failed:
                features = _failed_features(features, k, names)
            else:
                features = as_vector(features, k, "features", names)
        if lam is not None:
            lam = as_vector(lam, k, "lam", names)
            bound = meta.bound if meta is not None else self._bind(k, names)
            i = negative_lam(lam, bound)
            if i is not None:
                raise ValueError(f"lam: {negative_lam_problem(lam, i, bound)}; nothing was "
                                 "stored")
        if meta is None:
            self._create(k)
        state = "failed" if failed else "complete"
        if id is None:
            return self._storage.add([(state, lam, features, value)])[0]

        def check(trial: Trial) -> None:
            if lam is not None and trial.lam is not None and not np.allclose(
                    lam, trial.lam, rtol=1e-9, atol=1e-12):
                i = int(np.argmax(np.abs(lam - trial.lam)))
                raise ValueError(f"lam differs from the λ of suggestion {id} at {names[i]!r} "
                                 f"(index {i}): {lam[i]} vs {trial.lam[i]}; omit lam= when "
                                 "telling a suggestion")

        self._storage.finish(int(id), state, features, value, check)
        return int(id)

    def tell_file(self, path: "str | os.PathLike[str]") -> List[int]:
        """Tells every row of a CSV / JSON Lines observations file (see
        :mod:`lossopt.blackbox.files`) at once: all rows are checked first, then stored in one
        transaction, so a bad file stores nothing (a λ told in ``lam_`` columns is checked as in
        :meth:`tell`). Returns the new trial ids."""
        meta = self._meta or self._storage.load_meta()
        obs = read_observations(path, names=None if meta is None else meta.names)
        if self._meta is None:
            if meta is not None:
                self._adopt(meta, None, self._names_arg)
            else:
                if self._names_arg is not None and set(self._names_arg) != set(obs.names):
                    raise ValueError(f"{path}: feature columns {list(obs.names)} do not match "
                                     f"names {list(self._names_arg)}")
                names = self._names_arg if self._names_arg is not None else obs.names
                if tuple(names) != obs.names:
                    obs = read_observations(path, names=names)
                check_told_lams(obs, self._bind(obs.k, names))  # before the study is created
                self._names_arg = tuple(names)
                self._create(obs.k)
        check_told_lams(obs, self._meta.bound)
        rows = [("failed" if bad else "complete", lam, f, v) for f, v, lam, bad in obs.rows()]
        return self._storage.add(rows)

    # -- results
    @property
    def trials(self) -> List[Trial]:
        """Every trial, in id order: id, state ("pending", "complete", "failed"), lam,
        features, value."""
        return self._storage.trials()

    @property
    def best(self) -> Optional[Trial]:
        """The complete trial with the lowest value (the earliest on ties), or None."""
        complete = [t for t in self.trials if t.state == "complete"]
        return min(complete, key=lambda t: (t.value, t.id)) if complete else None

    def to_csv(self, path: "str | os.PathLike[str]") -> None:
        """Writes every trial as CSV: id, state, val_loss, f_<name>..., lam_<name>... (readable
        back with ``tell_file`` or ``lossopt recommend``)."""
        meta = self._require_meta("export")
        write_observations(path, meta.names, self.trials, format="csv")

    def to_dict(self) -> dict:
        """The study as plain JSON-ready data: k, names, seed, constraint, trials, best id."""
        meta = self._require_meta("export")
        vec = lambda a: None if a is None else [float(x) if math.isfinite(x) else None for x in a]
        trials = self.trials
        best = self.best
        return {"k": meta.k, "names": list(meta.names), "seed": meta.seed,
                "constraint": bound_to_json(meta.bound),
                "trials": [{"id": t.id, "state": t.state, "value": t.value, "lam": vec(t.lam),
                            "features": vec(t.features)} for t in trials],
                "best": None if best is None else best.id}

    def close(self) -> None:
        self._storage.close()

    def __enter__(self) -> "Study":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._meta is None:
            return f"Study(k unknown, storage={self._storage!r})"
        return (f"Study(k={self._meta.k}, constraint={self._meta.bound!r}, "
                f"seed={self._meta.seed}, storage={self._storage!r})")


def _failed_value(x: Any) -> Optional[float]:
    """A failed trial's value: a real number, kept when finite (None otherwise)."""
    if isinstance(x, (bool, np.bool_, str, bytes)) or np.ndim(x) != 0 or \
            np.asarray(x).dtype.kind not in "fiu":
        raise TypeError(f"value must be a real number or None, got {x!r}")
    x = float(x)
    return x if math.isfinite(x) else None


def _failed_features(features: Any, k: int, names: Sequence[str]) -> np.ndarray:
    """A failed trial's features: length k and numeric; NaN/inf allowed (kept as NaN)."""
    arr = np.asarray(features)
    if arr.ndim != 1 or arr.shape[0] != k:
        raise ValueError(f"features has shape {arr.shape}, expected ({k},)")
    if arr.dtype.kind not in "fiu":
        raise TypeError("features must hold numbers")
    arr = np.where(np.isfinite(arr), arr, np.nan).astype(np.float64)
    return arr


__all__ = ["MAX_K", "Study", "Suggestion", "Trial", "check_told_lams", "next_lams",
           "probabilities"]
