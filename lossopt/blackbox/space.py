"""The space of λ: normalization, feasibility, the initial design and local steps, input checks.

Normalization: argmin_θ (cλ)·f(θ) = argmin_θ λ·f(θ) for c > 0, so when the feasible set is a cone
— no sum constraint, every lower bound 0 or −∞, every upper bound 0 or +∞ (components fixed at 0
allowed) — λ and its positive multiples are the same loss, and ``normalize`` returns the
representative with Σ_j |λ_j| = 1 (for nonnegative λ: Σ_j λ_j = 1). Otherwise the scale is pinned
by the constraint (a fixed nonzero component, a simplex total, box bounds) and λ is kept as is.
"""

from __future__ import annotations

import math

import numpy as np

from lossopt.constraints import BoundConstraint

DESIGN_DECADES = 3.0


def is_cone(bound: BoundConstraint) -> bool:
    lo, hi = bound.lower, bound.upper
    return bool(bound.sum_mask is None and np.all((lo == 0) | (lo == -np.inf))
                and np.all((hi == 0) | (hi == np.inf)) and not np.all(lo == hi))


def normalize(lam, bound: BoundConstraint) -> np.ndarray:
    """λ / Σ_j |λ_j| when the feasible set is a cone (see the module docstring), else λ as is.

    Works on one λ (shape (k,)) or on rows (shape (n, k)). Raises ValueError for λ = 0 in a cone.
    """
    _check_bound(bound)
    lam = np.array(lam, dtype=np.float64)
    if lam.shape[-1:] != (bound.k,) or lam.ndim > 2:
        raise ValueError(f"expected λ of shape ({bound.k},) or (n, {bound.k}), got {lam.shape}")
    if not is_cone(bound):
        return lam
    total = np.sum(np.abs(lam), axis=-1, keepdims=True)
    if np.any(total == 0) or not np.all(np.isfinite(total)):
        bad = np.flatnonzero((total == 0) | ~np.isfinite(total))[0]
        raise ValueError(f"cannot normalize λ{'' if lam.ndim == 1 else f' row {bad}'}: "
                         "it must be finite and nonzero")
    return lam / total


def log_range(a: float, b: float, ref: float) -> tuple:
    """The range of |λ_j| the design draws log-uniformly from, for bounds 0 <= a < b <= ∞."""
    D = DESIGN_DECADES
    top = b if np.isfinite(b) else max(a, ref) * 10 ** D
    bottom = a if a > 0 else (top * 10 ** (-2 * D) if np.isfinite(b) else ref * 10 ** (-D))
    return min(bottom, top), top


def design_center(bound: BoundConstraint) -> np.ndarray:
    """The centre of the initial design: fixed values, the geometric middle of each one-sign
    component's log range, 0 where the sign is free, the simplex total shared equally."""
    lo, hi = bound.lower, bound.upper
    ref = pin_scale(bound)
    c = np.zeros(bound.k)
    for j in np.flatnonzero(bound.free_mask & ((lo >= 0) | (hi <= 0))):
        sign, (a, b) = (1.0, (lo[j], hi[j])) if lo[j] >= 0 else (-1.0, (-hi[j], -lo[j]))
        bottom, top = log_range(a, b, ref)
        c[j] = sign * math.sqrt(bottom * top)
    c[bound.fixed_mask] = lo[bound.fixed_mask]
    if bound.sum_mask is not None:
        S = bound.sum_mask & bound.free_mask
        if S.any():
            c[S] = (bound.total - lo[bound.sum_mask & bound.fixed_mask].sum()) / S.sum()
    return _feasible(c, bound)


def pin_scale(bound: BoundConstraint) -> float:
    """A typical magnitude of λ implied by the constraint (1 when it is a cone)."""
    lo, hi = bound.lower, bound.upper
    vals = [np.abs(lo[bound.fixed_mask])]
    if bound.total is not None:
        vals.append(np.array([abs(bound.total) / bound.sum_mask.sum()]))
    vals = np.concatenate(vals)
    vals = vals[vals > 0]
    if vals.size:
        return float(np.exp(np.mean(np.log(vals))))
    fin = np.concatenate([np.abs(lo[np.isfinite(lo)]), np.abs(hi[np.isfinite(hi)])])
    fin = fin[fin > 0]
    return float(np.exp(np.mean(np.log(fin)))) if fin.size else 1.0


def design(bound: BoundConstraint, rng: np.random.Generator, n: int) -> np.ndarray:
    """n samples of the initial design (see the module docstring), feasible and normalized."""
    lo, hi, k = bound.lower, bound.upper, bound.k
    ref = pin_scale(bound)
    out = np.empty((n, k))
    for j in range(k):
        a, b = lo[j], hi[j]
        if a == b:
            out[:, j] = a
        elif a >= 0 or b <= 0:  # one sign: log-uniform in |λ_j|
            sign, (a_, b_) = (1.0, (a, b)) if a >= 0 else (-1.0, (-b, -a))
            bottom, top = log_range(a_, b_, ref)
            out[:, j] = sign * np.exp(rng.uniform(math.log(bottom), math.log(top), n))
        else:  # sign free
            out[:, j] = np.clip(ref * rng.standard_normal(n), a, b)
    if bound.sum_mask is not None:
        S = bound.sum_mask & bound.free_mask
        if bound.total > 0 and np.all(lo[S] >= 0):  # log-uniform weights rescaled to the total
            w = np.exp(rng.uniform(-DESIGN_DECADES * math.log(10.0), 0, (n, int(S.sum()))))
            rest = bound.total - lo[bound.sum_mask & bound.fixed_mask].sum()
            out[:, S] = rest * w / w.sum(1, keepdims=True)
        else:
            out[:, S] = bound.total / bound.sum_mask.sum() + ref * rng.standard_normal(
                (n, int(S.sum())))
    return normalize(np.stack([_feasible(x, bound) for x in out]), bound)


