"""argmin: θ*(λ) = argmin_θ λ·f(θ, data), differentiable in λ (and data) by implicit differentiation.

At the solution the optimality condition g(θ, λ, data) = ∇_θ(λ·f)(θ) = J_f(θ)ᵀλ = 0 holds, so by the
implicit function theorem, with H = ∇²_θ(λ·f)(θ*),

    θ̇ = −H⁻¹ (∂_λ g · λ̇ + ∂_data g · ḋata)                      (forward mode)
    ∇_λ V(θ*) = −J_f(θ*) u,   where  H u = ∇_θ V(θ*)              (reverse mode)

The derivative is a ``jax.custom_jvp`` whose linear solve is wrapped in
``jax.lax.custom_linear_solve``: JAX transposes it for reverse mode, so ``jax.jvp``, ``jax.grad``,
``jax.jit``, ``jax.vmap`` and higher-order combinations all go through one rule. A hypergradient
costs one inner solve, one adjoint solve (Hessian-vector products only, never a dense Hessian) and
one JVP of ``features`` — the same for k = 2 as for k = n.

The derivative with respect to ``theta0`` is zero by design: θ* does not depend on where the
solver started (it is only its warm start).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from jax.custom_derivatives import SymbolicZero

from lossopt.diagnostics import LinearInfo, SolverInfo, check_mode, report
from lossopt.linear import Auto
from lossopt.loss import LinearLoss
from lossopt.solvers import LBFGS


class Hypergradient(NamedTuple):
    """Result of :meth:`Argmin.value_and_hypergrad`."""

    value: Any  # V(θ*(λ))
    grad: Any  # ∇_λ V(θ*(λ)), shape (k,)
    theta: Any  # θ*(λ)
    adjoint: Any  # u = H⁻¹∇_θV, to warm-start the next adjoint solve
    info: SolverInfo  # the inner solve
    adjoint_info: LinearInfo  # the adjoint solve


def _zero_tangent(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


class Argmin:
    """θ*(λ) = argmin_θ λ·f(θ, data) with its implicit derivative. Build it with :func:`argmin`."""

    def __init__(self, loss: LinearLoss, solver=None, linear_solver=None, on_unconverged: str = "warn"):
        if not isinstance(loss, LinearLoss):
            raise TypeError(f"loss must be a lossopt.LinearLoss, got {type(loss).__name__}")
        self.loss = loss
        self.solver = LBFGS() if solver is None else solver
        # The default adjoint: Auto, its CG preconditioned with the inner L-BFGS memory (never more
        # products than plain CG in benchmarks/bench_hypergrad.py: 16 vs 18 on logistic regression,
        # 130 vs 142 on digits). An Auto adjoint solver (the default, or one the user configured)
        # follows the inner solver's tolerance when that is looser.
        linear_solver = Auto(precondition=True) if linear_solver is None else linear_solver
        if isinstance(linear_solver, Auto) and linear_solver.inner_tol is None:
            linear_solver = dataclasses.replace(linear_solver, inner_tol=getattr(self.solver, "tol", None))
        self.linear_solver = linear_solver
        self.on_unconverged = check_mode(on_unconverged)
        impl = jax.custom_jvp(self._forward)
        impl.defjvp(self._jvp, symbolic_zeros=True)
        self._impl = impl
        self._with_info = jax.jit(impl)
        self._hypergrad = jax.jit(self._value_and_hypergrad, static_argnums=0)
        self._k_cache: dict = {}

    def __repr__(self) -> str:
        return (f"argmin({self.loss!r}, solver={self.solver!r}, linear_solver={self.linear_solver!r}, "
                f"on_unconverged={self.on_unconverged!r})")

    # ---------------------------------------------------------------- public
    def __call__(self, lam, theta0, data=None):
        """θ*(λ), differentiable in ``lam`` and ``data`` (zero derivative in ``theta0``)."""
        return self.with_info(lam, theta0, data)[0]

    def with_info(self, lam, theta0, data=None) -> tuple[Any, SolverInfo]:
        """``(θ*(λ), info)`` with ``info.converged``, ``info.residual``, ``info.steps``, ``info.tol``."""
        self._validate(lam, theta0, data)
        return self._with_info(lam, theta0, data)

    def value_and_hypergrad(self, val_loss: Callable, lam, theta0, data, val_data, adjoint0=None) -> Hypergradient:
        """V(θ*(λ)) and ∇_λV in one pass, with both solves' statistics and the adjoint u.

        Same numbers as ``jax.value_and_grad(lambda l: val_loss(solve(l, theta0, data), val_data))``,
        but it also returns the adjoint-solve statistics and accepts ``adjoint0`` to warm-start the
        adjoint solve (pass the previous step's ``.adjoint``). Compiled once per ``val_loss``.
        """
        self._validate(lam, theta0, data)
        return self._hypergrad(val_loss, lam, theta0, data, val_data, adjoint0)

    # ---------------------------------------------------------------- internals
    def _validate(self, lam, theta0, data) -> None:
        """Python-boundary checks, once per (structure, shapes, dtypes): feature shape, λ's length."""
        leaves = jax.tree.leaves((theta0, data))
        key = (jax.tree.structure((theta0, data)), tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
        k = self._k_cache.get(key)
        if k is None:
            k = self._k_cache[key] = self.loss.num_features(theta0, data)
        self.loss.check_lam(lam, k)

    def _objective(self, lam, data) -> Callable:
        return lambda theta: self.loss.value(lam, theta, data)

    def _forward(self, lam, theta0, data):
        if hasattr(self.solver, "run_loss"):  # solvers that need λ and the data apart (minibatches)
            theta, info = self.solver.run_loss(self.loss, lam, theta0, data)
        else:
            theta, info = self.solver.run(self._objective(lam, data), theta0)
        report(info, "lossopt inner solve", self.on_unconverged)
        return theta, info

    def _hvp(self, theta, lam, data) -> Callable:
        """v ↦ H v by forward-over-reverse, linearized once at θ*."""
        return jax.linearize(jax.grad(self._objective(lam, data)), theta)[1]

    def _forward_and_precond(self, lam, theta0, data):
        """The inner solve, plus the preconditioner it hands the adjoint solve (None if none).

        L-BFGS hands out its final memory, an approximate inverse Hessian at θ*; it is used when
        the linear solver asks for one (``precondition=True``).
        """
        run = getattr(self.solver, "run_with_memory", None)
        if run is None or not getattr(self.linear_solver, "precondition", False):
            return (*self._forward(lam, theta0, data), None)
        theta, info, memory = run(self._objective(lam, data), theta0)
        report(info, "lossopt inner solve", self.on_unconverged)
        return theta, info, memory.apply

    def _linear_solve(self, matvec, b, x0=None, precond=None):
        if precond is None:
            x, info = self.linear_solver(matvec, b, x0)
        else:
            x, info = self.linear_solver(matvec, b, x0, precond=precond)
        report(info, "lossopt adjoint solve", self.on_unconverged)
        return x, info

    def _jvp(self, primals, tangents):
        lam, theta0, data = primals
        dlam, _, ddata = tangents
        theta, info, precond = self._forward_and_precond(lam, theta0, data)
        info_dot = jax.tree.map(_zero_tangent, info)

        # ∂g/∂(λ, data)·(λ̇, ḋata), with symbolic zeros skipped (no work for what is not differentiated).
        data_leaves, treedef = jax.tree.flatten(data)
        data_dots = treedef.flatten_up_to(ddata) if data_leaves else []
        active = [i for i, t in enumerate(data_dots) if not isinstance(t, SymbolicZero)]
        lam_active = not isinstance(dlam, SymbolicZero)
        if not lam_active and not active:
            return (theta, info), (otu.tree_zeros_like(theta), info_dot)

        def grad_theta(lam_, *moving):
            leaves = list(data_leaves)
            for i, leaf in zip(active, moving):
                leaves[i] = leaf
            d = jax.tree.unflatten(treedef, leaves)
            return jax.grad(self._objective(lam_ if lam_active else lam, d))(theta)

        if lam_active:
            args, dots = (lam, *[data_leaves[i] for i in active]), (dlam, *[data_dots[i] for i in active])
            rhs = jax.jvp(grad_theta, args, dots)[1]
        else:
            rhs = jax.jvp(lambda *m: grad_theta(lam, *m), tuple(data_leaves[i] for i in active),
                          tuple(data_dots[i] for i in active))[1]

        matvec = self._hvp(theta, lam, data)
        solve = lambda mv, b: self._linear_solve(mv, b, precond=precond)[0]  # noqa: E731
        dtheta = jax.lax.custom_linear_solve(matvec, otu.tree_scale(-1.0, rhs), solve, symmetric=True)
        return (theta, info), (dtheta, info_dot)

    def _value_and_hypergrad(self, val_loss, lam, theta0, data, val_data, adjoint0):
        theta, info, precond = self._forward_and_precond(lam, theta0, data)
        value, v_theta = jax.value_and_grad(val_loss)(theta, val_data)
        u, adjoint_info = self._linear_solve(self._hvp(theta, lam, data), v_theta, adjoint0, precond)
        # ∇_λV = −J_f(θ*) u: one JVP of the feature map gives all k components.
        jf_u = jax.jvp(lambda th: self.loss.features(th, data), (theta,), (u,))[1]
        return Hypergradient(value, -jf_u, theta, u, info, adjoint_info)


def argmin(loss: LinearLoss, solver=None, linear_solver=None, on_unconverged: str = "warn") -> Argmin:
    """The differentiable minimizer θ*(λ) = argmin_θ λ·f(θ, data) of a :class:`LinearLoss`.

    Args:
      loss: the :class:`lossopt.LinearLoss`.
      solver: inner solver (default :class:`lossopt.solvers.LBFGS`, tolerance by dtype; for a
        loss with ``prox`` terms :class:`lossopt.proxgrad.FISTA`, differentiated through the
        proximal fixed point by :mod:`lossopt.implicit_prox`).
      linear_solver: adjoint solver (default :class:`lossopt.linear.Auto` with ``precondition=True``:
        dense ``Eigh`` for small d, else CG preconditioned with the inner L-BFGS memory when the
        inner solver is L-BFGS; an ``Auto``'s tolerance follows the inner solver's ``tol`` when
        that is looser).
      on_unconverged: ``"warn"`` | ``"raise"`` | ``"ignore"`` — what happens when the inner or the
        adjoint solve misses its tolerance (see :mod:`lossopt.diagnostics`).

    Returns:
      ``solve`` with ``solve(lam, theta0, data) -> theta``, ``solve.with_info(...) -> (theta, info)``
      and ``solve.value_and_hypergrad(val_loss, lam, theta0, data, val_data)``.
    """
    if isinstance(loss, LinearLoss) and loss.prox:  # nonsmooth terms: the proximal fixed point
        from lossopt.implicit_prox import ProxArgmin

        return ProxArgmin(loss, solver, linear_solver, on_unconverged)
    return Argmin(loss, solver, linear_solver, on_unconverged)
