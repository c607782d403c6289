"""Nonsmooth penalty terms with their proximal operators and the derivatives of those operators.

A loss λ·f(θ) may hold terms that are not differentiable — ‖θ‖₁, Σ_g ‖θ_g‖₂ — declared in
``LinearLoss(..., prox={component(s): term})``. The loss then splits as

    λ·f(θ) = λ_sm·f_sm(θ) + Σ_c λ_c h_c(θ)

and the inner problem is solved by proximal gradient (:class:`lossopt.proxgrad.FISTA`): θ is a
fixed point of θ = prox_{ηλ·h}(θ − η∇(λ_sm·f_sm)(θ)). lossopt never differentiates a term h_c
through autodiff; each term supplies its own value, proximal operator and derivatives:

* :func:`l1` — h(θ) = Σ_j |θ_j| over the parameters it acts on.
  prox_{t|·|}(z) = sign(z)·max(|z| − t, 0); its derivative is the 0/1 mask |z| > t.
* :func:`group_l2` — h(θ) = Σ_g ‖θ_g‖₂ over groups of those parameters (group lasso).
  prox(z_g) = max(0, 1 − t/‖z_g‖)·z_g; for ‖z_g‖ > t its derivative is
  (1 − t/‖z_g‖) I + t z_g z_gᵀ/‖z_g‖³, and 0 otherwise.

**Which parameters.** ``on`` names the leaves of the θ pytree a term acts on: ``None`` (all of θ),
``"w"`` (the leaf under key ``"w"``, and everything below it if it is a subtree, e.g.
``"layer1/w"``), or a list of such names. Parameters no term acts on (a bias) stay unpenalized.

**Which components of λ.** The key of the ``prox`` dict names the component(s) of λ that weight
the term: one name or index (one weight for the whole term: λ1‖w‖₁), or a tuple / range of them,
one per coordinate for :func:`l1` (weighted Lasso, λ_j|θ_j|) or one per group for
:func:`group_l2`. ``features`` must still return those components' values (reports and the
black-box path read them): use ``term.value(theta)`` (one component) or ``term.values(theta)``
(one per coordinate / group), which have a NaN-free derivative at zero, unlike
``jnp.linalg.norm``. Example: ``LinearLoss(features, names=["l1", "l2", "data"],
prox={"l1": lossopt.prox.l1})``.

**Implicit derivative.** At a solution θ* the terms define the active set A: coordinates with
θ_j ≠ 0 (L1), groups with θ_g ≠ 0 (group L2), and every unpenalized coordinate. Off A, θ* stays
at zero under small changes of λ (when the solution is strictly complementary); on A the
penalty is smooth, with gradient s_c(θ) (sign θ for L1, θ_g/‖θ_g‖ for a group) and, for groups,
curvature (λ_g/‖θ_g‖)(I − θ_gθ_gᵀ/‖θ_g‖²). :class:`Penalty` provides these as masks over the
flattened parameters, so shapes never depend on the data (jit, vmap).

**Kinks.** When a coordinate sits exactly at its threshold (θ_j = 0 and |∂_j f_sm| = λ_j, or
‖∇_g f_sm‖ = λ_g for a group), θ*(λ) has a kink: its one-sided derivatives differ. The mask
treats an exact zero as inactive, so lossopt returns the derivative of the piece on which the
coordinate stays at zero — one of the one-sided derivatives, finite, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import DictKey, GetAttrKey, SequenceKey, tree_flatten_with_path


# ----------------------------------------------------------------------------- helpers
def _key_name(key) -> str:
    if isinstance(key, DictKey):
        return str(key.key)
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, GetAttrKey):
        return key.name
    return str(getattr(key, "key", key))


def leaf_names(theta) -> list[str]:
    """One name per leaf of θ, in ``jax.tree.leaves`` order: the key path joined by ``/``."""
    return ["/".join(_key_name(k) for k in path) for path, _ in tree_flatten_with_path(theta)[0]]


def _select(on, names: list[str]) -> list[int]:
    """Indices of the leaves named by ``on`` (None: all)."""
    if on is None:
        return list(range(len(names)))
    wanted = [on] if isinstance(on, str) else list(on)
    out = []
    for w in wanted:
        if not isinstance(w, str):
            raise TypeError(f"on= names leaves of theta by str (e.g. 'w' or 'layer1/w'), got {w!r}")
        hit = [i for i, n in enumerate(names) if n == w or n.startswith(w + "/")]
        if not hit:
            raise ValueError(f"on={w!r} matches no leaf of theta; its leaves are {names}")
        out += [i for i in hit if i not in out]
    return sorted(out)


def _safe_norm(sq):
    """√sq with derivative 0 (not NaN) at sq = 0."""
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def soft_threshold(z, t):
    """prox of t|·| (elementwise): sign(z)·max(|z| − t, 0)."""
    return jnp.sign(z) * jnp.maximum(jnp.abs(z) - t, 0.0)


# ----------------------------------------------------------------------------- terms
class ProxTerm:
    """Base class of a nonsmooth term h(θ) (see the module docstring)."""

    on: Any = None

    def _selected(self, theta) -> jax.Array:
        """The parameters the term acts on, flattened and concatenated in leaf order."""
        leaves = jax.tree.leaves(theta)
        idx = _select(self.on, leaf_names(theta))
        return jnp.concatenate([jnp.ravel(leaves[i]) for i in idx])

    def values(self, theta) -> jax.Array:
        raise NotImplementedError

    def value(self, theta) -> jax.Array:
        """h(θ): the sum of :meth:`values` (use it as the feature of a one-component term)."""
        return jnp.sum(self.values(theta))


@dataclass(frozen=True)
class L1(ProxTerm):
    """h(θ) = Σ_j |θ_j| over the parameters named by ``on`` (None: all of θ)."""

    on: Any = None

    def values(self, theta) -> jax.Array:
        """|θ_j| for each coordinate acted on (one feature per coordinate: weighted Lasso)."""
        return jnp.abs(self._selected(theta))

    @staticmethod
    def prox(z, t):
        """argmin_x ½‖x − z‖² + Σ_j t_j|x_j| = sign(z)·max(|z| − t, 0)."""
        return soft_threshold(z, t)

    @staticmethod
    def prox_jvp(z, t, v):
        """The derivative of :meth:`prox` in z applied to v: the mask |z| > t (0 at the kink)."""
        return jnp.where(jnp.abs(z) > t, v, 0.0)

    def bind(self, layout: "Layout", comps: np.ndarray) -> "BoundL1":
        idx = layout.coords(self.on)
        if comps.size not in (1, idx.size):
            raise ValueError(f"{self!r} acts on {idx.size} coordinates, so it takes 1 component of "
                             f"lam or one per coordinate ({idx.size}); its key names {comps.size}")
        return BoundL1(idx, np.broadcast_to(comps, idx.shape).copy())


@dataclass(frozen=True)
class GroupL2(ProxTerm):
    """h(θ) = Σ_g ‖θ_g‖₂ (group lasso) over the parameters named by ``on``.

    Args:
      groups: one integer label per coordinate acted on (an array of the selected leaf's shape,
        or flat over the selection in leaf order); groups are ordered by sorted label.
      size: alternatively, consecutive groups of ``size`` coordinates of the flattened selection.
      on: the leaves acted on (None: all of θ).
    """

    groups: Any = field(default=None, compare=False)
    size: int | None = None
    on: Any = None

    def __post_init__(self):
        if (self.groups is None) == (self.size is None):
            raise ValueError("group_l2 takes exactly one of groups= (labels) or size= (group size)")
        if self.size is not None and (not isinstance(self.size, (int, np.integer)) or self.size < 1):
            raise ValueError(f"group_l2 size= must be a positive integer, got {self.size!r}")

    def labels(self, m: int) -> tuple[np.ndarray, int]:
        """Group index 0..G−1 of each of the m selected coordinates, and G."""
        if self.size is not None:
            if m % self.size:
                raise ValueError(f"group_l2(size={self.size}) acts on {m} coordinates, not a multiple")
            return np.repeat(np.arange(m // self.size), self.size), m // self.size
        lab = np.asarray(self.groups).reshape(-1)
        if lab.size != m or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"group_l2 groups= must hold one integer label per coordinate acted on "
                             f"({m}); got {lab.size} values of dtype {lab.dtype}")
        uniq, gid = np.unique(lab, return_inverse=True)
        return gid.reshape(-1), uniq.size

    def values(self, theta) -> jax.Array:
        """‖θ_g‖₂ for each group (derivative 0 at a zero group, never NaN)."""
        x = self._selected(theta)
        gid, G = self.labels(x.size)
        return _safe_norm(jax.ops.segment_sum(x * x, jnp.asarray(gid), G))

    @staticmethod
    def prox(z, t, gid, G):
        """argmin_x ½‖x − z‖² + Σ_g t_g‖x_g‖ = max(0, 1 − t_g/‖z_g‖)·z_g  (t per group)."""
        n = _safe_norm(jax.ops.segment_sum(z * z, gid, G))
        scale = jnp.where(n > t, 1.0 - t / jnp.where(n > 0, n, 1.0), 0.0)
        return z * scale[gid]

    @staticmethod
    def prox_jvp(z, t, gid, G, v):
        """Derivative of :meth:`prox` in z applied to v: (1 − t/‖z_g‖)v_g + t z_g(z_gᵀv_g)/‖z_g‖³
        on groups with ‖z_g‖ > t, 0 on the others (including the kink ‖z_g‖ = t)."""
        n = _safe_norm(jax.ops.segment_sum(z * z, gid, G))
        on = n > t
        safe = jnp.where(on, n, 1.0)
        zv = jax.ops.segment_sum(z * v, gid, G)
        out = (1.0 - t / safe)[gid] * v + (t * zv / safe**3)[gid] * z
        return jnp.where(on[gid], out, 0.0)

    def bind(self, layout: "Layout", comps: np.ndarray) -> "BoundGroupL2":
        idx = layout.coords(self.on)
        gid, G = self.labels(idx.size)
        if comps.size not in (1, G):
            raise ValueError(f"{self!r} has {G} groups, so it takes 1 component of lam or one per "
                             f"group ({G}); its key names {comps.size}")
        return BoundGroupL2(idx, gid, G, np.broadcast_to(comps, (G,)).copy())

    def __repr__(self) -> str:
        what = f"size={self.size}" if self.size is not None else "groups=..."
        return f"GroupL2({what}, on={self.on!r})"


def l1(on: Any = None) -> L1:
    """The L1 term Σ_j |θ_j| on the leaves ``on`` (None: all of θ). ``prox={"l1": l1}`` works too."""
    return L1(on)


def group_l2(groups: Any = None, *, size: int | None = None, on: Any = None) -> GroupL2:
    """The group-lasso term Σ_g ‖θ_g‖₂; see :class:`GroupL2`."""
    return GroupL2(groups, size, on)


def as_term(value: Any, key: Any) -> ProxTerm:
    """A term from a ``prox`` dict value: a term, or a factory called with no argument (``l1``)."""
    if not isinstance(value, ProxTerm) and callable(value):
        try:
            value = value()
        except TypeError:
            pass
    if not isinstance(value, ProxTerm):
        raise TypeError(f"prox[{key!r}] must be a lossopt.prox term (lossopt.prox.l1, "
                        f"lossopt.prox.group_l2(...)), got {value!r}")
    return value


def component_indices(key: Any, names: Sequence[str]) -> np.ndarray:
    """The λ indices a ``prox`` dict key names: one name/index, or a tuple/list/range of them."""
    many = isinstance(key, (tuple, list, range))
    out = []
    for item in (key if many else [key]):
        if isinstance(item, str):
            if item not in names:
                raise ValueError(f"prox key {item!r} is not a feature name; names are {list(names)}")
            out.append(list(names).index(item))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not -len(names) <= item < len(names):
                raise ValueError(f"prox key {item} is out of range for k={len(names)} features")
            out.append(int(item) % len(names))
        else:
            raise TypeError(f"prox keys name components by str or int (or a tuple of them), got {item!r}")
    if not out:
        raise ValueError(f"prox key {key!r} names no component")
    return np.asarray(out, dtype=np.int64)


# ----------------------------------------------------------------------------- bound forms
class Layout:
    """Where each leaf of θ sits in the flat vector ``jax.flatten_util.ravel_pytree(θ)[0]``."""

    def __init__(self, theta):
        leaves = jax.tree.leaves(theta)
        self.names = leaf_names(theta)
        sizes = [int(np.size(x)) for x in leaves]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.size = int(self.offsets[-1])

    def coords(self, on) -> np.ndarray:
        idx = _select(on, self.names)
        out = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])
        if out.size == 0:
            raise ValueError(f"on={on!r} selects no parameter (empty leaves)")
        return out


@dataclass(frozen=True)
class BoundL1:
    """L1 on flat coordinates ``idx``; coordinate i weighted by λ[comp[i]]."""

    idx: np.ndarray
    comp: np.ndarray

    def _t(self, lam):
        return lam[self.comp]

    def value(self, lam, x):
        return jnp.sum(self._t(lam) * jnp.abs(x[self.idx]))

    def prox(self, lam, z, eta):
        return z.at[self.idx].set(L1.prox(z[self.idx], eta * self._t(lam)))

    def prox_jvp(self, lam, z, eta, v):
        return v.at[self.idx].set(L1.prox_jvp(z[self.idx], eta * self._t(lam), v[self.idx]))

    def residual(self, lam, x, g):
        """Min-norm element of g + ∂(λ·h)(x) on the owned coordinates."""
        xs, gs, t = x[self.idx], g[self.idx], self._t(lam)
        r = jnp.where(xs != 0, gs + t * jnp.sign(xs), soft_threshold(gs, t))
        return g.at[self.idx].set(r)

    def mask(self, lam, x, m):
        return m.at[self.idx].set(jnp.where(x[self.idx] != 0, m[self.idx], 0.0))

    def orthant(self, x, y):
        """y with the owned coordinates whose sign differs from x's set to zero."""
        ys = y[self.idx]
        return y.at[self.idx].set(jnp.where(jnp.sign(ys) == jnp.sign(x[self.idx]), ys, 0.0))

    def curvature(self, lam, x, v, out):
        return out

    def lam_jvp(self, x, dlam, out):
        """out + Σ_c λ̇_c s_c(x), s = sign(x) on the owned coordinates (0 at x = 0)."""
        return out.at[self.idx].add(dlam[self.comp] * jnp.sign(x[self.idx]))

    def lam_vjp(self, x, u, out):
        """out + (s_c(x)·u)_c: the transpose of :meth:`lam_jvp`."""
        return out.at[self.comp].add(jnp.sign(x[self.idx]) * u[self.idx])