def perturb(lam, bound, rng, sigma) -> np.ndarray:
    """A multiplicative step where a component's sign is fixed by its bounds, additive elsewhere;
    components at 0 are revived at a tenth of the median magnitude with probability 1/2."""
    lo, hi = bound.lower, bound.upper
    z = rng.standard_normal(bound.k)
    x = lam.copy()
    one_sign = (lo >= 0) | (hi <= 0)
    mag = np.abs(lam[bound.free_mask & (lam != 0)])
    typical = float(np.median(mag)) if mag.size else pin_scale(bound)
    zero = one_sign & (lam == 0) & bound.free_mask
    revive = zero & (rng.random(bound.k) < 0.5)
    x[revive] = np.where(lo[revive] >= 0, 1.0, -1.0) * 0.1 * typical
    x[one_sign] = x[one_sign] * np.exp(sigma * z[one_sign])
    free_sign = ~one_sign
    x[free_sign] += sigma * np.maximum(np.abs(lam[free_sign]), typical) * z[free_sign]
    return normalize(_feasible(x, bound), bound)


def _feasible(lam, bound: BoundConstraint) -> np.ndarray:
    """Clip to the box (fixed components exact), then project the sum-constrained components
    onto {Σ_S λ = total, lo <= λ <= hi} (Euclidean; τ by bisection, residual spread)."""
    lo, hi = bound.lower, bound.upper
    x = np.clip(np.asarray(lam, np.float64), lo, hi)
    x[bound.fixed_mask] = lo[bound.fixed_mask]
    if bound.sum_mask is None:
        return x
    S = bound.sum_mask
    y, a, b, total = x[S], lo[S], hi[S], bound.total
    phi = lambda tau: np.sum(np.clip(y - tau, a, b))  # noqa: E731  nonincreasing in τ
    t_lo, t_hi, step = float(y.min()) - 1.0, float(y.max()) + 1.0, 1.0
    while phi(t_lo) < total and step < 1e300:
        step *= 2
        t_lo -= step
    step = 1.0
    while phi(t_hi) > total and step < 1e300:
        step *= 2
        t_hi += step
    for _ in range(200):
        mid = 0.5 * (t_lo + t_hi)
        if mid in (t_lo, t_hi):
            break
        if phi(mid) >= total:
            t_lo = mid
        else:
            t_hi = mid
    z = np.clip(y - t_lo, a, b)
    for _ in range(3):  # spread the rounding residual over the interior components
        inner = (z > a) & (z < b)
        if not inner.any():
            break
        z[inner] = np.clip(z[inner] + (total - math.fsum(z)) / inner.sum(), a[inner], b[inner])
    x[S] = z
    return x


def _check_bound(bound) -> None:
    if not isinstance(bound, BoundConstraint):
        raise TypeError("bound must be a lossopt.constraints.BoundConstraint (bind a Constraint "
                        f"with constraint.bind(k, names)), got {type(bound).__name__}")


def _as_matrix(x, what: str, k: int, names) -> np.ndarray:
    if isinstance(x, (list, tuple)):
        for i, row in enumerate(x):
            if not hasattr(row, "__len__") or len(row) != k:
                got = len(row) if hasattr(row, "__len__") else "a scalar"
                raise ValueError(f"{what} row {i} has length {got}, expected k = {k}")
    try:
        X = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be numeric: {e}") from None
    if X.size == 0:
        return X.reshape(0, k)
    if X.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (rows = models, columns = the k = {k} "
                         f"features), got shape {X.shape}")
    if X.shape[1] != k:
        raise ValueError(f"{what} has {X.shape[1]} columns but the constraint is bound to k = {k}"
                         f" (names {list(names)[:10]}{'...' if k > 10 else ''})")
    bad = np.argwhere(~np.isfinite(X))
    if bad.size:
        i, j = bad[0]
        raise ValueError(f"{what} row {i}, column {j} ({names[j]!r}): {X[i, j]} is not finite")
    return X


def _check_observations(features, values, bound):
    _check_bound(bound)
    F = _as_matrix(features, "features", bound.k, bound.names)
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"values must be numeric: {e}") from None
    v = v.reshape(-1) if v.size == 0 else v
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D (one validation loss per row), got shape {v.shape}")
    if v.shape[0] != F.shape[0]:
        raise ValueError(f"features has {F.shape[0]} rows but values has {v.shape[0]}")
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise ValueError(f"values row {bad[0]}: {v[bad[0]]} is not finite")
    return F, v


def _check_avoid(avoid, bound) -> list:
    if avoid is None:
        return []
    A = _as_matrix(avoid, "avoid", bound.k, bound.names)
    if not is_cone(bound):
        return list(A)
    s = np.abs(A).sum(1)
    return [a / t for a, t in zip(A, s) if t > 0]


