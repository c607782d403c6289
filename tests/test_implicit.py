"""argmin: θ*(λ) and its implicit derivative against closed forms and finite differences."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

import lossopt  # noqa: E402
from lossopt.linear import CG  # noqa: E402
from lossopt.solvers import LBFGS  # noqa: E402

# ------------------------------------------------------------------ per-feature ridge (k = d + 1)
RNG = np.random.default_rng(0)
N, D = 60, 5
X = RNG.normal(size=(N, D))
Y = X @ RNG.normal(size=D) + 0.3 * RNG.normal(size=N)
XV = RNG.normal(size=(40, D))
YV = XV @ RNG.normal(size=D) + 0.3 * RNG.normal(size=40)


def ridge_features(w, data):
    X, y = data
    return jnp.concatenate([0.5 * w**2, jnp.array([0.5 * jnp.mean((X @ w - y) ** 2)])])


def ridge_val(w, data):
    X, y = data
    return 0.5 * jnp.mean((X @ w - y) ** 2)


def ridge_closed(lam):
    """θ*(λ) = (λ_d XᵀX/n + diag λ_{:d})⁻¹ λ_d Xᵀy/n."""
    lam = np.asarray(lam)
    A = lam[D] * X.T @ X / N + np.diag(lam[:D])
    return np.linalg.solve(A, lam[D] * X.T @ Y / N)


def ridge_hypergrad_closed(lam):
    """∇_λ V by differentiating the closed form: dθ/dλ_j = −A⁻¹ ∂A/∂λ_j θ + A⁻¹ ∂b/∂λ_j."""
    lam = np.asarray(lam)
    A = lam[D] * X.T @ X / N + np.diag(lam[:D])
    th = ridge_closed(lam)
    gv = XV.T @ (XV @ th - YV) / len(YV)
    u = np.linalg.solve(A, gv)
    grad = np.empty(D + 1)
    grad[:D] = -u * th  # ∂A/∂λ_j = e_j e_jᵀ
    grad[D] = u @ (X.T @ Y / N - X.T @ X / N @ th)
    return grad


LAM = np.concatenate([RNG.uniform(0.05, 1.0, size=D), [1.0]])
DATA, VDATA = (jnp.asarray(X), jnp.asarray(Y)), (jnp.asarray(XV), jnp.asarray(YV))
LOSS = lossopt.LinearLoss(ridge_features)


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def test_ridge_solution_matches_closed_form():
    solve = lossopt.argmin(LOSS)
    theta, info = solve.with_info(jnp.asarray(LAM), jnp.zeros(D), DATA)
    assert bool(info.converged) and float(info.residual) <= float(info.tol)
    assert rel(theta, ridge_closed(LAM)) <= 1e-8


@pytest.mark.parametrize("mode", ["grad", "jit", "explicit"])
def test_ridge_hypergradient_matches_closed_form(mode):
    solve = lossopt.argmin(LOSS)
    outer = lambda lam: ridge_val(solve(lam, jnp.zeros(D), DATA), VDATA)  # noqa: E731
    if mode == "grad":
        g = jax.grad(outer)(jnp.asarray(LAM))
    elif mode == "jit":
        g = jax.jit(jax.grad(outer))(jnp.asarray(LAM))
    else:
        g = solve.value_and_hypergrad(ridge_val, jnp.asarray(LAM), jnp.zeros(D), DATA, VDATA).grad
    assert rel(g, ridge_hypergrad_closed(LAM)) <= 1e-6


def test_ridge_vmap_over_lambda_batch():
    solve = lossopt.argmin(LOSS)
    lams = np.stack([LAM, LAM * 2.0, LAM[::-1].copy()])
    outer = lambda lam: ridge_val(solve(lam, jnp.zeros(D), DATA), VDATA)  # noqa: E731
    thetas = jax.vmap(lambda l: solve(l, jnp.zeros(D), DATA))(jnp.asarray(lams))
    grads = jax.jit(jax.vmap(jax.grad(outer)))(jnp.asarray(lams))
    for i, lam in enumerate(lams):
        assert rel(thetas[i], ridge_closed(lam)) <= 1e-6
        assert rel(grads[i], ridge_hypergrad_closed(lam)) <= 1e-6


def test_ridge_forward_mode_matches_closed_form():
    solve = lossopt.argmin(LOSS)
    direction = RNG.normal(size=D + 1)
    _, tangent = jax.jvp(lambda l: solve(l, jnp.zeros(D), DATA), (jnp.asarray(LAM),), (jnp.asarray(direction),))
    # d/dt θ*(λ + t v) from the closed form by a central difference of a closed form (exact up to 1e-10)
    h = 1e-5
    fd = (ridge_closed(LAM + h * direction) - ridge_closed(LAM - h * direction)) / (2 * h)
    assert rel(tangent, fd) <= 1e-6
    # forward and reverse agree: vᵀ(∇_λ V) = ∇_θV · θ̇
    g = jax.grad(lambda l: ridge_val(solve(l, jnp.zeros(D), DATA), VDATA))(jnp.asarray(LAM))
    th = ridge_closed(LAM)
    gv = XV.T @ (XV @ th - YV) / len(YV)
    assert abs(float(g @ direction) - float(gv @ tangent)) <= 1e-9 * max(1.0, abs(float(g @ direction)))


def test_data_gradient_is_implicit_and_theta0_gradient_is_zero():
    solve = lossopt.argmin(LOSS)
    lam = jnp.asarray(LAM)
    gy = jax.grad(lambda y: jnp.sum(solve(lam, jnp.zeros(D), (DATA[0], y))))(DATA[1])
    A = LAM[D] * X.T @ X / N + np.diag(LAM[:D])
    expected = LAM[D] * X @ np.linalg.solve(A, np.ones(D)) / N  # ∂(1ᵀθ*)/∂y
    assert rel(gy, expected) <= 1e-6
    g0 = jax.grad(lambda t0: jnp.sum(solve(lam, t0, DATA)))(jnp.ones(D))
    assert np.all(np.asarray(g0) == 0.0)


# ------------------------------------------------------------------ logistic regression vs FD
def _binary_problem(n=300, d=8, seed=1):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    Xs = rng.normal(size=(2 * n, d))
    ys = (Xs @ w + rng.normal(size=2 * n) > 0).astype(float)
    return (jnp.asarray(Xs[:n]), jnp.asarray(ys[:n])), (jnp.asarray(Xs[n:]), jnp.asarray(ys[n:]))


def _logloss(theta, X, y):
    z = X @ theta["w"] + theta["b"]
    return jnp.logaddexp(0.0, z) - y * z


def _central_fd(fun, lam, idx, h):
    """Central differences with one Richardson step: (4·D(h/2) − D(h))/3, error O(h⁴)."""

    def central(i, step):
        e = np.zeros_like(lam)
        e[i] = step
        return (fun(lam + e) - fun(lam - e)) / (2 * step)

    out = []
    for i in idx:
        step = h * (abs(lam[i]) if lam[i] != 0 else 1.0)
        out.append((4 * central(i, step / 2) - central(i, step)) / 3)
    return np.array(out)


def test_logistic_k2_matches_finite_differences():
    train, val = _binary_problem()
    loss = lossopt.LinearLoss(
        lambda th, d: jnp.stack([0.5 * jnp.sum(th["w"] ** 2), jnp.mean(_logloss(th, *d))]), names=["l2", "data"])
    theta0 = {"w": jnp.zeros(8), "b": jnp.zeros(())}
    tight = lossopt.argmin(loss, solver=LBFGS(tol=1e-13, maxiter=5000), linear_solver=CG(tol=1e-13))
    V = lambda th: jnp.mean(_logloss(th, *val))  # noqa: E731
    lam = np.array([0.05, 1.0])
    g = jax.grad(lambda l: V(tight(l, theta0, train)))(jnp.asarray(lam))
    fd = _central_fd(lambda l: float(V(tight(jnp.asarray(l), theta0, train))), lam, range(2), 1e-4)
    np.testing.assert_allclose(g, fd, rtol=1e-5)


def test_per_class_weights_on_digits_with_unpenalized_biases():
    """k = 11 on a digits subset; the Hessian is singular along a common shift of the biases."""
    from lossopt.problems import digits_class_weights

    p = digits_class_weights()
    sub = lambda d, m: (d[0][:m], d[1][:m])  # noqa: E731
    train, val = sub(p.train, 300), sub(p.val, 200)
    tight = lossopt.argmin(p.loss, solver=LBFGS(tol=1e-13, maxiter=5000), linear_solver=CG(tol=1e-13))
    lam = np.array([1.0, 0.7, 1.3, 1.0, 0.9, 1.2, 0.8, 1.1, 1.0, 0.6, 0.01])
    hg = tight.value_and_hypergrad(p.val_loss, jnp.asarray(lam), p.theta0, train, val)
    assert bool(hg.adjoint_info.converged)
    fd = _central_fd(lambda l: float(p.val_loss(tight(jnp.asarray(l), p.theta0, train), val)), lam, range(11), 1e-3)
    np.testing.assert_allclose(hg.grad, fd, rtol=1e-5)


def test_per_example_weights_sampled_coordinates():
    """k = n = 2000 per-example weights plus an L2 weight: FD on a few sampled coordinates."""
    n = 2000
    train, val = _binary_problem(n=n, d=10, seed=3)

    def features(th, d):
        X, y = d
        return jnp.concatenate([_logloss(th, X, y) / X.shape[0], 0.5 * jnp.sum(th["w"] ** 2)[None]])

    loss = lossopt.LinearLoss(features)
    theta0 = {"w": jnp.zeros(10), "b": jnp.zeros(())}
    tight = lossopt.argmin(loss, solver=LBFGS(tol=1e-13, maxiter=5000), linear_solver=CG(tol=1e-13))
    V = lambda th: jnp.mean(_logloss(th, *val))  # noqa: E731
    lam = np.concatenate([np.random.default_rng(0).uniform(0.5, 1.5, size=n), [0.01]])
    g = np.asarray(jax.grad(lambda l: V(tight(l, theta0, train)))(jnp.asarray(lam)))
    idx = [0, 17, 512, 1999, n]
    fd = _central_fd(lambda l: float(V(tight(jnp.asarray(l), theta0, train))), lam, idx, 1e-3)
    np.testing.assert_allclose(g[idx], fd, rtol=1e-5)


# ------------------------------------------------------------------ convergence reporting
def test_capped_solve_reports_unconverged_in_info_and_warning():
    solve = lossopt.argmin(LOSS, solver=LBFGS(maxiter=2))
    with pytest.warns(lossopt.ConvergenceWarning, match="inner solve did not converge"):
        _, info = solve.with_info(jnp.asarray(LAM), jnp.zeros(D), DATA)
        jax.effects_barrier()
    assert not bool(info.converged) and int(info.steps) == 2 and float(info.residual) > float(info.tol)


def test_unconverged_surfaces_through_grad_under_jit():
    solve = lossopt.argmin(LOSS, solver=LBFGS(maxiter=2))
    f = jax.jit(jax.grad(lambda l: ridge_val(solve(l, jnp.zeros(D), DATA), VDATA)))
    with pytest.warns(lossopt.ConvergenceWarning):
        f(jnp.asarray(LAM)).block_until_ready()
        jax.effects_barrier()


def test_unconverged_adjoint_is_reported_in_reverse_mode():
    solve = lossopt.argmin(LOSS, linear_solver=CG(maxiter=1))
    with pytest.warns(lossopt.ConvergenceWarning, match="adjoint solve did not converge"):
        jax.grad(lambda l: ridge_val(solve(l, jnp.zeros(D), DATA), VDATA))(jnp.asarray(LAM))
        jax.effects_barrier()


def test_raise_mode_raises_and_ignore_mode_is_quiet():
    solve = lossopt.argmin(LOSS, solver=LBFGS(maxiter=2), on_unconverged="raise")
    with pytest.raises(RuntimeError, match="did not converge"):
        jax.block_until_ready(solve.with_info(jnp.asarray(LAM), jnp.zeros(D), DATA))
        jax.effects_barrier()
    quiet = lossopt.argmin(LOSS, solver=LBFGS(maxiter=2), on_unconverged="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error", lossopt.ConvergenceWarning)
        _, info = quiet.with_info(jnp.asarray(LAM), jnp.zeros(D), DATA)
        jax.effects_barrier()
    assert not bool(info.converged)


def test_nonfinite_lambda_inside_jit_is_reported_through_info():
    solve = lossopt.argmin(LOSS, on_unconverged="ignore")
    _, info = jax.jit(solve.with_info)(jnp.asarray(LAM).at[1].set(jnp.nan), jnp.zeros(D), DATA)
    assert not bool(info.converged) and not np.isfinite(float(info.residual))


# ------------------------------------------------------------------ bad input
def test_bad_input_errors_name_the_problem():
    solve = lossopt.argmin(LOSS)
    with pytest.raises(ValueError, match=r"length k=6.*got shape \(3,\)"):
        solve(jnp.ones(3), jnp.zeros(D), DATA)
    with pytest.raises(ValueError, match=r"lam\[2\].*nan"):
        solve(jnp.asarray(LAM).at[2].set(jnp.nan), jnp.zeros(D), DATA)
    with pytest.raises(ValueError, match=r"lam\[0\].*inf"):
        solve(jnp.asarray(LAM).at[0].set(jnp.inf), jnp.zeros(D), DATA)
    bad = lossopt.argmin(lossopt.LinearLoss(lambda w, d: jnp.outer(w, w)))
    with pytest.raises(ValueError, match=r"1-D array of length k.*shape \(5, 5\)"):
        bad(jnp.ones(5), jnp.zeros(D), DATA)
    named = lossopt.argmin(lossopt.LinearLoss(ridge_features, names=["a", "b"]))
    with pytest.raises(ValueError, match="6 components but 2 names"):
        named(jnp.ones(2), jnp.zeros(D), DATA)
    with pytest.raises(ValueError, match="on_unconverged"):
        lossopt.argmin(LOSS, on_unconverged="loud")
    with pytest.raises(ValueError, match="duplicate feature names"):
        lossopt.LinearLoss(ridge_features, names=["a", "a"])