@dataclass(frozen=True)
class BoundGroupL2:
    """Group L2 on flat coordinates ``idx`` with group labels ``gid`` (0..G−1); group g weighted
    by λ[comp[g]]."""

    idx: np.ndarray
    gid: np.ndarray
    G: int
    comp: np.ndarray

    def _norms(self, xs):
        return _safe_norm(jax.ops.segment_sum(xs * xs, self.gid, self.G))

    def value(self, lam, x):
        return jnp.sum(lam[self.comp] * self._norms(x[self.idx]))

    def prox(self, lam, z, eta):
        return z.at[self.idx].set(GroupL2.prox(z[self.idx], eta * lam[self.comp], self.gid, self.G))

    def prox_jvp(self, lam, z, eta, v):
        out = GroupL2.prox_jvp(z[self.idx], eta * lam[self.comp], self.gid, self.G, v[self.idx])
        return v.at[self.idx].set(out)

    def residual(self, lam, x, g):
        xs, gs, t = x[self.idx], g[self.idx], lam[self.comp]
        n = self._norms(xs)
        gn = self._norms(gs)
        on = n > 0
        active = gs + (t / jnp.where(on, n, 1.0))[self.gid] * xs
        shrink = jnp.maximum(0.0, 1.0 - t / jnp.where(gn > 0, gn, 1.0))[self.gid] * gs
        return g.at[self.idx].set(jnp.where(on[self.gid], active, shrink))

    def orthant(self, x, y):
        return y

    def mask(self, lam, x, m):
        on = self._norms(x[self.idx]) > 0
        return m.at[self.idx].set(jnp.where(on[self.gid], m[self.idx], 0.0))

    def curvature(self, lam, x, v, out):
        """out + (λ_g/‖x_g‖)(v_g − x_g(x_gᵀv_g)/‖x_g‖²) on active groups (the Hessian of λ_g‖x_g‖)."""
        xs, vs = x[self.idx], v[self.idx]
        n = self._norms(xs)
        on = n > 0
        safe = jnp.where(on, n, 1.0)
        xv = jax.ops.segment_sum(xs * vs, self.gid, self.G)
        c = jnp.where(on, lam[self.comp] / safe, 0.0)
        return out.at[self.idx].add(c[self.gid] * (vs - (xv / safe**2)[self.gid] * xs))

    def _unit(self, x):
        xs = x[self.idx]
        n = self._norms(xs)
        return jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)[self.gid] * xs

    def lam_jvp(self, x, dlam, out):
        return out.at[self.idx].add(dlam[self.comp][self.gid] * self._unit(x))

    def lam_vjp(self, x, u, out):
        per_group = jax.ops.segment_sum(self._unit(x) * u[self.idx], self.gid, self.G)
        return out.at[self.comp].add(per_group)


