"""Linear solves for the adjoint system, with their residuals reported.

The implicit derivative needs ``(H + μI) u = b`` with H = ∇²_θ(λ·f)(θ*), applied only through
Hessian-vector products. A linear solver is an object with

    solver(matvec, b, x0=None) -> (x, LinearInfo)

where ``matvec`` applies H (without damping; the solver adds μ) to a pytree and ``b`` is a pytree
of the same structure. ``LinearInfo.residual = ‖(H + μI)x − b‖ / ‖b‖`` is recomputed from the
returned ``x`` with one extra product, so what is reported is the true residual, not the Krylov
recurrence's estimate. ``lossopt.argmin`` wraps the solver in ``jax.lax.custom_linear_solve`` so
that forward and reverse mode both go through it (H is symmetric, so the transpose solve is the
same solve).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from lossopt.diagnostics import LinearInfo
from lossopt.solvers import DEFAULT_TOL, default_tol

# Adjoint tolerances by dtype. In float32 a Hessian-vector product carries a rounding error of
# about eps·‖H‖‖x‖, so the true relative residual of (H + μI)x = b bottoms out near eps·cond(H):
# measured 1.0e-5 to 1.8e-5 on the digits main job, just above the inner solve's 1e-5. The adjoint
# default is therefore 1e-4 in float32 (reachable); float64 keeps the inner solve's 1e-10.
LINEAR_TOL = {**DEFAULT_TOL, "float32": 1e-4}


def _damped(matvec: Callable, damping: float) -> Callable:
    if not damping:
        return matvec
    return lambda v: otu.tree_add_scale(matvec(v), damping, v)


def relative_residual(matvec: Callable, x, b):
    """‖A x − b‖ / ‖b‖ (0 when b = 0 and A x = 0)."""
    r = otu.tree_norm(otu.tree_sub(matvec(x), b))
    bn = otu.tree_norm(b)
    return jnp.where(bn > 0, r / jnp.where(bn > 0, bn, 1), r)


@dataclass(frozen=True)
class CG:
    """Conjugate gradients for symmetric positive (semi-)definite systems (the default).

    Converged when ‖(H + μI)x − b‖ ≤ tol·‖b‖. On a consistent singular system (H singular along
    directions that change nothing, e.g. a common shift of unpenalized softmax biases) CG started
    in the range of H stays there and converges to the minimum-norm solution, which is the right
    adjoint: the null directions do not move any feature.

    Args:
      tol: relative residual tolerance; default by dtype (1e-10 float64, 1e-4 float32: see LINEAR_TOL).
      maxiter: maximum number of matrix-vector products.
      damping: μ ≥ 0 added to the diagonal (for indefinite or nearly singular curvature).
    """

    tol: float | None = None
    maxiter: int = 1000
    damping: float = 0.0

    def __call__(self, matvec: Callable, b: Any, x0: Any = None) -> tuple[Any, LinearInfo]:
        tol = default_tol(b, LINEAR_TOL) if self.tol is None else self.tol
        A = _damped(matvec, self.damping)
        x = otu.tree_zeros_like(b) if x0 is None else x0
        stop = (tol * otu.tree_norm(b)) ** 2

        def cg(x, k):
            """CG from x until the recurrence says ‖r‖ ≤ tol‖b‖ (or maxiter)."""
            r = otu.tree_sub(b, A(x))
            rs = otu.tree_vdot(r, r)

            def cond(c):
                _, _, _, rs, k = c
                return (rs > stop) & (k < self.maxiter) & jnp.isfinite(rs)

            def body(c):
                x, r, p, rs, k = c
                Ap = A(p)
                pAp = otu.tree_vdot(p, Ap)
                alpha = jnp.where(pAp != 0, rs / jnp.where(pAp != 0, pAp, 1), 0)
                x = otu.tree_add_scale(x, alpha, p)
                r = otu.tree_add_scale(r, -alpha, Ap)
                rs_new = otu.tree_vdot(r, r)
                p = otu.tree_add_scale(r, jnp.where(rs > 0, rs_new / jnp.where(rs > 0, rs, 1), 0), p)
                return x, r, p, rs_new, k + 1

            x, _, _, _, k = jax.lax.while_loop(cond, body, (x, r, r, rs, k + 1))
            return x, k

        # The recurrence residual drifts from the true one in low precision: when it claims
        # convergence but ‖b − Ax‖ does not, restart from x with the true residual (at most 3 times).
        def outer_cond(c):
            x, k, restarts, resid, _, _ = c
            retry = (resid > tol) & (k < self.maxiter) & (restarts < 4) & jnp.isfinite(resid)
            return (restarts == 0) | retry

        def outer_body(c):
            x, k, restarts, _, best_x, best = c
            x, k = cg(x, k)
            resid = relative_residual(A, x, b)
            better = resid < best  # keep the best iterate: in low precision CG can drift away
            best_x = jax.tree.map(lambda new, old: jnp.where(better, new, old), x, best_x)
            return x, k + 1, restarts + 1, resid, best_x, jnp.where(better, resid, best)

        inf = jnp.asarray(jnp.inf, otu.tree_norm(b).dtype)
        init = (x, jnp.asarray(0), jnp.asarray(0), inf, x, inf)
        _, steps, _, _, x, resid = jax.lax.while_loop(outer_cond, outer_body, init)
        converged = jnp.isfinite(resid) & (resid <= tol)
        return x, LinearInfo(converged, resid, steps, jnp.asarray(tol, resid.dtype))
