"""Feasible sets for the hyperparameter vector λ ∈ R^k.

A constraint is a *description* (``nonnegative() & fixed({"data": 1.0})``) that is not tied to a
size; ``bind(k, names)`` turns it into a :class:`BoundConstraint`. Every combination reduces to

    C = { λ ∈ R^k :  lo_i <= λ_i <= hi_i  (i = 1..k),   Σ_{i∈S} λ_i = total }

with lo_i = hi_i for fixed components, ±inf allowed, and at most one sum constraint.
:meth:`BoundConstraint.project` computes the exact Euclidean projection onto C.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Key = Union[str, int]
BoundSpec = Union[None, float, Sequence[Optional[float]], Mapping[Key, float]]


def _as_float(x: Any, what: str) -> float:
    """A real scalar as a Python float (TypeError for bools, strings, arrays, None)."""
    if isinstance(x, (bool, np.bool_, str, bytes)) or x is None or np.ndim(x) != 0:
        raise TypeError(f"{what} must be a real number, got {x!r}")
    if np.asarray(x).dtype.kind not in "fiu":
        raise TypeError(f"{what} must be a real number, got {x!r}")
    return float(x)


def _check_key(key: Any, what: str) -> Key:
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, (str, int, np.integer)):
        raise TypeError(f"{what}: components are named by a str or an int index, got {key!r}")
    return key if isinstance(key, str) else int(key)


def _as_mapping(values: Any, what: str) -> Mapping[Key, Any]:
    if not isinstance(values, Mapping):
        raise TypeError(f"{what} takes a dict {{name or index: value}}, got {values!r}")
    for key in values:
        _check_key(key, what)
    return types.MappingProxyType(dict(values))


def _as_spec(spec: Any, what: str) -> BoundSpec:
    """Normalizes a box bound: None, a scalar, a sequence (length checked at bind) or a dict."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return _as_mapping(spec, what)
    if np.ndim(spec) == 0 and not isinstance(spec, (str, bytes)):
        value = _as_float(spec, what)
        if math.isnan(value):
            raise ValueError(f"{what} is NaN")
        return value
    if isinstance(spec, (str, bytes)) or np.ndim(spec) != 1:
        raise TypeError(f"{what} must be None, a number, a 1-D sequence or a dict, got {spec!r}")
    return tuple(None if v is None else _as_float(v, what) for v in list(spec))


class Constraint:
    """A description of a feasible set for λ, bound to a size with :meth:`bind`."""

    def _parts(self) -> Tuple["Constraint", ...]:
        return (self,)

    def _apply(self, b: "_Builder") -> None:
        raise NotImplementedError

    def __and__(self, other: "Constraint") -> "Intersection":
        if not isinstance(other, Constraint):
            return NotImplemented
        return Intersection(self._parts() + other._parts())

    def bind(self, k: int, names: Optional[Sequence[str]] = None) -> "BoundConstraint":
        """Resolves names and indices for a vector of k components; raises on an empty set."""
        builder = _Builder(k, names)
        for part in self._parts():
            part._apply(builder)
        return builder.finish()


@dataclasses.dataclass(frozen=True)
class Intersection(Constraint):
    """``a & b``: λ must satisfy every part (nested intersections are flattened)."""

    parts: Tuple[Constraint, ...]

    def _parts(self) -> Tuple[Constraint, ...]:
        return self.parts

    def __repr__(self) -> str:
        return " & ".join(map(repr, self.parts))


@dataclasses.dataclass(frozen=True, repr=False)
class Box(Constraint):
    """lower_i <= λ_i <= upper_i; see :func:`box`."""

    lower: BoundSpec = None
    upper: BoundSpec = None

    def _apply(self, b: "_Builder") -> None:
        lo = b.resolve(self.lower, "lower bound", -np.inf, repr(self))
        hi = b.resolve(self.upper, "upper bound", np.inf, repr(self))
        b.tighten(lo, hi, repr(self))

    def __repr__(self) -> str:
        fmt = lambda s: repr(dict(s)) if isinstance(s, Mapping) else repr(s)
        return f"box(lower={fmt(self.lower)}, upper={fmt(self.upper)})"


@dataclasses.dataclass(frozen=True, repr=False)
class Nonnegative(Constraint):
    """λ_i >= 0 for every component."""

    def _apply(self, b: "_Builder") -> None:
        b.tighten(np.zeros(b.k), np.full(b.k, np.inf), "nonnegative()")

    def __repr__(self) -> str:
        return "nonnegative()"


