"""hyperdescent: the default outer optimizer of ``tune`` — L-BFGS on log λ with accept/reject.

Each outer step costs a full inner solve, so the outer optimizer must make every evaluation count
and must not need a step size. ``hyperdescent`` works in coordinates

    z_i = log λ_i   for components that are free, positive and bounded only below by 0
    z_i = λ_i       for the others (fixed components never move),

so a weight can travel from 1 to 100 in a few steps and never crosses zero. Every call receives the
hypergradient and the validation loss ``value`` at the current λ (the trial point):

* if the trial improved on the best point so far it is accepted: the secant pair
  (s, y) = (Δz, Δ∇_z V) enters an L-BFGS memory (when sᵀy > 0) and the next trial is
  z + d with d the L-BFGS direction (the first one: −∇_z V scaled so max|d| = ``first_step``);
  while the new direction continues the last accepted step (cosine > 0.8), d is doubled from
  one step to the next, as a line search's expansion phase would;
* otherwise it is rejected, and the next trial lies on the segment from the best point towards it,
  at the minimizer of the quadratic through φ(0), φ'(0), φ(1), safeguarded to [0.1, 0.5].

Steps are capped by a trust radius on max|Δz|: it halves to the backtracked length after a
rejection, doubles after an accepted step that used all of it, and never exceeds ``max_step`` (a
factor e^max_step for a log component). The result is a monotone line-search quasi-Newton method (Nocedal & Wright, Alg. 7.5 with a
backtracking search) in which every trial point is one inner solve. Wrap it in
:func:`lossopt.projected` for feasibility; ``tune`` does.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lossopt.constraints import as_bound


class HyperdescentState(NamedTuple):
    log_mask: jax.Array  # components stepped in log space (fixed at init)
    best_z: jax.Array
    best_value: jax.Array
    best_grad: jax.Array
    s: jax.Array  # (memory, k), newest first
    y: jax.Array
    pairs: jax.Array  # number of valid pairs
    count: jax.Array
    expand: jax.Array  # step multiplier, doubled while accepted steps continue in one direction
    radius: jax.Array  # largest change of any z in the next step (a trust radius)


def _two_loop(g, s, y, pairs):
    """H·g for the L-BFGS inverse-Hessian approximation built from the valid (s, y) pairs."""
    m = s.shape[0]
    valid = jnp.arange(m) < pairs
    sy = jnp.sum(s * y, axis=1)
    rho = jnp.where(valid, 1.0 / jnp.where(valid, sy, 1.0), 0.0)
    q, alphas = g, []
    for i in range(m):
        a = rho[i] * jnp.vdot(s[i], q)
        q = q - a * y[i]
        alphas.append(a)
    gamma = jnp.where(pairs > 0, sy[0] / jnp.maximum(jnp.vdot(y[0], y[0]), jnp.finfo(g.dtype).tiny), 1.0)
    r = gamma * q
    for i in reversed(range(m)):
        b = rho[i] * jnp.vdot(y[i], r)
        r = r + s[i] * (alphas[i] - b)
    return r


def hyperdescent(constraint=None, names=None, memory_size: int = 10, first_step: float = 1.0,
                 max_step: float = 2.0) -> optax.GradientTransformationExtraArgs:
    """The default outer optimizer (see the module docstring). ``update`` needs ``value=``.

    Args:
      constraint: the constraint λ will be projected onto (only used to decide which components
        are fixed and which are stepped in log space; the projection itself is ``projected``'s).
      names: component names, when the constraint refers to names.
      memory_size: L-BFGS memory.
      first_step: largest change of any z in the first (gradient) step.
      max_step: largest change of any z in one step.
    """

    def masks(params):
        bound = as_bound(constraint, params.shape[0], names)
        return jnp.asarray(bound.free_mask), jnp.asarray(bound.positive_mask)

    def init_fn(params):
        params = jnp.asarray(params)
        k, dtype = params.shape[0], params.dtype
        free, positive = masks(params)
        log_mask = positive & (params > 0)
        zeros = jnp.zeros((memory_size, k), dtype)
        return HyperdescentState(log_mask, jnp.zeros(k, dtype), jnp.asarray(jnp.inf, dtype),
                                 jnp.zeros(k, dtype), zeros, zeros, jnp.asarray(0), jnp.asarray(0),
                                 jnp.asarray(1.0, dtype), jnp.asarray(max_step, dtype))

    def update_fn(grads, state, params=None, *, value=None, **extra):
        if params is None or value is None:
            raise ValueError("hyperdescent needs params and value= (the validation loss at params)")
        free, _ = masks(params)
        lm = state.log_mask
        z = jnp.where(lm, jnp.log(jnp.where(lm, params, 1.0)), params)
        g = jnp.where(free, jnp.where(lm, grads * params, grads), 0.0)
        value = jnp.asarray(value, params.dtype)
        finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(g))
        accept = finite & ((state.count == 0) | (value < state.best_value))

        # Record the secant pair (from accepted and rejected trials alike: both measure curvature);
        # if accepted, take an L-BFGS step from the new best point.
        s_new, y_new = z - state.best_z, g - state.best_grad
        sy = jnp.vdot(s_new, y_new)
        good = finite & (state.count > 0) & (sy > 1e-10 * jnp.linalg.norm(s_new) * jnp.linalg.norm(y_new))
        s = jnp.where(good, jnp.roll(state.s, 1, axis=0).at[0].set(s_new), state.s)
        y = jnp.where(good, jnp.roll(state.y, 1, axis=0).at[0].set(y_new), state.y)
        pairs = jnp.where(good, jnp.minimum(state.pairs + 1, memory_size), state.pairs)
        gmax = jnp.max(jnp.abs(g))
        steepest = -g * first_step / jnp.where(gmax > 0, gmax, 1.0)
        d = -_two_loop(g, s, y, pairs)
        d = jnp.where((pairs > 0) & (jnp.vdot(d, g) < 0) & jnp.all(jnp.isfinite(d)), d, steepest)
        # Accepted, and the new direction continues the last step: the steps are too short (a
        # secant model fitted where the curvature was higher), so lengthen the next one.
        cos = jnp.vdot(d, s_new) / jnp.maximum(jnp.linalg.norm(d) * jnp.linalg.norm(s_new), jnp.finfo(g.dtype).tiny)
        same_way = (state.count > 0) & (cos > 0.8)
        expand = jnp.where(accept & same_way, jnp.minimum(2.0 * state.expand, 16.0), 1.0)
        d = d * expand
        # Trust radius: shrinks to the backtracked length after a rejection, grows after an
        # accepted step that used all of it.
        last = jnp.max(jnp.abs(s_new))
        radius = jnp.where(accept, jnp.where(last >= 0.99 * state.radius, 2.0 * state.radius, state.radius),
                           0.5 * last)
        radius = jnp.clip(radius, 1e-6, max_step)
        dmax = jnp.max(jnp.abs(d))
        d = d * jnp.minimum(1.0, radius / jnp.where(dmax > 0, dmax, 1.0))
        z_accept = z + d

        # Rejected: back off towards the best point (safeguarded quadratic interpolation).
        step = z - state.best_z
        slope = jnp.vdot(state.best_grad, step)
        curv = jnp.where(finite, value, jnp.inf) - state.best_value - slope
        alpha = jnp.where(curv > 0, -slope / (2 * jnp.where(curv > 0, curv, 1.0)), 0.25)
        alpha = jnp.clip(jnp.where(jnp.isfinite(alpha), alpha, 0.25), 0.1, 0.5)
        z_reject = state.best_z + alpha * step

        z_next = jnp.where(accept, z_accept, z_reject)
        lam_next = jnp.where(free, jnp.where(lm, jnp.exp(z_next), z_next), params)
        new_state = HyperdescentState(
            lm,
            jnp.where(accept, z, state.best_z),
            jnp.where(accept, value, state.best_value),
            jnp.where(accept, g, state.best_grad),
            s, y, pairs, state.count + 1, expand.astype(params.dtype), radius.astype(params.dtype),
        )
        return lam_next - params, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
