"""The solver set: every linear and inner solver against closed forms; the preconditioned adjoint;
indefinite and singular systems."""

import warnings

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

import lossopt  # noqa: E402
from lossopt.linear import CG, LU, MINRES, Auto, BiCGStab, Cholesky, Eigh, custom_solve  # noqa: E402
from lossopt.solvers import LBFGS, LBFGSMemory, Newton  # noqa: E402

RNG = np.random.default_rng(0)

# ------------------------------------------------------------------ per-feature ridge (k = d + 1)
N, D = 60, 5
X = RNG.normal(size=(N, D))
Y = X @ RNG.normal(size=D) + 0.3 * RNG.normal(size=N)
XV = RNG.normal(size=(40, D))
YV = XV @ RNG.normal(size=D) + 0.3 * RNG.normal(size=40)
DATA, VDATA = (jnp.asarray(X), jnp.asarray(Y)), (jnp.asarray(XV), jnp.asarray(YV))
LAM = np.concatenate([RNG.uniform(0.05, 1.0, size=D), [1.0]])


def ridge_features(w, data):
    X, y = data
    return jnp.concatenate([0.5 * w**2, jnp.array([0.5 * jnp.mean((X @ w - y) ** 2)])])


def ridge_val(w, data):
    X, y = data
    return 0.5 * jnp.mean((X @ w - y) ** 2)


def ridge_closed(lam):
    A = lam[D] * X.T @ X / N + np.diag(lam[:D])
    th = np.linalg.solve(A, lam[D] * X.T @ Y / N)
    u = np.linalg.solve(A, XV.T @ (XV @ th - YV) / len(YV))
    grad = np.concatenate([-u * th, [u @ (X.T @ Y / N - X.T @ X / N @ th)]])
    return th, grad


LOSS = lossopt.LinearLoss(ridge_features)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


LINEAR_SOLVERS = [CG(), CG(precondition=True), MINRES(), BiCGStab(), Eigh(), Cholesky(), LU()]  # Auto: Eigh here


@pytest.mark.parametrize("linear_solver", LINEAR_SOLVERS, ids=repr)
def test_every_linear_solver_reproduces_the_ridge_hypergradient(linear_solver):
    """Reverse mode (the transposed solve inside custom_linear_solve) against the closed form."""
    solve = lossopt.argmin(LOSS, linear_solver=linear_solver, on_unconverged="raise")
    g = jax.grad(lambda l: ridge_val(solve(l, jnp.zeros(D), DATA), VDATA))(jnp.asarray(LAM))
    assert rel(g, ridge_closed(LAM)[1]) <= 1e-6


@pytest.mark.parametrize("linear_solver", [MINRES(), LU()], ids=repr)
def test_forward_mode_and_explicit_hypergradient_with_other_solvers(linear_solver):
    solve = lossopt.argmin(LOSS, linear_solver=linear_solver, on_unconverged="raise")
    hg = solve.value_and_hypergrad(ridge_val, jnp.asarray(LAM), jnp.zeros(D), DATA, VDATA)
    assert bool(hg.adjoint_info.converged) and rel(hg.grad, ridge_closed(LAM)[1]) <= 1e-6
    tangent = jax.jvp(lambda l: solve(l, jnp.zeros(D), DATA), (jnp.asarray(LAM),), (jnp.ones(D + 1),))[1]
    h = 1e-5
    fd = (ridge_closed(LAM + h)[0] - ridge_closed(LAM - h)[0]) / (2 * h)
    assert rel(tangent, fd) <= 1e-6


def test_newton_reproduces_the_ridge_closed_form_in_one_step():
    solve = lossopt.argmin(LOSS, solver=Newton(), on_unconverged="raise")
    theta_star, grad_star = ridge_closed(LAM)
    theta, info = solve.with_info(jnp.asarray(LAM), jnp.zeros(D), DATA)
    assert int(info.steps) == 1 and rel(theta, theta_star) <= 1e-10
    hg = solve.value_and_hypergrad(ridge_val, jnp.asarray(LAM), jnp.zeros(D), DATA, VDATA)
    assert rel(hg.grad, grad_star) <= 1e-6


