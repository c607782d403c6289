"""Inner solvers and the CG adjoint solve against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

jax.config.update("jax_enable_x64", True)

from lossopt.linear import CG  # noqa: E402
from lossopt.solvers import LBFGS, OptaxSolver, default_tol  # noqa: E402

RNG = np.random.default_rng(0)
N, D, MU = 200, 20, 0.05
X = RNG.normal(size=(N, D))
Y = X @ RNG.normal(size=D) + 0.1 * RNG.normal(size=N)
W_STAR = np.linalg.solve(X.T @ X / N + MU * np.eye(D), X.T @ Y / N)


def ridge(dtype):
    Xd, Yd = jnp.asarray(X, dtype), jnp.asarray(Y, dtype)
    return lambda w: 0.5 * jnp.mean((Xd @ w - Yd) ** 2) + 0.5 * MU * jnp.sum(w**2)


def test_default_tolerances_follow_dtype():
    assert default_tol(jnp.zeros(2, jnp.float64)) == 1e-10
    assert default_tol(jnp.zeros(2, jnp.float32)) == 1e-5
    assert default_tol({"a": jnp.zeros(2), "b": jnp.zeros(2, jnp.float32)}) == 1e-5


@pytest.mark.parametrize("dtype,accuracy", [(jnp.float64, 1e-8), (jnp.float32, 1e-4)])
def test_lbfgs_defaults_reach_the_solution(dtype, accuracy):
    w, info = jax.jit(lambda t: LBFGS().run(ridge(dtype), t))(jnp.zeros(D, dtype))
    assert bool(info.converged), info
    assert float(info.residual) <= default_tol(jnp.zeros(1, dtype))
    assert np.linalg.norm(np.asarray(w, np.float64) - W_STAR) / np.linalg.norm(W_STAR) <= accuracy


def test_residual_definition_is_gradient_norm_relative_to_start():
    fun = ridge(jnp.float64)
    theta0 = jnp.ones(D)
    w, info = LBFGS(maxiter=3).run(fun, theta0)
    g0 = np.linalg.norm(jax.grad(fun)(theta0))
    g = np.linalg.norm(jax.grad(fun)(w))
    assert float(info.residual) == pytest.approx(g / max(1.0, g0), rel=1e-10)
    assert not bool(info.converged) and int(info.steps) == 3


def test_optax_solver_runs_any_transformation_to_tolerance():
    w, info = jax.jit(lambda t: OptaxSolver(optax.adam(0.05), tol=1e-7, maxiter=20000).run(ridge(jnp.float64), t))(
        jnp.zeros(D))
    assert bool(info.converged)
    assert np.linalg.norm(np.asarray(w) - W_STAR) / np.linalg.norm(W_STAR) <= 1e-5


def test_pytree_parameters():
    fun = lambda p: ridge(jnp.float64)(jnp.concatenate([p["a"], p["b"]]))  # noqa: E731
    p, info = LBFGS().run(fun, {"a": jnp.zeros(5), "b": jnp.zeros(D - 5)})
    assert bool(info.converged)
    np.testing.assert_allclose(np.concatenate([p["a"], p["b"]]), W_STAR, rtol=1e-7)


# ------------------------------------------------------------------ CG
A_SPD = (lambda M: M @ M.T / D + 0.1 * np.eye(D))(RNG.normal(size=(D, D)))
B = RNG.normal(size=D)


def test_cg_solves_spd_system_and_reports_true_residual():
    x, info = CG()(lambda v: jnp.asarray(A_SPD) @ v, jnp.asarray(B))
    np.testing.assert_allclose(x, np.linalg.solve(A_SPD, B), rtol=1e-8)
    assert bool(info.converged)
    true = np.linalg.norm(A_SPD @ np.asarray(x) - B) / np.linalg.norm(B)
    assert float(info.residual) == pytest.approx(true, rel=1e-6, abs=1e-15)


def test_cg_damping():
    x, _ = CG(damping=0.7)(lambda v: jnp.asarray(A_SPD) @ v, jnp.asarray(B))
    np.testing.assert_allclose(x, np.linalg.solve(A_SPD + 0.7 * np.eye(D), B), rtol=1e-8)


def test_cg_on_consistent_singular_system_gives_minimum_norm_solution():
    U = np.linalg.qr(RNG.normal(size=(D, D)))[0]
    eig = np.concatenate([RNG.uniform(0.5, 2.0, size=D - 3), np.zeros(3)])
    A = U @ np.diag(eig) @ U.T
    b = A @ RNG.normal(size=D)  # in the range of A: consistent
    x, info = CG()(lambda v: jnp.asarray(A) @ v, jnp.asarray(b))
    assert bool(info.converged)
    np.testing.assert_allclose(x, np.linalg.pinv(A) @ b, rtol=1e-8, atol=1e-10)


def test_cg_cap_reports_unconverged_and_warm_start_helps():
    mv = lambda v: jnp.asarray(A_SPD) @ v  # noqa: E731
    x1, info1 = CG(maxiter=2)(mv, jnp.asarray(B))
    assert not bool(info1.converged)
    true = np.linalg.norm(A_SPD @ np.asarray(x1) - B) / np.linalg.norm(B)
    assert float(info1.residual) == pytest.approx(true, rel=1e-8)
    exact = np.linalg.solve(A_SPD, B)
    _, cold = CG()(mv, jnp.asarray(B))
    _, warm = CG()(mv, jnp.asarray(B), jnp.asarray(exact + 1e-6 * RNG.normal(size=D)))
    assert int(warm.steps) < int(cold.steps)


def test_float32_defaults_are_reachable_on_the_main_job():
    """Default float32 tolerances converge (inner and adjoint) on real data, also where float32
    tuning of the main job goes; at a moderate λ the float32 hypergradient matches float64."""
    import lossopt
    from lossopt.problems import digits_class_weights

    moderate = lambda p: p.lam0 * np.linspace(0.5, 1.5, p.lam0.size)
    # one class weight far above the others and little L2: float32's rounding floor for the
    # adjoint residual sits at 1e-5 to 2e-5 there, so a 1e-5 default would be unreachable
    tuned = lambda p: np.r_[1.0, np.geomspace(3e-3, 7e-2, 9), 7e-6]
    grads = {}
    for dtype in (jnp.float32, jnp.float64):
        p = digits_class_weights(dtype=dtype)
        solve = lossopt.argmin(p.loss, on_unconverged="raise")
        for where in (moderate, tuned):
            lam = jnp.asarray(where(p), dtype)
            hg = solve.value_and_hypergrad(p.val_loss, lam, p.theta0, p.train, p.val)
            assert bool(hg.info.converged) and bool(hg.adjoint_info.converged), (dtype, hg.info, hg.adjoint_info)
            assert hg.grad.dtype == dtype
            if where is moderate:
                grads[dtype] = np.asarray(hg.grad, np.float64)
    g32, g64 = grads[jnp.float32], grads[jnp.float64]
    assert np.linalg.norm(g32 - g64) <= 1e-3 * np.linalg.norm(g64)