@dataclasses.dataclass(frozen=True, repr=False)
class Fixed(Constraint):
    """λ_i = values[i] for the listed components."""

    values: Mapping[Key, float]

    def _apply(self, b: "_Builder") -> None:
        b.fix(self.values, repr(self))

    def __repr__(self) -> str:
        return f"fixed({dict(self.values)!r})"


@dataclasses.dataclass(frozen=True, repr=False)
class Simplex(Constraint):
    """λ_i >= 0 on S and Σ_{i∈S} λ_i = total (S = every component, or ``over``)."""

    total: float = 1.0
    over: Optional[Tuple[Key, ...]] = None

    def _apply(self, b: "_Builder") -> None:
        mask = b.subset(self.over, repr(self))
        b.tighten(np.where(mask, 0.0, -np.inf), np.full(b.k, np.inf), repr(self))
        b.set_sum(mask, self.total, repr(self))

    def __repr__(self) -> str:
        over = "" if self.over is None else f", over={list(self.over)!r}"
        return f"simplex(total={self.total!r}{over})"


def nonnegative() -> Constraint:
    """λ_i >= 0 for all i."""
    return Nonnegative()


def box(lower: BoundSpec = None, upper: BoundSpec = None) -> Constraint:
    """lower_i <= λ_i <= upper_i. Each bound is None (unbounded), a scalar (every component), a
    sequence of length k (None entries unbounded) or a dict {name or index: value}."""
    return Box(_as_spec(lower, "box: lower bound"), _as_spec(upper, "box: upper bound"))


def fixed(values: Mapping[Key, float]) -> Constraint:
    """λ_i = v for each {name or index: v} in ``values``."""
    values = _as_mapping(values, "fixed()")
    return Fixed(types.MappingProxyType({k: _as_float(v, f"fixed(): value of {k!r}")
                                         for k, v in values.items()}))


def simplex(total: float = 1.0, over: Optional[Sequence[Key]] = None) -> Constraint:
    """λ_i >= 0 for i ∈ S and Σ_{i∈S} λ_i = total, S = all components or the listed ``over``."""
    total = _as_float(total, "simplex(): total")
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"simplex(): total must be finite and > 0, got {total}")
    if over is not None:
        if isinstance(over, (str, bytes)) or np.ndim(over) != 1:
            raise TypeError(f"simplex(): over must be a sequence of names or indices, got {over!r}")
        over = tuple(_check_key(key, "simplex(): over") for key in over)
        if not over:
            raise ValueError("simplex(): over is empty")
    return Simplex(total, over)