def test_newton_on_logistic_pytree_and_from_a_saddle():
    Xs = RNG.normal(size=(200, 6))
    ys = (Xs @ RNG.normal(size=6) > 0).astype(float)

    def fun(p):
        z = Xs @ p["w"] + p["b"]
        return jnp.mean(jnp.logaddexp(0.0, z) - ys * z) + 0.005 * jnp.sum(p["w"] ** 2)

    p0 = {"w": jnp.zeros(6), "b": jnp.zeros(())}
    a, info = jax.jit(lambda p: Newton().run(fun, p))(p0)
    b, _ = LBFGS(tol=1e-12).run(fun, p0)
    assert bool(info.converged) and int(info.steps) <= 8
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-7, atol=1e-10)
    # Double well started at its saddle 0 (H = −4I + 0 there): the modified step still descends.
    well = lambda x: jnp.sum((x**2 - 1) ** 2) + 0.1 * jnp.sum(x)  # noqa: E731
    x, info = Newton().run(well, jnp.zeros(3))
    assert bool(info.converged) and np.all(np.asarray(jax.hessian(well)(x)).diagonal() > 0)


# ------------------------------------------------------------------ solvers on raw systems
A_SPD = (lambda M: M @ M.T / 12 + 0.1 * np.eye(12))(RNG.normal(size=(12, 12)))
A_NS = A_SPD + 0.3 * RNG.normal(size=(12, 12))
B = RNG.normal(size=12)


@pytest.mark.parametrize("solver,A", [(MINRES(), A_SPD), (MINRES(), A_SPD - 0.4 * np.eye(12)),
                                      (BiCGStab(), A_NS), (LU(), A_NS), (Eigh(), A_SPD - 0.4 * np.eye(12)),
                                      (Cholesky(damping=0.3), A_SPD)], ids=lambda x: repr(x)[:20])
def test_solver_on_raw_system_and_true_residual(solver, A):
    assert np.linalg.eigvalsh(A_SPD - 0.4 * np.eye(12)).min() < 0  # the indefinite case is indefinite
    x, info = jax.jit(lambda b: solver(lambda v: jnp.asarray(A) @ v, b))(jnp.asarray(B))
    A_eff = A + solver.damping * np.eye(12)
    np.testing.assert_allclose(x, np.linalg.solve(A_eff, B), rtol=1e-8)
    assert bool(info.converged)
    true = np.linalg.norm(A_eff @ np.asarray(x) - B) / np.linalg.norm(B)
    assert float(info.residual) == pytest.approx(true, rel=1e-6, abs=1e-15)


def test_non_symmetric_custom_solve_differentiates_like_a_dense_solve():
    loss = lambda solve_fn: lambda M, b: jnp.sum(jnp.sin(solve_fn(M, b)))  # noqa: E731
    ours = loss(lambda M, b: custom_solve(BiCGStab(tol=1e-13), lambda v: M @ v, b))
    ref = loss(jnp.linalg.solve)
    args = (jnp.asarray(A_NS), jnp.asarray(B))
    for g, e in zip(jax.grad(ours, argnums=(0, 1))(*args), jax.grad(ref, argnums=(0, 1))(*args)):
        assert rel(g, e) <= 1e-8
    jac = jax.jacfwd(lambda b: custom_solve(LU(), lambda v: jnp.asarray(A_NS) @ v, b))(jnp.asarray(B))
    np.testing.assert_allclose(jac, np.linalg.inv(A_NS), rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="symmetric"):
        custom_solve(CG(), lambda v: v, jnp.asarray(B))


def _singular(consistent, definite):
    U = np.linalg.qr(RNG.normal(size=(12, 12)))[0]
    w = np.concatenate([RNG.uniform(0.5, 2.0, size=9) * (1 if definite else np.sign(RNG.normal(size=9))), np.zeros(3)])
    A = U @ np.diag(w) @ U.T
    b = A @ RNG.normal(size=12) if consistent else RNG.normal(size=12)
    return A, b