class Penalty:
    """All prox terms of a loss bound to one θ layout and to the k components of λ.

    Works on the flat vector x = ravel_pytree(θ)[0]; every method takes λ (shape (k,)) so one
    binding serves every λ. ``smooth_mask`` is 1 on the components of λ that weight smooth
    features, 0 on those that weight prox terms.
    """

    def __init__(self, prox: Mapping[Any, ProxTerm], theta, k: int, names: Sequence[str]):
        self.layout = Layout(theta)
        self.k = k
        self.terms = []
        owner = np.full(self.layout.size, -1)
        used: dict[int, Any] = {}
        for key, term in prox.items():
            comps = component_indices(key, names)
            for c in comps:
                if int(c) in used:
                    raise ValueError(f"component {names[c]!r} weights two prox terms "
                                     f"({used[int(c)]!r} and {key!r})")
                used[int(c)] = key
            bound = term.bind(self.layout, comps)
            clash = owner[bound.idx] >= 0
            if clash.any():
                other = list(prox)[owner[bound.idx][clash][0]]
                raise ValueError(f"prox terms {other!r} and {key!r} act on the same parameters; "
                                 "each parameter may carry at most one nonsmooth term")
            owner[bound.idx] = len(self.terms)
            self.terms.append(bound)
        mask = np.ones(k)
        mask[list(used)] = 0.0
        self.smooth_mask = mask
        self.owned = owner >= 0  # flat coordinates that carry a nonsmooth term

    def value(self, lam, x):
        """Σ_c λ_c h_c(x)."""
        return sum(t.value(lam, x) for t in self.terms)

    def prox(self, lam, z, eta):
        """prox_{η λ·h}(z) (the terms act on disjoint coordinates, so their proxes compose)."""
        for t in self.terms:
            z = t.prox(lam, z, eta)
        return z

    def prox_jvp(self, lam, z, eta, v):
        """The derivative of :meth:`prox` in z, applied to v."""
        for t in self.terms:
            v = t.prox_jvp(lam, z, eta, v)
        return v

    def residual(self, lam, x, g):
        """The min-norm element of g + ∂(λ·h)(x), g the smooth gradient: zero exactly at a
        solution; ‖·‖ reduces to ‖g‖ without prox terms."""
        for t in self.terms:
            g = t.residual(lam, x, g)
        return g

    def orthant(self, x, y):
        """y with every L1 coordinate that changed sign from x set to zero (groups unchanged)."""
        for t in self.terms:
            y = t.orthant(x, y)
        return y

    def mask(self, lam, x):
        """1 on the active set (nonzero penalized coordinates / groups, unpenalized ones), else 0."""
        m = jnp.ones_like(x)
        for t in self.terms:
            m = t.mask(lam, x, m)
        return m

    def curvature(self, lam, x, v):
        """∇²(λ·h)(x) v on the active set (zero for L1, the group block for group L2)."""
        out = jnp.zeros_like(v)
        for t in self.terms:
            out = t.curvature(lam, x, v, out)
        return out

    def lam_jvp(self, x, dlam):
        """∂_λ ∇_x(λ·h)(x) · λ̇ on the active set: Σ_c λ̇_c s_c(x)."""
        out = jnp.zeros_like(x)
        for t in self.terms:
            out = t.lam_jvp(x, dlam, out)
        return out

    def lam_vjp(self, x, u):
        """(s_c(x)·u)_c, shape (k,), zero on smooth components (the transpose of lam_jvp)."""
        out = jnp.zeros(self.k, x.dtype)
        for t in self.terms:
            out = t.lam_vjp(x, u, out)
        return out