class _Builder:
    """Accumulates lo, hi, fixed values and the sum constraint while binding (host side)."""

    def __init__(self, k: int, names: Optional[Sequence[str]]):
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k = int(k)
        self.names = _check_names(self.k, names)
        self.index_of = {name: i for i, name in enumerate(self.names)}
        self.lo, self.hi = np.full(self.k, -np.inf), np.full(self.k, np.inf)
        self.lo_src = np.full(self.k, "", dtype=object)
        self.hi_src = np.full(self.k, "", dtype=object)
        self.fixed_val = np.full(self.k, np.nan)
        self.fixed_src = np.full(self.k, "", dtype=object)
        self.sum: Optional[Tuple[np.ndarray, float, str]] = None

    def label(self, i: int) -> str:
        return f"component {self.names[i]!r} (index {i})"

    def index(self, key: Key, where: str) -> int:
        if isinstance(key, str):
            if key not in self.index_of:
                raise ValueError(f"{where}: unknown component name {key!r}; "
                                 f"valid names are {list(self.names)}")
            return self.index_of[key]
        if not 0 <= key < self.k:
            raise ValueError(f"{where}: component index {key} is out of range for k = {self.k} "
                             f"(names {list(self.names)})")
        return key

    def resolve(self, spec: BoundSpec, what: str, default: float, where: str) -> np.ndarray:
        out = np.full(self.k, default)
        if spec is None:
            return out
        if isinstance(spec, float):
            out[:] = spec
        elif isinstance(spec, Mapping):
            seen = set()
            for key, v in spec.items():
                i = self.index(key, where)
                if i in seen:
                    raise ValueError(f"{where}: {self.label(i)} is given twice")
                seen.add(i)
                out[i] = _as_float(v, f"{where}: {what} of {self.label(i)}")
        else:
            if len(spec) != self.k:
                raise ValueError(f"{where}: the {what} sequence has length {len(spec)}, "
                                 f"expected k = {self.k} (names {list(self.names)})")
            out[:] = [default if v is None else v for v in spec]
        for i in np.flatnonzero(np.isnan(out) | (out == -default))[:1]:
            raise ValueError(f"{where}: {self.label(i)}: {what} {out[i]} is not allowed")
        return out

    def tighten(self, lo: np.ndarray, hi: np.ndarray, src: str) -> None:
        up, down = lo > self.lo, hi < self.hi
        self.lo[up], self.lo_src[up] = lo[up], src
        self.hi[down], self.hi_src[down] = hi[down], src

    def fix(self, values: Mapping[Key, float], src: str) -> None:
        for key, v in values.items():
            i = self.index(key, src)
            if not math.isfinite(v):
                raise ValueError(f"{src}: {self.label(i)}: fixed value {v} must be finite")
            old = self.fixed_val[i]
            if not np.isnan(old) and old != v:
                raise ValueError(f"{self.label(i)}: conflicting fixed values {old} "
                                 f"(from {self.fixed_src[i]}) and {v} (from {src})")
            self.fixed_val[i], self.fixed_src[i] = v, src

    def subset(self, over: Optional[Sequence[Key]], where: str) -> np.ndarray:
        mask = np.zeros(self.k, bool) if over is not None else np.ones(self.k, bool)
        for key in over or ():
            i = self.index(key, where)
            if mask[i]:
                raise ValueError(f"{where}: {self.label(i)} is listed twice")
            mask[i] = True
        return mask

    def set_sum(self, mask: np.ndarray, total: float, src: str) -> None:
        if self.sum is not None:
            mask0, total0, src0 = self.sum
            if not (np.array_equal(mask0, mask) and total0 == total):
                raise ValueError(f"at most one sum constraint is supported, got {src0} over "
                                 f"{[self.names[i] for i in np.flatnonzero(mask0)]} and {src} "
                                 f"over {[self.names[i] for i in np.flatnonzero(mask)]}")
        self.sum = (mask, total, src)

    def finish(self) -> "BoundConstraint":
        lo, hi = self.lo, self.hi
        for i in np.flatnonzero(~np.isnan(self.fixed_val)):
            v, src = self.fixed_val[i], self.fixed_src[i]
            if v < lo[i]:
                raise ValueError(f"{self.label(i)}: fixed value {v} is below the lower bound "
                                 f"{lo[i]} (from {self.lo_src[i]})")
            if v > hi[i]:
                raise ValueError(f"{self.label(i)}: fixed value {v} is above the upper bound "
                                 f"{hi[i]} (from {self.hi_src[i]})")
            lo[i] = hi[i] = v
        for i in np.flatnonzero(lo > hi):
            raise ValueError(f"{self.label(i)}: empty bounds: lower bound {lo[i]} (from "
                             f"{self.lo_src[i]}) > upper bound {hi[i]} (from {self.hi_src[i]})")
        mask, total = (None, None) if self.sum is None else self.sum[:2]
        if mask is not None:
            src, idx = self.sum[2], np.flatnonzero(mask)
            slack = 8 * np.finfo(float).eps * max(abs(total), math.fsum(np.abs(lo[idx])))
            for side, bound, bad in (("lower", lo, math.fsum(lo[idx]) > total + slack),
                                     ("upper", hi, math.fsum(hi[idx]) < total - slack)):
                if bad:
                    rel = ">=" if side == "lower" else "<="
                    who = [f"{self.label(i)} {'=' if lo[i] == hi[i] else rel} {bound[i]}"
                           for i in idx if bound[i] != 0][:10]
                    raise ValueError(f"{src} is infeasible: the {side} bounds of its components "
                                     f"sum to {math.fsum(bound[idx])} "
                                     f"{'>' if side == 'lower' else '<'} total {total}: "
                                     + ", ".join(who))
        return BoundConstraint(self.k, self.names, lo, hi, mask, total)


