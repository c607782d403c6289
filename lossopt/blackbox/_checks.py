"""Input checks shared by the black-box path (Study, files, CLI): one message style everywhere.

Every check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad value)
naming what was wrong — the component, the row, the column — before anything is stored.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import numpy as np

MAX_K = 1000
"""The largest feature vector the black-box path accepts. The recommender solves linear programs
with k + 2 variables and one row per observation (twice); the issue this path was built for stops
at k = 1000, where one full LP over 1000 observations already takes tens of seconds. Group finer
features (e.g. per-example weights into per-bucket weights) or use the gradient path, whose cost
does not grow with k."""


def check_k(k: Any, what: str = "k") -> int:
    """A positive int <= MAX_K."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{what} must be a positive int, got {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"{what} must be >= 1, got {k}")
    if k > MAX_K:
        raise ValueError(f"{what} = {k} exceeds the black-box path's maximum of {MAX_K} features "
                         f"(lossopt.blackbox.MAX_K): its linear programs grow with k times the "
                         "number of observations; group the features into at most "
                         f"{MAX_K} components, or use the gradient path (lossopt.tune), whose "
                         "cost does not grow with k")
    return k


def check_names(names: Any, k: Optional[int] = None) -> Tuple[str, ...]:
    """Unique, nonempty str names without surrounding whitespace (they become file columns)."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) and not (
            isinstance(names, np.ndarray) and names.ndim == 1):
        raise TypeError(f"names must be a sequence of str, got {names!r}")
    names = tuple(names)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"names[{i}] must be a str, got {name!r}")
        if not name or name != name.strip():
            raise ValueError(f"names[{i}] = {name!r}: a name must be nonempty, without leading "
                             "or trailing whitespace")
    check_k(len(names), "the number of names")
    seen = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"names must be unique: {name!r} is names[{seen[name]}] and "
                             f"names[{i}]")
        seen[name] = i
    if k is not None and len(names) != k:
        raise ValueError(f"names has {len(names)} entries but k = {k}: {list(names)}")
    return names


def as_vector(x: Any, k: int, what: str, names: Optional[Sequence[str]] = None) -> np.ndarray:
    """A finite float64 vector of length k (a fresh, read-only copy).

    Raises TypeError for non-numeric entries and ValueError for a wrong shape or a NaN/inf entry,
    naming the first offending component.
    """
    if x is None:
        raise TypeError(f"{what} is missing (got None)")
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of {k} numbers, got the string {x!r}")
    if isinstance(x, dict):
        raise TypeError(f"{what} must be a sequence of {k} numbers in the order of the names, "
                        "got a dict")
    if isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            if isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{what}: {_label(i, names)} is {v!r}, not a number")
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged nesting and the like
        raise ValueError(f"{what} is not a vector of numbers: {e}") from None
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D vector of length k = {k}, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        items = list(x) if isinstance(x, (list, tuple)) else arr.tolist()
        for i, v in enumerate(items):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)):
                raise TypeError(f"{what}: {_label(i, names)} is {v!r}, not a number")
        arr = arr.astype(np.float64)
    if arr.dtype.kind == "b":
        raise TypeError(f"{what} must hold numbers, got booleans")
    if arr.shape[0] != k:
        raise ValueError(f"{what} has length {arr.shape[0]}, expected k = {k}"
                         + (f" (names {list(names)})" if names is not None and k <= 20 else ""))
    arr = np.array(arr, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{what}: {_label(i, names)} is {arr[i]}, not a finite number"
                         + (f" ({bad.size} non-finite entries in all)" if bad.size > 1 else ""))
    arr.setflags(write=False)
    return arr


def as_value(x: Any, what: str = "value") -> float:
    """A finite real scalar as a float."""
    if x is None:
        raise TypeError(f"{what} is missing (got None)")
    if isinstance(x, (bool, np.bool_, str, bytes)) or np.ndim(x) != 0:
        raise TypeError(f"{what} must be a real number, got {x!r}")
    if np.asarray(x).dtype.kind not in "fiu":
        raise TypeError(f"{what} must be a real number, got {x!r}")
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value}, not a finite number (tell a diverged training "
                         "with failed=True)")
    return value


def _label(i: int, names: Optional[Sequence[str]]) -> str:
    return f"component {names[i]!r} (index {i})" if names is not None else f"component {i}"


def negative_lam(lam: np.ndarray, bound: Any) -> Optional[int]:
    """The index of the first component of a told λ that is negative where ``bound`` (a
    BoundConstraint) requires λ_i >= 0 (its lower bound is >= 0), or None.

    Only the sign is checked: a told λ may be off by scale from the constraint (e.g. data = 2 where
    data is fixed at 1; argmin_θ (cλ)·f = argmin_θ λ·f) or come from outside its box — an imported
    result is still a valid observation — but a negative weight where λ >= 0 is required is not.
    """
    bad = np.flatnonzero((np.asarray(bound.lower) >= 0) & (np.asarray(lam) < 0))
    return int(bad[0]) if bad.size else None


def negative_lam_problem(lam: np.ndarray, i: int, bound: Any) -> str:
    """The message for :func:`negative_lam`'s component i (named, with its index)."""
    return (f"λ_{bound.names[i]} = {float(lam[i])} (component {bound.names[i]!r}, index {i}) is "
            f"negative, but the constraint requires λ_{bound.names[i]} >= 0 (λ is nonnegative)")
