"""Inner solvers: run θ ↦ L(θ) = λ·f(θ) to tolerance inside ``lax.while_loop``.

Every solver here defines its tolerance the same way. With g(θ) = ∇_θ L(θ) and θ₀ the warm start,

    residual(θ) = ‖g(θ)‖₂ / max(1, ‖g(θ₀)‖₂),        converged ⇔ residual ≤ tol.

That is a relative criterion when the starting gradient is large and an absolute one when it is
small, so warm-starting next to the solution (as ``tune`` does) does not ask for the impossible.
For a μ-strongly convex L it bounds the error ‖θ − θ*‖ ≤ residual · max(1, ‖g(θ₀)‖) / μ.

Default tolerances depend on the dtype of θ: 1e-10 in float64 (θ* to about 1e-8 relative on
well-conditioned problems) and 1e-5 in float32 (reachable with float32 gradients).

A solver is an object with ``run(fun, theta0) -> (theta, SolverInfo)``, where ``fun`` maps a pytree
θ to a scalar. Solvers are jit-safe and never differentiated through: ``lossopt.argmin``
differentiates the solution implicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from lossopt.diagnostics import SolverInfo

DEFAULT_TOL = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}


def default_tol(tree: Any, table: dict[str, float] = DEFAULT_TOL) -> float:
    """The tolerance for the lowest-precision floating dtype among the leaves of ``tree``."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    if not leaves:
        raise TypeError("theta has no floating-point leaves: there is nothing to optimize")
    eps = max(float(jnp.finfo(jnp.result_type(x)).eps) for x in leaves)
    name = {float(jnp.finfo(jnp.dtype(k)).eps): k for k in table}
    return table.get(name.get(eps, "float32"), table["float32"])


@dataclass(frozen=True)
class OptaxSolver:
    """Run an optax transformation on ``fun`` until ``residual ≤ tol`` or ``maxiter`` steps.

    The transformation receives ``value``, ``grad`` and ``value_fn`` as extra arguments, so
    line-search methods (``optax.lbfgs``) work as well as plain ones (``optax.adam(1e-2)``).
    """

    tx: optax.GradientTransformation
    tol: float | None = None
    maxiter: int = 1000

    def _value_and_grad(self, fun: Callable, params, state):
        return jax.value_and_grad(fun)(params)

    def run(self, fun: Callable[[Any], jax.Array], theta0) -> tuple[Any, SolverInfo]:
        theta, _, _, info = self._run(fun, theta0)
        return theta, info

    def _run(self, fun, theta0):
        """The solve; returns ``(theta, final optax state, final gradient, info)``."""
        tx = optax.with_extra_args_support(self.tx)
        tol = default_tol(theta0) if self.tol is None else self.tol
        dtype = jnp.result_type(*jax.tree.leaves(theta0))
        user_fun = fun
        fun = lambda params: jnp.asarray(user_fun(params)).astype(dtype)  # noqa: E731
        value0, grad0 = jax.value_and_grad(fun)(theta0)
        scale = jnp.maximum(1.0, otu.tree_norm(grad0))
        state0 = tx.init(theta0)

        def cond(carry):
            _, _, _, resid, step, moved = carry
            return (resid > tol) & (step < self.maxiter) & jnp.isfinite(resid) & moved

        def body(carry):
            params, state, grad, _, step, _ = carry
            value, grad = self._value_and_grad(fun, params, state)
            updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=fun)
            new = optax.apply_updates(params, updates)
            new_grad = self._grad_after(fun, new, state)
            moved = otu.tree_norm(updates) > 0
            return new, state, new_grad, otu.tree_norm(new_grad) / scale, step + 1, moved

        resid0 = otu.tree_norm(grad0) / scale
        resid0 = jnp.where(jnp.isfinite(value0), resid0, jnp.nan)
        carry = (theta0, state0, grad0, resid0, jnp.asarray(0), jnp.asarray(True))
        theta, state, grad, resid, steps, _ = jax.lax.while_loop(cond, body, carry)
        converged = jnp.isfinite(resid) & (resid <= tol)
        return theta, state, grad, SolverInfo(converged, resid, steps, jnp.asarray(tol, resid.dtype))

    def _grad_after(self, fun, params, state):
        return jax.grad(fun)(params)