def _check_names(k: int, names: Optional[Sequence[str]]) -> Tuple[str, ...]:
    if names is None:
        return tuple(str(i) for i in range(k))
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"names must be a sequence of str, got {names!r}")
    names = tuple(names)
    if len(names) != k:
        raise ValueError(f"names has length {len(names)} but k = {k}: {list(names)}")
    if len(set(names)) != k:
        raise ValueError(f"names must be unique, got {list(names)}")
    return names


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class BoundConstraint:
    """C = {λ ∈ R^k : lower <= λ <= upper, Σ_{i∈S} λ_i = total} for S = sum_mask (if any).

    Attributes: ``k``, ``names``, ``lower``/``upper`` (float64, ±inf allowed), ``sum_mask``
    (bool array or None), ``total`` (float or None) and the derived masks ``fixed_mask``
    (lower == upper), ``free_mask``, ``positive_mask`` (free, lower >= 0, upper = inf, not in S:
    where a multiplicative step λ_i·exp(s_i) makes sense). Build one with ``Constraint.bind``.
    """

    k: int
    names: Tuple[str, ...]
    lower: np.ndarray
    upper: np.ndarray
    sum_mask: Optional[np.ndarray] = None
    total: Optional[float] = None

    def __post_init__(self):
        lower, upper = (np.array(x, np.float64).reshape(self.k) for x in (self.lower, self.upper))
        mask = None if self.sum_mask is None else np.array(self.sum_mask, bool).reshape(self.k)
        if ((mask is None) != (self.total is None) or not np.all(lower <= upper)
                or (mask is not None and not mask.any())):
            raise ValueError("BoundConstraint: need lower <= upper, and a nonempty sum_mask "
                             "together with total")
        for name, value in (("lower", lower), ("upper", upper), ("sum_mask", mask)):
            if value is not None:
                value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "total", None if self.total is None else float(self.total))

    @property
    def fixed_mask(self) -> np.ndarray:
        return self.lower == self.upper

    @property
    def free_mask(self) -> np.ndarray:
        return ~self.fixed_mask

    @property
    def positive_mask(self) -> np.ndarray:
        in_sum = np.zeros(self.k, bool) if self.sum_mask is None else self.sum_mask
        return self.free_mask & (self.lower >= 0) & (self.upper == np.inf) & ~in_sum

    def project(self, lam: Any) -> jax.Array:
        """argmin_{x ∈ C} ||x − λ||² (exact up to rounding; jit-safe; keeps λ's float dtype).

        Off S: x_i = clip(λ_i, lo_i, hi_i). On S: x_i = clip(λ_i − τ, lo_i, hi_i) with τ the root
        of the nonincreasing piecewise-linear φ(τ) = Σ_{i∈S} clip(λ_i − τ, lo_i, hi_i) = total.
        """
        lam = jnp.asarray(lam)
        if not jnp.issubdtype(lam.dtype, jnp.floating):
            lam = lam.astype(jnp.result_type(float))
        if lam.shape != (self.k,):
            raise ValueError(f"expected λ of shape ({self.k},), got {lam.shape}")
        idx = None if self.sum_mask is None else np.flatnonzero(self.sum_mask)
        return _project(lam, self.lower.astype(lam.dtype), self.upper.astype(lam.dtype), idx,
                        None if self.total is None else np.asarray(self.total, lam.dtype))

    def is_feasible(self, lam: Any, rtol: Optional[float] = None) -> bool:
        """Bounds hold exactly (compared in λ's dtype); |Σ_S λ − total| <= rtol·max(total, Σ_S|λ|)
        with rtol = 4·|S|·eps by default."""
        try:
            self.check(lam, rtol)
        except ValueError:
            return False
        return True

    def check(self, lam: Any, rtol: Optional[float] = None) -> None:
        """Raises ValueError naming the first component of λ that violates the constraint."""
        lam = np.asarray(lam)
        if lam.shape != (self.k,):
            raise ValueError(f"expected λ of shape ({self.k},), got {lam.shape}")
        dtype = lam.dtype if lam.dtype.kind == "f" else np.dtype(np.float64)
        lam, lo, hi = lam.astype(dtype), self.lower.astype(dtype), self.upper.astype(dtype)
        bad = np.flatnonzero(~np.isfinite(lam) | (lam < lo) | (lam > hi))
        if bad.size:
            i = bad[0]
            what = ("is not finite" if not np.isfinite(lam[i]) else
                    f"differs from its fixed value {lo[i]}" if lo[i] == hi[i] else
                    f"is below the lower bound {lo[i]}" if lam[i] < lo[i] else
                    f"is above the upper bound {hi[i]}")
            raise ValueError(f"component {self.names[i]!r} (index {i}): value {lam[i]} {what}")
        if self.sum_mask is not None:
            vals = lam[self.sum_mask].astype(np.float64)
            if rtol is None:
                rtol = 4 * vals.size * float(np.finfo(dtype).eps)
            s = math.fsum(vals)
            if abs(s - self.total) > rtol * max(abs(self.total), math.fsum(np.abs(vals))):
                who = [self.names[i] for i in np.flatnonzero(self.sum_mask)]
                raise ValueError(f"the components {who} sum to {s}, expected {self.total}")

    def __repr__(self) -> str:
        def part(i: int) -> str:
            lo, hi = self.lower[i], self.upper[i]
            if lo == hi:
                return f"{self.names[i]}={lo:g}"
            return f"{self.names[i]}∈{'(' if lo == -np.inf else '['}{lo:g}, {hi:g}" + (
                ")" if hi == np.inf else "]")
        parts = [part(i) for i in range(min(self.k, 10))] + (["..."] if self.k > 10 else [])
        if self.sum_mask is not None:
            who = [self.names[i] for i in np.flatnonzero(self.sum_mask)]
            over = "all" if self.sum_mask.all() else "+".join(who[:10])
            parts.append(f"sum({over})={self.total:g}")
        return f"BoundConstraint(k={self.k}: {', '.join(parts)})"