@pytest.mark.parametrize("solver", [CG(), MINRES(), Eigh(), Auto()], ids=repr)
def test_consistent_singular_system_gives_minimum_norm_solution(solver):
    A, b = _singular(consistent=True, definite=not isinstance(solver, (MINRES, Eigh)))
    x, info = solver(lambda v: jnp.asarray(A) @ v, jnp.asarray(b))
    assert bool(info.converged)
    np.testing.assert_allclose(x, np.linalg.pinv(A) @ b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("solver", [MINRES(), CG(), Eigh()], ids=repr)
def test_inconsistent_indefinite_system_is_finite_and_reported(solver):
    A, b = _singular(consistent=False, definite=False)
    x, info = solver(lambda v: jnp.asarray(A) @ v, jnp.asarray(b))
    assert np.all(np.isfinite(np.asarray(x))) and not bool(info.converged)
    lsq = np.linalg.norm(A @ np.linalg.pinv(A) @ b - b) / np.linalg.norm(b)  # the best reachable
    assert float(info.residual) >= lsq * (1 - 1e-8)
    if not isinstance(solver, CG):  # CG stops at the first negative curvature; the others reach it
        assert float(info.residual) <= lsq * (1 + 1e-6)


# ------------------------------------------------------------------ L-BFGS memory as preconditioner
def test_lbfgs_memory_is_spd_and_satisfies_the_newest_secant_equation():
    Xq = RNG.normal(size=(100, 8))
    fun = lambda w: 0.5 * jnp.mean((Xq @ w - 1.0) ** 2) + 0.01 * jnp.sum(w**2)  # noqa: E731
    theta, info, memory = jax.jit(lambda t: LBFGS(memory_size=4).run_with_memory(fun, t))(jnp.zeros(8))
    theta_ref, info_ref = LBFGS(memory_size=4).run(fun, jnp.zeros(8))
    np.testing.assert_array_equal(theta, theta_ref)
    assert int(info.steps) == int(info_ref.steps) > 4 and np.all(np.asarray(memory.rho) > 0)
    s0, y0 = memory.s[0], memory.y[0]
    np.testing.assert_allclose(memory.apply(y0), s0, rtol=1e-8)  # BFGS: M y_newest = s_newest
    M = np.stack([np.asarray(memory.apply(jnp.asarray(e))) for e in np.eye(8)])
    np.testing.assert_allclose(M, M.T, atol=1e-12)
    assert np.linalg.eigvalsh(M).min() > 0
    empty = LBFGSMemory.from_pairs(jnp.zeros((3, 8)), jnp.zeros((3, 8)))  # no pairs: M = I
    np.testing.assert_array_equal(empty.apply(jnp.arange(8.0)), jnp.arange(8.0))


def _logistic(n=300, d=8, seed=1):
    rng = np.random.default_rng(seed)
    Xs = rng.normal(size=(2 * n, d))
    ys = (Xs @ rng.normal(size=d) + rng.normal(size=2 * n) > 0).astype(float)
    return (jnp.asarray(Xs[:n]), jnp.asarray(ys[:n])), (jnp.asarray(Xs[n:]), jnp.asarray(ys[n:]))


def _logloss(theta, X, y):
    z = X @ theta["w"] + theta["b"]
    return jnp.logaddexp(0.0, z) - y * z


def _problems():
    from lossopt.problems import digits_class_weights

    train, val = _logistic()
    logit = lossopt.LinearLoss(lambda th, d: jnp.stack([0.5 * jnp.sum(th["w"] ** 2), jnp.mean(_logloss(th, *d))]))
    p = digits_class_weights()
    return {
        "ridge": (LOSS, ridge_val, jnp.asarray(LAM), jnp.zeros(D), DATA, VDATA),
        "logistic": (logit, lambda th, d: jnp.mean(_logloss(th, *d)), jnp.array([0.05, 1.0]),
                     {"w": jnp.zeros(8), "b": jnp.zeros(())}, train, val),
        "digits": (p.loss, p.val_loss, jnp.asarray(p.lam0), p.theta0, p.train, p.val),
    }


@pytest.mark.parametrize("name", ["ridge", "logistic", "digits"])
def test_preconditioned_and_plain_adjoints_agree_to_the_solve_tolerance(name):
    loss, val_loss, lam, theta0, train, val = _problems()[name]
    out = {}
    for pre in (False, True):
        solve = lossopt.argmin(loss, linear_solver=CG(precondition=pre), on_unconverged="raise")
        out[pre] = solve.value_and_hypergrad(val_loss, lam, theta0, train, val)
    plain, pre = out[False], out[True]
    assert bool(plain.adjoint_info.converged) and bool(pre.adjoint_info.converged)
    # Same inner solve; ‖H(u_pre − u_plain)‖ ≤ ‖Hu_pre − b‖ + ‖Hu_plain − b‖ ≤ 2 tol ‖b‖.
    jax.tree.map(np.testing.assert_array_equal, pre.theta, plain.theta)
    hvp = jax.linearize(jax.grad(lambda th: loss.value(lam, th, train)), plain.theta)[1]
    b = jax.grad(val_loss)(plain.theta, val)
    diff = hvp(jax.tree.map(jnp.subtract, pre.adjoint, plain.adjoint))
    tol = float(plain.adjoint_info.tol)
    assert float(lossopt.linear.relative_residual(lambda v: v, diff, jax.tree.map(jnp.zeros_like, b))) <= (
        2 * tol * float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(b)))))
    np.testing.assert_allclose(pre.grad, plain.grad, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(plain.grad))))


