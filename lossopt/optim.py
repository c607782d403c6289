"""Projected optax transformations: keep the hyperparameter vector λ feasible.

``projected(tx, constraint)`` turns any optax transformation into one whose updates land on the
feasible set C (see :mod:`lossopt.constraints`):

    u  = tx.update(g, state, λ)             (the inner step)
    q  = Π_C(λ + u)                          (exact Euclidean projection)
    u' = q − λ, corrected for rounding so that optax.apply_updates(λ, u') = fl(λ + u') ∈ C

The bounds (box, nonnegativity, fixed values) hold exactly in floating point after
``optax.apply_updates`` whenever some update can reach them (always for one-sided bounds and
once λ is feasible; from an infeasible λ0 a fixed value v with |λ0| >> |v| can be unreachable:
the first step then lands within an ulp of λ0 and the next one exactly); the sum constraint
of a simplex holds to a few ulps.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from lossopt.constraints import BoundConstraint, Constraint, as_bound

ConstraintLike = Union[None, Constraint, BoundConstraint]


class ProjectedState(NamedTuple):
    """State of :func:`projected`: the state of the wrapped transformation."""

    inner: optax.OptState


@functools.partial(jax.jit, static_argnames="max_ulps")
def feasible_step(params: jax.Array, target: jax.Array, lower: jax.Array,
                  upper: jax.Array, max_ulps: int = 64) -> jax.Array:
    """An update u with lower <= fl(p + u) <= upper and fl(p + u) ≈ target.

    u = target − p, except where the rounded sum fl(p + u) (what ``optax.apply_updates``
    computes) falls outside [lower, upper]: there u moves one ulp at a time toward the set
    (fl(p + u) is nondecreasing in u), at most ``max_ulps`` times. fl(p + u) = target exactly
    when target/p ∈ [1/2, 2] (Sterbenz) or p = target; otherwise it can be unreachable (no
    float64 u gives fl(1 + u) = 0.1), and one-sided bounds then hold with fl(p + u) within two
    ulps of max(|p|, |target|) of the target.
    """
    def violated(u):
        r = params + u
        return (r < lower) | (r > upper)

    def nudge(carry):
        i, u = carry
        r = params + u
        u = jnp.where(r < lower, jnp.nextafter(u, jnp.inf),
                      jnp.where(r > upper, jnp.nextafter(u, -jnp.inf), u))
        return i + 1, u

    u = target - params
    _, u = jax.lax.while_loop(lambda c: (c[0] < max_ulps) & jnp.any(violated(c[1])), nudge,
                              (0, u))
    return u


def projected(tx: optax.GradientTransformation, constraint: ConstraintLike = None,
              names: Optional[Sequence[str]] = None) -> optax.GradientTransformationExtraArgs:
    """Wraps ``tx`` so that ``optax.apply_updates(λ, updates)`` stays in the feasible set.

    Args:
      tx: any optax transformation; extra keyword arguments of ``update`` (``value=``,
        ``grad=``, ``value_fn=``, ...) are passed through to it.
      constraint: a :class:`~lossopt.constraints.Constraint` description, a
        :class:`~lossopt.constraints.BoundConstraint`, or None (no constraint).
      names: names of the k components (default "0".."k-1"), used to resolve the constraint.

    The params must be a 1-D array λ of length k; the constraint is bound to (k, names) from
    ``params.shape`` (static under jit). λ0 need not be feasible: the first update projects it
    (to within an ulp of λ0 where no float update is exact; pass ``bound.project(λ0)`` to start
    exactly feasible).
    """
    inner_tx = optax.with_extra_args_support(tx)
    cache: dict = {}

    def bind(params: Any, where: str) -> BoundConstraint:
        shape = jnp.shape(params)
        if len(shape) != 1:
            raise ValueError(f"projected().{where}: params must be a 1-D array λ of length k, "
                             f"got shape {shape}")
        if shape[0] not in cache:
            cache[shape[0]] = as_bound(constraint, shape[0], names)
        return cache[shape[0]]

    def init_fn(params: Any) -> ProjectedState:
        bind(params, "init")
        return ProjectedState(inner_tx.init(params))

    def update_fn(updates: Any, state: ProjectedState, params: Any = None,
                  **extra_args: Any) -> tuple:
        if params is None:
            raise ValueError("projected().update needs params (the current λ) to project onto "
                             "the constraint: call tx.update(updates, state, params)")
        bound = bind(params, "update")
        u, inner = inner_tx.update(updates, state.inner, params, **extra_args)
        p = jnp.asarray(params)
        if not jnp.issubdtype(p.dtype, jnp.floating):
            raise TypeError(f"projected(): params must be floating point, got {p.dtype}")
        u = jnp.asarray(u, p.dtype)
        q = bound.project(p + u)
        lower, upper = jnp.asarray(bound.lower, p.dtype), jnp.asarray(bound.upper, p.dtype)
        return feasible_step(p, q, lower, upper), ProjectedState(inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
