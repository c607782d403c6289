"""argmin for losses with nonsmooth (prox) terms: implicit differentiation of the proximal fixed point.

With λ·f = λ_sm·f_sm + Σ_c λ_c h_c (:mod:`lossopt.prox`), the solution θ* is a fixed point of
θ = prox_{ηλ·h}(θ − η∇F(θ)), F = λ_sm·f_sm. Differentiating that fixed point where the active set
A is locally constant (strict complementarity) gives, with M = diag(1_A) the prox derivative's
mask, H = ∇²F(θ*) and C the active groups' curvature (λ_g/‖θ_g‖)(I − θ_gθ_gᵀ/‖θ_g‖²):

    θ̇_Ā = 0,      (H + C)_AA θ̇_A = −(∂_λ∇F·λ̇ + ∂_data∇F·ḋata + Σ_c λ̇_c s_c(θ*))_A

s_c = sign θ (L1) or θ_g/‖θ_g‖ (group L2) on A. The reduced matrix is symmetric, so CG applies;
it is applied masked, not sliced — A v = M(H + C)(M v) + (I − M) v — so shapes never depend on the
support (jit, vmap). Reverse mode: A u = M∇_θV, then ∇_λV = −J_f(θ*)u on smooth components and
−s_c·u on prox components (d/dλ1 of the fixed point is −sign(θ_A) on the support for L1).

As in :mod:`lossopt.implicit`, the derivative is a ``jax.custom_jvp`` whose linear solve is a
``jax.lax.custom_linear_solve``, so grad, jvp, jit, vmap all go through one rule. At a kink
(a coordinate exactly at its threshold) the derivative of the piece where it stays at zero is
returned (see :mod:`lossopt.prox`). The full non-symmetric fixed-point system is never solved.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.flatten_util import ravel_pytree

from lossopt.diagnostics import report
from lossopt.implicit import Argmin, Hypergradient, _zero_tangent
from lossopt.linear import CG
from lossopt.prox import Penalty, as_term
from lossopt.proxgrad import FISTA


class ProxArgmin(Argmin):
    """θ*(λ) for a :class:`lossopt.LinearLoss` with ``prox`` terms. Built by :func:`lossopt.argmin`
    when the loss has prox terms; same interface as :class:`lossopt.implicit.Argmin`."""

    def __init__(self, loss, solver=None, linear_solver=None, on_unconverged: str = "warn"):
        solver = FISTA() if solver is None else solver
        if not hasattr(solver, "run_prox"):
            raise TypeError(f"the loss has prox terms {list(loss.prox)}; its inner solver must handle "
                            f"them (e.g. lossopt.proxgrad.FISTA), got {solver!r}")
        self._terms = {key: as_term(value, key) for key, value in loss.prox.items()}
        self._penalties: dict = {}
        self._checked: set = set()
        super().__init__(loss, solver, CG() if linear_solver is None else linear_solver, on_unconverged)

    # ---------------------------------------------------------------- pieces
    def _penalty(self, theta, k: int) -> Penalty:
        """The prox terms bound to θ's layout (cached per structure and shapes)."""
        key = (jax.tree.structure(theta), tuple(np.shape(x) for x in jax.tree.leaves(theta)), k)
        if key not in self._penalties:
            self._penalties[key] = Penalty(self._terms, theta, k, self.loss.names_for(k))
        return self._penalties[key]

    def _validate(self, lam, theta0, data) -> None:
        """Argmin's checks, plus (once per structure, on concrete inputs) that the smooth part's
        gradient is finite where the penalized parameters are zero — the features of the prox
        components are weighted by 0 there, but a NaN derivative (jnp.linalg.norm at 0) times 0
        is still NaN."""
        super()._validate(lam, theta0, data)
        leaves = jax.tree.leaves((theta0, data))
        key = (jax.tree.structure((theta0, data)), tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
        if key in self._checked or any(isinstance(x, jax.core.Tracer) for x in leaves + [lam]):
            return
        penalty = self._penalty(theta0, np.shape(lam)[0])
        x, unravel = ravel_pytree(theta0)
        at_zero = jnp.where(jnp.asarray(penalty.owned), 0.0, x)
        weights = jnp.asarray(penalty.smooth_mask, x.dtype)
        g = jax.grad(lambda x_: self.loss.value(weights, unravel(x_), data))(at_zero)
        if not bool(jnp.all(jnp.isfinite(g))):
            names = self.loss.names_for(np.shape(lam)[0])
            prox = [names[i] for i in np.flatnonzero(penalty.smooth_mask == 0)]
            raise ValueError(
                f"the gradient of the smooth features is NaN or inf where the parameters under the "
                f"prox terms {prox} are zero. lossopt weights those components by 0 in the smooth "
                "part, but a NaN derivative times 0 is still NaN: compute them in features with the "
                "term's own values, e.g. lossopt.prox.group_l2(...).values(theta) or "
                ".value(theta) (derivative 0 at zero), not jnp.linalg.norm or jnp.sqrt")
        self._checked.add(key)

    def _smooth(self, lam, data, penalty):
        """θ ↦ λ_sm·f(θ): the prox components weighted by 0 (their values come from the terms)."""
        lam_sm = lam * jnp.asarray(penalty.smooth_mask, lam.dtype)
        return lambda theta: self.loss.value(lam_sm, theta, data)

    def _forward(self, lam, theta0, data):
        penalty = self._penalty(theta0, lam.shape[0])
        theta, info = self.solver.run_prox(self._smooth(lam, data, penalty), theta0, penalty, lam)
        report(info, "lossopt inner solve", self.on_unconverged)
        return theta, info

    def _system(self, theta, lam, data, penalty):
        """The masked reduced matrix v ↦ M(H + C)(Mv) + (I − M)v on flat vectors, and M."""
        x, unravel = ravel_pytree(theta)
        grad = lambda th: ravel_pytree(jax.grad(self._smooth(lam, data, penalty))(th))[0]  # noqa: E731
        hvp = jax.linearize(lambda x_: grad(unravel(x_)), x)[1]
        m = penalty.mask(lam, x)

        def matvec(v):
            mv = m * v
            return m * (hvp(mv) + penalty.curvature(lam, x, mv)) + (1.0 - m) * v

        return matvec, m, x, unravel

    def _linear_solve(self, matvec, b, x0=None, precond=None):
        x, info = self.linear_solver(matvec, b, x0)
        report(info, "lossopt adjoint solve", self.on_unconverged)
        return x, info

    # ---------------------------------------------------------------- derivatives
    def _jvp(self, primals, tangents):
        lam, theta0, data = primals
        dlam, _, ddata = tangents
        theta, info = self._forward(lam, theta0, data)
        info_dot = jax.tree.map(_zero_tangent, info)
        penalty = self._penalty(theta0, lam.shape[0])

        data_leaves, treedef = jax.tree.flatten(data)
        data_dots = treedef.flatten_up_to(ddata) if data_leaves else []
        active = [i for i, t in enumerate(data_dots) if not isinstance(t, SymbolicZero)]
        lam_active = not isinstance(dlam, SymbolicZero)
        if not lam_active and not active:
            return (theta, info), (jax.tree.map(jnp.zeros_like, theta), info_dot)

        matvec, m, x, unravel = self._system(theta, lam, data, penalty)

        def smooth_grad(lam_, *moving):
            leaves = list(data_leaves)
            for i, leaf in zip(active, moving):
                leaves[i] = leaf
            d = jax.tree.unflatten(treedef, leaves)
            return ravel_pytree(jax.grad(self._smooth(lam_, d, penalty))(theta))[0]

        # ∂_(λ, data) of the active-set optimality condition, applied to (λ̇, ḋata).
        moving = tuple(data_leaves[i] for i in active)
        moving_dots = tuple(data_dots[i] for i in active)
        if lam_active:
            rhs = jax.jvp(smooth_grad, (lam, *moving), (dlam, *moving_dots))[1]
            rhs = rhs + penalty.lam_jvp(x, dlam)
        else:
            rhs = jax.jvp(lambda *mv: smooth_grad(lam, *mv), moving, moving_dots)[1]

        solve = lambda mv, b: self._linear_solve(mv, b)[0]  # noqa: E731
        dx = jax.lax.custom_linear_solve(matvec, -(m * rhs), solve, symmetric=True)
        return (theta, info), (unravel(dx), info_dot)

    def _value_and_hypergrad(self, val_loss, lam, theta0, data, val_data, adjoint0):
        theta, info = self._forward(lam, theta0, data)
        penalty = self._penalty(theta0, lam.shape[0])
        value, v_theta = jax.value_and_grad(val_loss)(theta, val_data)
        matvec, m, x, unravel = self._system(theta, lam, data, penalty)
        u0 = None if adjoint0 is None else m * ravel_pytree(adjoint0)[0]
        u, adjoint_info = self._linear_solve(matvec, m * ravel_pytree(v_theta)[0], u0)
        # ∇_λV = −J_f(θ*)u: smooth rows from one JVP of the features, prox rows from the terms.
        jf_u = jax.jvp(lambda th: self.loss.features(th, data), (theta,), (unravel(u),))[1]
        grad = -jnp.where(jnp.asarray(penalty.smooth_mask) > 0, jf_u, penalty.lam_vjp(x, u))
        return Hypergradient(value, grad, theta, unravel(u), info, adjoint_info)