# ------------------------------------------------------------------ defaults
def test_default_adjoint_is_dense_for_small_d_and_follows_a_looser_inner_tolerance():
    b_small, b_big = jnp.zeros(10), jnp.zeros(100)
    solve = lossopt.argmin(LOSS)
    assert isinstance(solve.linear_solver.choose(b_small), Eigh)
    assert solve.linear_solver.choose(b_big) == CG(precondition=True)  # tol None: by dtype
    loose = lossopt.argmin(LOSS, solver=LBFGS(tol=1e-6))
    assert loose.linear_solver.choose(b_big).tol == 1e-6
    tight = lossopt.argmin(LOSS, solver=LBFGS(tol=1e-13))  # never tighter than the adjoint default
    assert tight.linear_solver.choose(b_big).tol == 1e-10
    assert lossopt.argmin(LOSS, linear_solver=MINRES()).linear_solver == MINRES()
    # A user-configured Auto follows the inner tolerance too (unless its own tol is set).
    pre = lossopt.argmin(LOSS, solver=LBFGS(tol=1e-6), linear_solver=Auto(precondition=True))
    assert pre.linear_solver.choose(b_big) == CG(tol=1e-6, precondition=True)
    fixed = lossopt.argmin(LOSS, solver=LBFGS(tol=1e-6), linear_solver=Auto(tol=1e-9))
    assert fixed.linear_solver.choose(b_big).tol == 1e-9