@dataclass(frozen=True)
class LBFGS(OptaxSolver):
    """L-BFGS with optax's zoom line search (``optax.lbfgs``); the default inner solver.

    The line search already evaluates value and gradient at the accepted point, so one iteration
    costs one (or a few, when the line search backtracks) value-and-gradient evaluations.
    """

    tx: optax.GradientTransformation = field(default=None)  # built from memory_size
    tol: float | None = None
    maxiter: int = 1000
    memory_size: int = 10

    def __post_init__(self):
        if self.tx is None:
            object.__setattr__(self, "tx", optax.lbfgs(memory_size=self.memory_size))

    def _value_and_grad(self, fun, params, state):
        return optax.value_and_grad_from_state(fun)(params, state=state)

    def _grad_after(self, fun, params, state):
        return otu.tree_get(state, "grad")

    def run_with_memory(self, fun: Callable[[Any], jax.Array], theta0) -> tuple[Any, SolverInfo, "LBFGSMemory"]:
        """``run``, plus the final L-BFGS memory: an approximate inverse Hessian at the solution.

        optax's memory holds the pairs of all steps but the last; the last pair (θ_K − θ_{K−1},
        g_K − g_{K−1}) is added here, in the slot of the oldest pair.
        """
        theta, state, grad, info = self._run(fun, theta0)
        count = otu.tree_get(state, "count")
        m = self.memory_size
        s_last = otu.tree_sub(theta, otu.tree_get(state, "params"))
        y_last = otu.tree_sub(grad, otu.tree_get(state, "updates"))
        slot = (count - 1) % m
        put = lambda mem, new: jax.tree.map(  # noqa: E731
            lambda a, b: a.at[slot].set(jnp.where(count > 0, b, a[slot])), mem, new)
        s = put(otu.tree_get(state, "diff_params_memory"), s_last)
        y = put(otu.tree_get(state, "diff_updates_memory"), y_last)
        newest_first = (count - 1 - jnp.arange(m)) % m
        s, y = jax.tree.map(lambda a: a[newest_first], (s, y))
        return theta, info, LBFGSMemory.from_pairs(s, y)

    def __repr__(self) -> str:
        return f"LBFGS(tol={self.tol}, maxiter={self.maxiter}, memory_size={self.memory_size})"


