"""Dense linear solves for small systems, and the default adjoint solver :class:`Auto`.

For d parameters the matrix is materialized column by column, A e_j for j = 1..d, with one
batched (``vmap``) matrix-vector product, then factorized. That costs d products done at matrix-
matrix speed plus O(d³), so it pays only for small d; the answer is then exact to rounding, with no
iteration count to tune. As everywhere in :mod:`lossopt.linear`, the reported residual
‖(A + μI)x − b‖/‖b‖ is recomputed from x with the operator itself (one more product), not from
the factorization, and ``steps`` counts the d + 1 products.

* :class:`Eigh` — symmetric, definite or not, singular or not: x = A⁺b through the eigen-
  decomposition, eigenvalues with |w| ≤ rcond·max|w| treated as zero. On a consistent singular
  system this is the minimum-norm solution (the right adjoint when the null directions move no
  feature); on an inconsistent one, the least-squares solution, reported as not converged.
* :class:`Cholesky` — symmetric positive definite only (the fastest factorization); an indefinite
  or singular A yields non-finite values, reported as not converged.
* :class:`LU` — general square matrices (non-symmetric systems, e.g. prox fixed points).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jax.flatten_util import ravel_pytree

from lossopt.diagnostics import LinearInfo
from lossopt.linear import CG, LINEAR_TOL, _damped, relative_residual
from lossopt.solvers import default_tol


def num_params(tree: Any) -> int:
    """d: the total number of entries in a pytree."""
    return sum(int(jnp.size(x)) for x in jax.tree.leaves(tree))


def materialize(matvec: Callable, b: Any, damping: float = 0.0) -> jax.Array:
    """The d × d matrix of ``matvec`` (plus μI) in the flattening of ``b``'s pytree."""
    flat, unravel = ravel_pytree(b)
    cols = jax.vmap(lambda e: ravel_pytree(matvec(unravel(e)))[0])(jnp.eye(flat.size, dtype=flat.dtype))
    return cols.T + damping * jnp.eye(flat.size, dtype=flat.dtype)


@dataclass(frozen=True)
class _Dense:
    tol: float | None = None
    damping: float = 0.0

    def _solve(self, A: jax.Array, b: jax.Array) -> jax.Array:
        raise NotImplementedError

    def __call__(self, matvec: Callable, b: Any, x0: Any = None) -> tuple[Any, LinearInfo]:
        tol = default_tol(b, LINEAR_TOL) if self.tol is None else self.tol
        flat, unravel = ravel_pytree(b)
        x = unravel(self._solve(materialize(matvec, b, self.damping), flat))
        resid = relative_residual(_damped(matvec, self.damping), x, b)
        converged = jnp.isfinite(resid) & (resid <= tol)
        return x, LinearInfo(converged, resid, jnp.asarray(flat.size + 1), jnp.asarray(tol, resid.dtype))


@dataclass(frozen=True)
class Eigh(_Dense):
    """x = (A + μI)⁺ b for symmetric A, by ``eigh``: any symmetric matrix, singular or indefinite.

    Args:
      tol: relative residual the result is held to (default by dtype, as CG).
      damping: μ added to the diagonal.
      rcond: eigenvalues with |w| ≤ rcond·max|w| count as zero (default d·eps).
    """

    rcond: float | None = None
    symmetric: ClassVar[bool] = True

    def _solve(self, A, b):
        w, Q = jnp.linalg.eigh(0.5 * (A + A.T))
        rcond = b.size * jnp.finfo(b.dtype).eps if self.rcond is None else self.rcond
        keep = jnp.abs(w) > rcond * jnp.max(jnp.abs(w))
        return Q @ jnp.where(keep, (Q.T @ b) / jnp.where(keep, w, 1), 0)


@dataclass(frozen=True)
class Cholesky(_Dense):
    """x = (A + μI)⁻¹ b by a Cholesky factorization: symmetric positive definite A only."""

    symmetric: ClassVar[bool] = True

    def _solve(self, A, b):
        return jsl.cho_solve(jsl.cho_factor(0.5 * (A + A.T), lower=True), b)


@dataclass(frozen=True)
class LU(_Dense):
    """x = (A + μI)⁻¹ b by an LU factorization with partial pivoting: any invertible A."""

    symmetric: ClassVar[bool] = False

    def _solve(self, A, b):
        return jsl.lu_solve(jsl.lu_factor(A), b)


@dataclass(frozen=True)
class Auto:
    """The default adjoint solver: :class:`Eigh` when d ≤ ``dense_max``, else :class:`CG`.

    The choice is made when the solve is traced, from the number of parameters d. A dense solve
    costs d Hessian-vector products done in one batch, plus O(d³); CG costs its iterations one
    after the other, typically 15 to 150 of them. Measured (benchmarks/bench_hypergrad.py), the
    dense solve is already slower than CG at d = 20 to 200 on logistic regression (by 0.2 to 1 of a
    solve) and 8× slower on the digits job (d = 650), so dense is the default only for d ≤ 32,
    where it costs a fraction of a millisecond more and needs no iteration count. ``Eigh`` (not a
    Cholesky) keeps the answer right on consistent singular systems (e.g. unpenalized softmax
    biases) and on indefinite ones.

    Args:
      tol: relative residual tolerance. Default: by dtype (1e-10 float64, 1e-4 float32), or the
        inner solver's tolerance ``inner_tol`` when that is looser (``argmin`` sets it): solving the
        adjoint more accurately than θ* buys no accuracy in the hypergradient.
      dense_max: largest d solved densely.
      precondition: CG uses the preconditioner ``argmin`` offers (the inner L-BFGS memory).
      maxiter: CG's maximum number of products.
      inner_tol: the inner solver's tolerance (set by ``argmin``).
    """

    tol: float | None = None
    dense_max: int = 32
    precondition: bool = False
    maxiter: int = 1000
    inner_tol: float | None = None
    symmetric: ClassVar[bool] = True

    def choose(self, b: Any):
        """The solver used for a right-hand side shaped like ``b``."""
        tol = self.tol
        if tol is None and self.inner_tol is not None:
            tol = max(float(self.inner_tol), default_tol(b, LINEAR_TOL))
        if num_params(b) <= self.dense_max:
            return Eigh(tol=tol)
        return CG(tol=tol, maxiter=self.maxiter, precondition=self.precondition)

    def __call__(self, matvec: Callable, b: Any, x0: Any = None, precond: Callable | None = None
                 ) -> tuple[Any, LinearInfo]:
        solver = self.choose(b)
        if isinstance(solver, CG):
            return solver(matvec, b, x0, precond=precond)
        return solver(matvec, b, x0)