def test_default_adjoint_on_a_small_singular_softmax_problem_matches_finite_differences():
    """3 classes × 4 inputs + unpenalized biases (d = 15 ≤ 32: dense Eigh): H is singular along a
    common shift of the biases, a direction that moves no feature."""
    rng = np.random.default_rng(2)
    Xs = rng.normal(size=(240, 4))
    ys = np.argmax(Xs @ rng.normal(size=(4, 3)) + rng.normal(size=(240, 3)), axis=1)
    train, val = (jnp.asarray(Xs[:120]), jnp.asarray(ys[:120])), (jnp.asarray(Xs[120:]), jnp.asarray(ys[120:]))

    def nll(th, d):
        logits = d[0] @ th["W"] + th["b"]
        return jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, d[1][:, None], axis=1)[:, 0]

    loss = lossopt.LinearLoss(lambda th, d: jnp.stack([jnp.mean(nll(th, d)), 0.5 * jnp.sum(th["W"] ** 2)]))
    V = lambda th, d: jnp.mean(nll(th, d))  # noqa: E731
    theta0 = {"W": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    solve = lossopt.argmin(loss, solver=LBFGS(tol=1e-13, maxiter=5000), on_unconverged="raise")
    lam = np.array([1.0, 0.05])
    hg = solve.value_and_hypergrad(V, jnp.asarray(lam), theta0, train, val)
    assert bool(hg.adjoint_info.converged) and int(hg.adjoint_info.steps) == 16  # dense: d + 1 products
    h = 1e-4 * lam[1]
    f = lambda l2: float(V(solve(jnp.asarray([1.0, l2]), theta0, train), val))  # noqa: E731
    fd = (8 * (f(lam[1] + h / 2) - f(lam[1] - h / 2)) - (f(lam[1] + h) - f(lam[1] - h))) / (6 * h)
    assert abs(float(hg.grad[1]) - fd) <= 1e-6 * abs(fd)


# ------------------------------------------------------------------ non-convex inner problem
def _tiny_net():
    """A 2-4-1 tanh network, stopped after 3 L-BFGS steps: its Hessian there is indefinite."""
    rng = np.random.default_rng(3)
    Xs, ys = rng.normal(size=(30, 2)), rng.normal(size=30)
    data = (jnp.asarray(Xs), jnp.asarray(ys))

    def predict(th, X):
        return jnp.tanh(X @ th["W1"] + th["b1"]) @ th["w2"]

    loss = lossopt.LinearLoss(lambda th, d: jnp.stack([jnp.mean((predict(th, d[0]) - d[1]) ** 2),
                                                       0.5 * sum(jnp.sum(x**2) for x in jax.tree.leaves(th))]))
    theta0 = {"W1": jnp.asarray(rng.normal(size=(2, 4))), "b1": jnp.zeros(4), "w2": jnp.asarray(0.1 * rng.normal(size=4))}
    return loss, lambda th, d: jnp.mean((predict(th, d[0]) - d[1]) ** 2), theta0, data


@pytest.mark.parametrize("linear_solver", [MINRES(), Eigh(), CG()], ids=repr)
def test_indefinite_hessian_never_gives_nan_and_is_reported(linear_solver):
    loss, V, theta0, data = _tiny_net()
    lam = jnp.array([1.0, 1e-3])
    solve = lossopt.argmin(loss, solver=LBFGS(maxiter=3), linear_solver=linear_solver)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hg = solve.value_and_hypergrad(V, lam, theta0, data, data)
        jax.effects_barrier()
    theta_flat, unravel = jax.flatten_util.ravel_pytree(hg.theta)
    H = jax.hessian(lambda x: loss.value(lam, unravel(x), data))(theta_flat)
    assert np.linalg.eigvalsh(np.asarray(H)).min() < 0  # the premise: H is indefinite here
    assert np.all(np.isfinite(np.asarray(hg.grad)))
    messages = [str(w.message) for w in caught if issubclass(w.category, lossopt.ConvergenceWarning)]
    assert any("inner solve did not converge" in m for m in messages)  # θ is not a minimizer
    if isinstance(linear_solver, CG):  # plain CG stops at negative curvature, and says so
        assert not bool(hg.adjoint_info.converged) and any("adjoint" in m for m in messages)
    else:  # MINRES and Eigh solve the indefinite system (H is invertible here)
        assert bool(hg.adjoint_info.converged)
        u = np.linalg.solve(np.asarray(H), np.asarray(jax.flatten_util.ravel_pytree(jax.grad(V)(hg.theta, data))[0]))
        assert rel(jax.flatten_util.ravel_pytree(hg.adjoint)[0], u) <= 1e-6
    if isinstance(linear_solver, MINRES):  # capped: finite, and reported as not converged
        capped = lossopt.argmin(loss, solver=LBFGS(maxiter=3), linear_solver=MINRES(maxiter=2),
                                on_unconverged="ignore")
        hg = capped.value_and_hypergrad(V, lam, theta0, data, data)
        assert not bool(hg.adjoint_info.converged) and np.all(np.isfinite(np.asarray(hg.grad)))