def _row(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


class LBFGSMemory(NamedTuple):
    """The L-BFGS approximation M ≈ H⁻¹ from curvature pairs (s_i, y_i), newest first.

    With ρ_i = 1/(s_iᵀy_i) and γ = s_0ᵀy_0 / y_0ᵀy_0, M is the limited-memory BFGS update of γI
    (Nocedal & Wright, Numerical Optimization, Alg. 7.4); ``apply(v)`` = M v by the two-loop
    recursion, at the cost of 4m inner products — nothing next to one Hessian-vector product.
    Pairs with sᵀy ≤ eps·‖s‖‖y‖ (unused slots, or curvature lost to rounding) are skipped, so M is
    symmetric positive definite whatever the memory holds; an empty memory gives M = I. Used by
    :class:`lossopt.linear.CG` as the preconditioner of the adjoint solve.
    """

    s: Any  # pytree of θ's structure, each leaf stacked to (m, ...)
    y: Any
    rho: jax.Array  # (m,): 1/(sᵀy), 0 for skipped pairs
    gamma: jax.Array  # scalar

    @classmethod
    def from_pairs(cls, s, y) -> "LBFGSMemory":
        m = jax.tree.leaves(s)[0].shape[0]
        sy = jnp.stack([otu.tree_vdot(_row(s, i), _row(y, i)) for i in range(m)])
        nn = jnp.stack([otu.tree_norm(_row(s, i)) * otu.tree_norm(_row(y, i)) for i in range(m)])
        eps = jnp.finfo(sy.dtype).eps
        valid = (sy > eps * nn) & jnp.isfinite(sy)
        rho = jnp.where(valid, 1.0 / jnp.where(valid, sy, 1.0), 0.0)
        yy = otu.tree_vdot(_row(y, 0), _row(y, 0))
        gamma = jnp.where(valid[0], sy[0] / jnp.where(valid[0], yy, 1.0), 1.0)
        return cls(s, y, rho, gamma)

    def apply(self, v):
        """M v (two-loop recursion)."""

        def newest_to_oldest(q, pair):
            s, y, rho = pair
            a = rho * otu.tree_vdot(s, q)
            return otu.tree_add_scale(q, -a, y), a

        q, alphas = jax.lax.scan(newest_to_oldest, v, (self.s, self.y, self.rho))
        r = otu.tree_scale(self.gamma, q)

        def oldest_to_newest(r, pair):
            s, y, rho, a = pair
            return otu.tree_add_scale(r, a - rho * otu.tree_vdot(y, r), s), None

        r, _ = jax.lax.scan(oldest_to_newest, r, (self.s, self.y, self.rho, alphas), reverse=True)
        return r


@dataclass(frozen=True)
class Newton:
    """Newton's method with a dense Hessian and a backtracking line search, for small d.

    Each step forms H = ∇²L(θ) (d Hessian-vector products in one batch) and solves H p = −g by a
    Cholesky factorization; where H is not positive definite (a saddle, a non-convex region) the
    step uses |H| with its eigenvalues floored at √eps·max|w| instead (a modified Newton step,
    always a descent direction). The step length halves until the Armijo condition
    L(θ + tp) ≤ L(θ) + 10⁻⁴ t gᵀp holds. Near a strict minimum convergence is quadratic: a few
    steps where L-BFGS takes tens. Cost O(d²) memory and O(d³) per step: for d up to a few
    thousand. Same residual and tolerance as every solver here.

    Args:
      tol: tolerance on ‖g‖ / max(1, ‖g(θ₀)‖); default by dtype.
      maxiter: maximum Newton steps.
      max_backtracks: maximum halvings of the step per iteration; when they run out, the solve
        stops (reported as not converged).
    """

    tol: float | None = None
    maxiter: int = 100
    max_backtracks: int = 30

    def run(self, fun: Callable[[Any], jax.Array], theta0) -> tuple[Any, SolverInfo]:
        tol = default_tol(theta0) if self.tol is None else self.tol
        x0, unravel = ravel_pytree(theta0)
        f = lambda x: jnp.asarray(fun(unravel(x))).astype(x0.dtype)  # noqa: E731
        value_and_grad = jax.value_and_grad(f)
        value0, g0 = value_and_grad(x0)
        scale = jnp.maximum(1.0, jnp.linalg.norm(g0))

        def direction(x, g):
            H = jax.hessian(f)(x)
            H = 0.5 * (H + H.T)
            L = jnp.linalg.cholesky(H)
            p_chol = jax.scipy.linalg.cho_solve((L, True), -g)

            def modified(_):
                w, Q = jnp.linalg.eigh(H)
                w = jnp.maximum(jnp.abs(w), jnp.sqrt(jnp.finfo(w.dtype).eps) * jnp.max(jnp.abs(w)))
                return -(Q @ ((Q.T @ g) / jnp.where(w > 0, w, 1)))

            ok = jnp.all(jnp.isfinite(L)) & jnp.all(jnp.isfinite(p_chol))
            return jax.lax.cond(ok, lambda _: p_chol, modified, None)

        def cond(c):
            _, _, _, resid, step, moved = c
            return (resid > tol) & (step < self.maxiter) & jnp.isfinite(resid) & moved

        def body(c):
            x, value, g, _, step, _ = c
            p = direction(x, g)
            slope = jnp.vdot(g, p)

            def shrink(s):
                t, v, k = s
                return (0.5 * t, f(x + 0.5 * t * p), k + 1)

            def too_long(s):
                t, v, k = s
                bad = ~(v <= value + 1e-4 * t * slope)  # also true for NaN
                return bad & (k < self.max_backtracks)

            t, v, _ = jax.lax.while_loop(too_long, shrink, (jnp.ones_like(value), f(x + p), 0))
            accepted = (v <= value + 1e-4 * t * slope) & (slope < 0)
            x_new = jnp.where(accepted, x + t * p, x)
            value_new, g_new = value_and_grad(x_new)
            return x_new, value_new, g_new, jnp.linalg.norm(g_new) / scale, step + 1, accepted

        resid0 = jnp.where(jnp.isfinite(value0), jnp.linalg.norm(g0) / scale, jnp.nan)
        carry = (x0, value0, g0, resid0, jnp.asarray(0), jnp.asarray(True))
        x, _, _, resid, steps, _ = jax.lax.while_loop(cond, body, carry)
        converged = jnp.isfinite(resid) & (resid <= tol)
        return unravel(x), SolverInfo(converged, resid, steps, jnp.asarray(tol, resid.dtype))