def as_bound(constraint: Union[None, Constraint, BoundConstraint], k: int,
             names: Optional[Sequence[str]] = None) -> BoundConstraint:
    """None (no constraint), a Constraint (bound to k, names) or a BoundConstraint (k checked)."""
    if constraint is None:
        constraint = box()
    if isinstance(constraint, Constraint):
        return constraint.bind(k, names)
    if isinstance(constraint, BoundConstraint):
        if constraint.k != k:
            raise ValueError(f"the constraint is bound to k = {constraint.k}, got k = {k}")
        if names is not None and tuple(names) != constraint.names:
            raise ValueError(f"the constraint is bound to names {list(constraint.names)}, "
                             f"got {list(names)}")
        return constraint
    raise TypeError(f"expected None, a Constraint or a BoundConstraint, got {constraint!r}")


@jax.jit
def _project(lam: jax.Array, lo: jax.Array, hi: jax.Array, idx: Optional[jax.Array],
             total: Optional[jax.Array]) -> jax.Array:
    """Bounds and sum are arguments, so one compilation serves every constraint of one shape."""
    out = jnp.clip(lam, lo, hi)
    if idx is None:
        return out
    return out.at[idx].set(_project_capped_sum(lam[idx], lo[idx], hi[idx], total))


def _project_capped_sum(y: jax.Array, lo: jax.Array, hi: jax.Array,
                        total: jax.Array) -> jax.Array:
    """argmin ||x − y||² s.t. lo <= x <= hi, Σ x = total (Σ lo <= total <= Σ hi).

    x = clip(y − τ, lo, hi). φ(τ) = Σ clip(y − τ, lo, hi) is nonincreasing and linear between the
    sorted breakpoints t = {y − hi} ∪ {y − lo}. Binary search (evaluating φ exactly, O(m) per
    probe) finds t_j <= τ <= t_{j+1}; on that piece the sets at-hi / at-lo / free F are known and
    τ = (Σ_F y + Σ_hi hi + Σ_lo lo − total) / |F| exactly. Finally the rounding residual of the
    sum is spread over the free components. O(m log m) in all.
    """
    m, dtype = y.shape[0], y.dtype
    phi = lambda tau: jnp.sum(jnp.clip(y - tau, lo, hi))
    t = jnp.sort(jnp.concatenate([y - hi, y - lo]))

    def probe(_, bracket):  # invariant: φ(t[a]) >= total (a = 0 assumed), φ(t[b]) < total
        a, b = bracket
        mid = (a + b) // 2
        ok = phi(t[mid]) >= total
        return jnp.where(ok, mid, a), jnp.where(ok, b, mid)

    j, _ = jax.lax.fori_loop(0, int(math.ceil(math.log2(2 * m))) + 1, probe,
                             (jnp.int32(0), jnp.int32(2 * m)))
    t_lo = t[j]
    t_hi = jnp.where(j + 1 < 2 * m, t[jnp.minimum(j + 1, 2 * m - 1)], jnp.inf)
    at_hi = (y - hi >= t_hi) & jnp.isfinite(hi)
    at_lo = (y - lo <= t_lo) & jnp.isfinite(lo) & ~at_hi
    free = ~at_hi & ~at_lo
    n_free = jnp.sum(free)
    rest = jnp.sum(jnp.where(at_hi, hi, 0)) + jnp.sum(jnp.where(at_lo, lo, 0))
    tau = (jnp.sum(jnp.where(free, y, 0)) + rest - total) / jnp.maximum(n_free, 1).astype(dtype)
    x = jnp.where(at_hi, hi, jnp.where(at_lo, lo, jnp.clip(y - jnp.clip(tau, t_lo, t_hi), lo, hi)))
    for _ in range(2):  # spread the rounding residual of Σ x over the strictly interior components
        inner = (x > lo) & (x < hi)
        step = (total - jnp.sum(x)) / jnp.maximum(jnp.sum(inner), 1).astype(dtype)
        x = jnp.where(inner, jnp.clip(x + step, lo, hi), x)
    return x
