"""Linear solves for the adjoint system, with their residuals reported.

The implicit derivative needs ``(H + μI) u = b`` with H = ∇²_θ(λ·f)(θ*), applied only through
Hessian-vector products. A linear solver is an object with

    solver(matvec, b, x0=None) -> (x, LinearInfo)

where ``matvec`` applies H (without damping; the solver adds μ) to a pytree and ``b`` is a pytree
of the same structure. ``LinearInfo.residual = ‖(H + μI)x − b‖ / ‖b‖`` is recomputed from the
returned ``x`` with one extra product, so what is reported is the true residual, not the Krylov
recurrence's estimate. ``lossopt.argmin`` wraps the solver in ``jax.lax.custom_linear_solve`` so
that forward and reverse mode both go through it (H is symmetric, so the transpose solve is the
same solve); :func:`custom_solve` does the same for any system, symmetric or not.

Each solver class says whether it needs a symmetric operator (``symmetric``). A solver with a
``precondition`` attribute that is true also accepts ``precond=`` (v ↦ Mv, M ≈ A⁻¹ SPD), which
``argmin`` fills with the inner L-BFGS solver's memory.

    CG        symmetric positive (semi-)definite; optional preconditioner      (iterative)
    MINRES    symmetric, indefinite allowed                                    (iterative)
    BiCGStab  general (non-symmetric)                                          (iterative)
    Eigh      symmetric, any: pseudo-inverse                                   (dense, small d)
    Cholesky  symmetric positive definite                                      (dense, small d)
    LU        general                                                          (dense, small d)
    Auto      the default: Eigh for d ≤ 32, else CG                            (lossopt/dense.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

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


def _restarted(krylov: Callable, A: Callable, b, x0, tol, maxiter: int) -> tuple[Any, LinearInfo]:
    """Run a Krylov method with its residual checked against the true one.

    ``krylov(x, r, k) -> (x, k)`` iterates from x (with r = b − Ax, k products spent) until its
    recurrence claims ‖r‖ ≤ tol‖b‖ or k = maxiter. Recurrences drift from the true residual in
    low precision, so when one claims convergence but ‖b − Ax‖ does not, the method restarts from
    x with the true residual (at most 3 restarts); the best iterate is kept. ``steps`` counts every
    product, the residual checks included; with ``x0`` None the first residual is b (no product).
    """
    bn = otu.tree_norm(b)
    rel = lambda r: jnp.where(bn > 0, otu.tree_norm(r) / jnp.where(bn > 0, bn, 1), otu.tree_norm(r))  # noqa: E731
    if x0 is None:
        x, r, k = otu.tree_zeros_like(b), b, jnp.asarray(0)
    else:
        x, r, k = x0, otu.tree_sub(b, A(x0)), jnp.asarray(1)
    resid = rel(r)

    def cond(c):
        _, _, k, restarts, resid, _, _ = c
        return (resid > tol) & (k < maxiter) & (restarts < 4) & jnp.isfinite(resid)

    def body(c):
        x, _, k, restarts, _, best_x, best = c
        x, k = krylov(x, c[1], k)
        r = otu.tree_sub(b, A(x))
        resid = rel(r)
        better = (resid < best) | ~jnp.isfinite(best)
        best_x = jax.tree.map(lambda new, old: jnp.where(better, new, old), x, best_x)
        return x, r, k + 1, restarts + 1, resid, best_x, jnp.where(better, resid, best)

    init = (x, r, k, jnp.asarray(0), resid, x, resid)
    _, _, steps, _, _, x, resid = jax.lax.while_loop(cond, body, init)
    converged = jnp.isfinite(resid) & (resid <= tol)
    return x, LinearInfo(converged, resid, steps, jnp.asarray(tol, resid.dtype))


def _safe_div(a, b):
    return jnp.where(b != 0, a / jnp.where(b != 0, b, 1), jnp.zeros_like(a))


@dataclass(frozen=True)
class CG:
    """Conjugate gradients for symmetric positive (semi-)definite systems, optionally preconditioned.

    Converged when ‖(H + μI)x − b‖ ≤ tol·‖b‖ — the residual of the unpreconditioned system,
    whatever the preconditioner. On a consistent singular system (H singular along directions
    that change nothing, e.g. a common shift of unpenalized softmax biases) CG started in the range
    of H stays there and converges to the minimum-norm solution, which is the right adjoint: the
    null directions do not move any feature. CG stops at negative curvature (pᵀAp ≤ 0, an
    indefinite H) and reports non-convergence: use :class:`MINRES` or ``damping`` there.

    Preconditioned CG (Golub & Van Loan, Alg. 11.5.1) with an SPD M ≈ A⁻¹: z = Mr replaces r in
    the search directions. ``lossopt.argmin`` passes the inner L-BFGS solver's own inverse-Hessian
    approximation at θ* (:class:`lossopt.solvers.LBFGSMemory`) when ``precondition`` is true.

    Args:
      tol: relative residual tolerance; default by dtype (1e-10 float64, 1e-4 float32: see LINEAR_TOL).
      maxiter: maximum number of matrix-vector products.
      damping: μ ≥ 0 added to the diagonal (for indefinite or nearly singular curvature).
      precondition: accept the preconditioner ``argmin`` offers (ignored when none is offered).
    """

    tol: float | None = None
    maxiter: int = 1000
    damping: float = 0.0
    precondition: bool = False
    symmetric: ClassVar[bool] = True

    def __call__(self, matvec: Callable, b: Any, x0: Any = None, precond: Callable | None = None
                 ) -> tuple[Any, LinearInfo]:
        tol = default_tol(b, LINEAR_TOL) if self.tol is None else self.tol
        A = _damped(matvec, self.damping)
        M = (lambda r: r) if precond is None else precond  # noqa: E731
        stop = (tol * otu.tree_norm(b)) ** 2

        def cg(x, r, k):
            z = M(r)
            rz = otu.tree_vdot(r, z)

            def cond(c):
                _, r, _, _, k, ok = c
                rr = otu.tree_vdot(r, r)
                return (rr > stop) & (k < self.maxiter) & jnp.isfinite(rr) & ok

            def body(c):
                x, r, p, rz, k, _ = c
                Ap = A(p)
                pAp = otu.tree_vdot(p, Ap)
                ok = pAp > 0  # else negative (or no) curvature: stop, the residual tells
                alpha = jnp.where(ok, _safe_div(rz, pAp), 0)
                x = otu.tree_add_scale(x, alpha, p)
                r = otu.tree_add_scale(r, -alpha, Ap)
                z = M(r)
                rz_new = otu.tree_vdot(r, z)
                p = otu.tree_add_scale(z, _safe_div(rz_new, rz), p)
                return x, r, p, rz_new, k + 1, ok

            x, _, _, _, k, _ = jax.lax.while_loop(cond, body, (x, r, z, rz, k, jnp.asarray(True)))
            return x, k

        return _restarted(cg, A, b, x0, tol, self.maxiter)


@dataclass(frozen=True)
class MINRES:
    """MINRES (Paige & Saunders, 1975) for symmetric systems, definite or not.

    Each step extends the Lanczos basis V_k of the Krylov space and returns the x in it that
    minimizes ‖b − (H + μI)x‖: the tridiagonal Lanczos matrix is reduced by Givens rotations, so
    the step costs one product and a few vector updates, and the residual norm is known at every
    step. Unlike CG it never divides by pᵀHp, so an indefinite H (a saddle point, a non-convex
    model stopped early) gives finite iterates; on a singular consistent system started at 0 it
    converges to the minimum-norm solution, and on an inconsistent one it stalls at the
    least-squares residual, which ``LinearInfo`` reports as not converged.

    Args:
      tol, maxiter, damping: as in :class:`CG`.
    """

    tol: float | None = None
    maxiter: int = 1000
    damping: float = 0.0
    symmetric: ClassVar[bool] = True

    def __call__(self, matvec: Callable, b: Any, x0: Any = None) -> tuple[Any, LinearInfo]:
        tol = default_tol(b, LINEAR_TOL) if self.tol is None else self.tol
        A = _damped(matvec, self.damping)
        stop = tol * otu.tree_norm(b)

        def minres(x, r, k):
            beta1 = otu.tree_norm(r)
            v = otu.tree_scale(_safe_div(1.0, beta1), r)
            zero = otu.tree_zeros_like(r)
            one, nil = jnp.ones_like(beta1), jnp.zeros_like(beta1)
            # carry: x, v_prev, v, β_k (the off-diagonal entry above this column), rotations
            # (c, s) of the two previous steps, directions w_{k-1}, w_{k-2}, ‖T_k‖ estimate,
            # φ̄ (the residual norm), k
            init = (x, zero, v, nil, one, nil, one, nil, zero, zero, nil, beta1, k)

            def cond(c):
                phibar, k = c[-2], c[-1]  # k < 0: the pass broke down after |k| products
                return (jnp.abs(phibar) > stop) & (k >= 0) & (k < self.maxiter) & jnp.isfinite(phibar)

            def body(c):
                x, v_prev, v, beta, c2, s2, c1, s1, w1, w2, tnorm, phibar, k = c
                p = otu.tree_add_scale(A(v), -beta, v_prev)  # Lanczos
                alpha = otu.tree_vdot(v, p)
                p = otu.tree_add_scale(p, -alpha, v)
                beta_next = otu.tree_norm(p)
                eps = s2 * beta  # rotation k-2 applied to this column of the tridiagonal matrix
                delta_bar = c2 * beta
                delta = c1 * delta_bar + s1 * alpha  # rotation k-1
                gamma_bar = -s1 * delta_bar + c1 * alpha
                gamma = jnp.hypot(gamma_bar, beta_next)  # rotation k zeroes β_{k+1}
                tnorm = jnp.maximum(tnorm, jnp.sqrt(beta**2 + alpha**2 + beta_next**2))
                # γ_k ≥ σ_min(H + μI) on the Krylov space: γ_k ≤ √eps‖T‖ means a (near-)null
                # direction was reached (an inconsistent singular system, or cond ≥ 1/√eps), where
                # the update would blow x up. The step is not taken and the pass ends.
                ok = gamma > jnp.sqrt(jnp.finfo(gamma.dtype).eps) * tnorm
                c, s = _safe_div(gamma_bar, gamma), _safe_div(beta_next, gamma)
                tau = jnp.where(ok, c * phibar, 0)
                w = otu.tree_scale(_safe_div(1.0, gamma),  # w_k = (v_k − δ w_{k−1} − ε w_{k−2}) / γ
                                   otu.tree_add_scale(otu.tree_add_scale(v, -delta, w1), -eps, w2))
                x = otu.tree_add_scale(x, tau, w)
                v_next = otu.tree_scale(_safe_div(1.0, beta_next), p)
                phibar = jnp.where(ok, -s * phibar, phibar)
                return x, v, v_next, beta_next, c1, s1, c, s, w, w1, tnorm, phibar, jnp.where(ok, k + 1, -k - 1)

            out = jax.lax.while_loop(cond, body, init)
            return out[0], jnp.abs(out[-1])

        return _restarted(minres, A, b, x0, tol, self.maxiter)


@dataclass(frozen=True)
class BiCGStab:
    """BiCGStab (van der Vorst, 1992) for general non-symmetric systems ``A x = b``.

    Two products per step; short recurrences, so its memory does not grow with the steps. For a
    non-symmetric operator (e.g. the Jacobian of a proximal fixed point) wrap it with
    :func:`custom_solve`, which solves the transposed system with the same method. Breakdowns
    (a vanishing ⟨r̂, v⟩ or ‖t‖) end a pass and restart from the true residual.

    Args:
      tol, maxiter, damping: as in :class:`CG` (``maxiter`` counts products).
    """

    tol: float | None = None
    maxiter: int = 1000
    damping: float = 0.0
    symmetric: ClassVar[bool] = False

    def __call__(self, matvec: Callable, b: Any, x0: Any = None) -> tuple[Any, LinearInfo]:
        tol = default_tol(b, LINEAR_TOL) if self.tol is None else self.tol
        A = _damped(matvec, self.damping)
        stop = (tol * otu.tree_norm(b)) ** 2

        def bicgstab(x, r, k):
            r_hat = r
            zero = otu.tree_zeros_like(r)
            one = jnp.ones_like(otu.tree_norm(r))

            def cond(c):
                _, r, _, _, _, _, _, k, ok = c
                rr = otu.tree_vdot(r, r)
                return (rr > stop) & (k < self.maxiter) & jnp.isfinite(rr) & ok

            def body(c):
                x, r, p, v, rho, alpha, omega, k, _ = c
                rho_new = otu.tree_vdot(r_hat, r)
                beta = _safe_div(rho_new, rho) * _safe_div(alpha, omega)
                p = otu.tree_add(r, otu.tree_scale(beta, otu.tree_add_scale(p, -omega, v)))
                v = A(p)
                rv = otu.tree_vdot(r_hat, v)
                alpha = _safe_div(rho_new, rv)
                s = otu.tree_add_scale(r, -alpha, v)
                t = A(s)
                tt = otu.tree_vdot(t, t)
                omega = _safe_div(otu.tree_vdot(t, s), tt)
                x = otu.tree_add_scale(otu.tree_add_scale(x, alpha, p), omega, s)
                r = otu.tree_add_scale(s, -omega, t)
                ok = (rv != 0) & (omega != 0) & (rho_new != 0)
                return x, r, p, v, rho_new, alpha, omega, k + 2, ok

            init = (x, r, zero, zero, one, one, one, k, jnp.asarray(True))
            out = jax.lax.while_loop(cond, body, init)
            return out[0], out[7]

        return _restarted(bicgstab, A, b, x0, tol, self.maxiter)


def custom_solve(solver, matvec: Callable, b: Any, *, symmetric: bool = False):
    """x = A⁻¹b by ``solver``, differentiable in ``matvec``'s closed-over values and in b.

    Wraps ``jax.lax.custom_linear_solve``: forward and reverse mode go through linear solves,
    never through the solver's iterations. A symmetric system declares ``symmetric=True`` (the
    transpose solve is the solve itself); otherwise the transposed system Aᵀy = c is solved by the
    same solver applied to the transposed operator, which needs a solver for general matrices
    (:class:`BiCGStab`, :class:`lossopt.linear.LU`).
    """
    if not symmetric and getattr(solver, "symmetric", False):
        raise ValueError(f"{type(solver).__name__} needs a symmetric operator; for a non-symmetric "
                         "one use lossopt.linear.BiCGStab or lossopt.linear.LU")
    solve = lambda mv, rhs: solver(mv, rhs)[0]  # noqa: E731
    if symmetric:
        return jax.lax.custom_linear_solve(matvec, b, solve, symmetric=True)
    return jax.lax.custom_linear_solve(matvec, b, solve, transpose_solve=solve)


# Dense solvers live in lossopt/dense.py; every linear solver is reachable as lossopt.linear.<Name>.
from lossopt.dense import LU, Auto, Cholesky, Eigh  # noqa: E402, F401
