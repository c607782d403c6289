"""Nonsmooth terms: prox operators, FISTA, and the implicit derivative of the proximal fixed point.

References: closed forms on the support (Lasso, weighted Lasso), scikit-learn's ElasticNet,
central finite differences where the active set is stable (L1 + L2 logistic, group lasso).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

import lossopt  # noqa: E402
from lossopt.linear import CG  # noqa: E402
from lossopt.prox import GroupL2, L1, group_l2, l1  # noqa: E402
from lossopt.proxgrad import FISTA  # noqa: E402
from test_implicit import _central_fd  # noqa: E402  (central differences with a Richardson step)

RNG = np.random.default_rng(0)
N, D = 80, 8
X = RNG.normal(size=(N, D))
W_TRUE = np.array([1.5, -2.0, 0.8, 0.0, 0.0, 0.4, 0.0, 0.0])
Y = X @ W_TRUE + 0.5 * RNG.normal(size=N)
XV = RNG.normal(size=(40, D))
YV = XV @ W_TRUE + 0.5 * RNG.normal(size=40)
TRAIN, VAL = (jnp.asarray(X), jnp.asarray(Y)), (jnp.asarray(XV), jnp.asarray(YV))
C = X.T @ Y / N  # X_Aᵀy/n
Q = X.T @ X / N  # XᵀX/n


def sq_val(w, data):
    X, y = data
    return 0.5 * jnp.mean((X @ w - y) ** 2)


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def lasso_closed(lam1, data_w=1.0):
    """θ*, and ∂θ*/∂λ_j on the support, for ½·mean r²·data_w + Σ_j lam1_j |θ_j| (lam1 per coordinate).

    The support and signs come from the KKT conditions checked here: θ_A = Q_AA⁻¹(c_A − λ_A s_A/w)
    with |c_j − Q_jA θ_A| < λ_j/w off A (strictly: the active set is stable)."""
    lam1 = np.broadcast_to(lam1, (D,)).astype(float)
    theta = np.asarray(lossopt.argmin(LASSO_W)(jnp.concatenate([jnp.asarray(lam1), jnp.array([data_w])]),
                                               jnp.zeros(D), TRAIN))
    A = np.flatnonzero(theta)
    s = np.sign(theta[A])
    QA = Q[np.ix_(A, A)]
    th = np.zeros(D)
    th[A] = np.linalg.solve(QA, C[A] - lam1[A] * s / data_w)
    off = np.setdiff1d(np.arange(D), A)
    corr = np.abs(C[off] - Q[np.ix_(off, A)] @ th[A])
    assert np.all(corr < lam1[off] / data_w - 1e-6), "test data: active set not strictly stable"
    assert np.all(np.sign(th[A]) == s)
    dth = np.zeros((D, D + 1))  # columns: λ_1..λ_D, data weight
    QAinv = np.linalg.inv(QA)
    dth[np.ix_(A, A)] = -QAinv * s[None, :] / data_w
    dth[A, D] = QAinv @ (lam1[A] * s) / data_w**2
    return th, dth


def hypergrad_closed(lam1, data_w=1.0):
    th, dth = lasso_closed(lam1, data_w)
    gv = XV.T @ (XV @ th - YV) / len(YV)
    return th, gv @ dth


# weighted Lasso: k = d + 1, one λ_j per coordinate
def weighted_features(w, data):
    X, y = data
    return jnp.concatenate([jnp.abs(w), jnp.array([0.5 * jnp.mean((X @ w - y) ** 2)])])


LASSO_W = lossopt.LinearLoss(weighted_features, prox={range(D): l1})


# plain Lasso: k = 2
def lasso_features(w, data):
    X, y = data
    return jnp.stack([l1().value(w), 0.5 * jnp.mean((X @ w - y) ** 2)])


LASSO = lossopt.LinearLoss(lasso_features, names=["l1", "data"], prox={"l1": lossopt.prox.l1})
LAM_W = np.concatenate([np.linspace(0.05, 0.25, D), [1.0]])


def test_argmin_picks_fista_for_prox_losses():
    solve = lossopt.argmin(LASSO)
    assert isinstance(solve.solver, FISTA)
    assert isinstance(lossopt.argmin(lossopt.LinearLoss(weighted_features)).solver, lossopt.solvers.LBFGS)


@pytest.mark.parametrize("mode", ["grad", "jit", "hypergrad"])
def test_lasso_k2_matches_closed_form(mode):
    solve = lossopt.argmin(LASSO)
    lam = jnp.array([0.1, 1.0])
    theta, info = solve.with_info(lam, jnp.zeros(D), TRAIN)
    assert bool(info.converged) and float(info.residual) <= 1e-10
    th, g_per_coord = hypergrad_closed(0.1)
    assert rel(theta, th) <= 1e-6
    expected = np.array([g_per_coord[:D].sum(), g_per_coord[D]])  # λ1 weights every coordinate
    outer = lambda l: sq_val(solve(l, jnp.zeros(D), TRAIN), VAL)  # noqa: E731
    if mode == "grad":
        g = jax.grad(outer)(lam)
    elif mode == "jit":
        g = jax.jit(jax.grad(outer))(lam)
    else:
        g = solve.value_and_hypergrad(sq_val, lam, jnp.zeros(D), TRAIN, VAL).grad
    assert rel(g, expected) <= 1e-6


def test_lasso_forward_mode_matches_closed_form():
    solve = lossopt.argmin(LASSO)
    lam, direction = jnp.array([0.1, 1.0]), np.array([0.7, -0.3])
    _, tangent = jax.jvp(lambda l: solve(l, jnp.zeros(D), TRAIN), (lam,), (jnp.asarray(direction),))
    _, dth = lasso_closed(0.1)
    expected = dth[:, :D].sum(1) * direction[0] + dth[:, D] * direction[1]
    assert rel(tangent, expected) <= 1e-6
    assert np.all(np.asarray(tangent)[np.asarray(solve(lam, jnp.zeros(D), TRAIN)) == 0] == 0)


def test_weighted_lasso_k_d_plus_1_matches_closed_form_grad_jit_vmap():
    solve = lossopt.argmin(LASSO_W)
    outer = lambda l: sq_val(solve(l, jnp.zeros(D), TRAIN), VAL)  # noqa: E731
    th, expected = hypergrad_closed(LAM_W[:D])
    assert rel(solve(jnp.asarray(LAM_W), jnp.zeros(D), TRAIN), th) <= 1e-6
    assert rel(jax.grad(outer)(jnp.asarray(LAM_W)), expected) <= 1e-6
    # vmap over a batch of λ whose supports differ (masks, not slices)
    lams = np.stack([LAM_W, np.r_[LAM_W[:D] * 0.5, 1.0], np.r_[LAM_W[:D] * 1.5, 1.0]])
    grads = jax.jit(jax.vmap(jax.grad(outer)))(jnp.asarray(lams))
    thetas = jax.vmap(lambda l: solve(l, jnp.zeros(D), TRAIN))(jnp.asarray(lams))
    supports = {tuple(np.flatnonzero(np.asarray(t))) for t in thetas}
    assert len(supports) > 1
    for i, lam in enumerate(lams):
        th, expected = hypergrad_closed(lam[:D])
        assert rel(thetas[i], th) <= 1e-6
        assert rel(grads[i], expected) <= 1e-6
    # forward mode in a per-coordinate direction
    v = RNG.normal(size=D + 1)
    _, tangent = jax.jvp(lambda l: solve(l, jnp.zeros(D), TRAIN), (jnp.asarray(LAM_W),), (jnp.asarray(v),))
    assert rel(tangent, lasso_closed(LAM_W[:D])[1] @ v) <= 1e-6


def test_elastic_net_matches_sklearn():
    from sklearn.linear_model import ElasticNet

    def features(w, data):
        X, y = data
        return jnp.stack([jnp.sum(jnp.abs(w)), 0.5 * jnp.sum(w**2), 0.5 * jnp.mean((X @ w - y) ** 2)])

    solve = lossopt.argmin(lossopt.LinearLoss(features, names=["l1", "l2", "data"], prox={"l1": l1}))
    for lam1, lam2 in [(0.1, 0.05), (0.3, 1.0), (0.02, 0.001)]:
        theta = solve(jnp.array([lam1, lam2, 1.0]), jnp.zeros(D), TRAIN)
        # sklearn: 1/(2n)‖y − Xw‖² + α·ρ‖w‖₁ + ½α(1 − ρ)‖w‖²  ⇒  α = λ1 + λ2, ρ = λ1/α
        ref = ElasticNet(alpha=lam1 + lam2, l1_ratio=lam1 / (lam1 + lam2), fit_intercept=False,
                         tol=1e-14, max_iter=100_000).fit(X, Y).coef_
        assert np.array_equal(np.asarray(theta) == 0, ref == 0)
        assert rel(theta, ref) <= 1e-6
    # plain FISTA (no Newton steps on the active set) reaches the same solution
    plain = lossopt.argmin(solve.loss, solver=FISTA(newton_every=0))
    theta, info = plain.with_info(jnp.array([lam1, lam2, 1.0]), jnp.zeros(D), TRAIN)
    assert bool(info.converged) and rel(theta, ref) <= 1e-6


# ------------------------------------------------------------------ L1 + L2 logistic vs FD
def _binary(n=200, d=12, seed=1):
    rng = np.random.default_rng(seed)
    w = np.where(rng.random(d) < 0.4, rng.normal(size=d) * 2, 0.0)
    Xs = rng.normal(size=(2 * n, d))
    ys = (Xs @ w + 0.5 + rng.normal(size=2 * n) > 0).astype(float)
    return (jnp.asarray(Xs[:n]), jnp.asarray(ys[:n])), (jnp.asarray(Xs[n:]), jnp.asarray(ys[n:]))


def _logloss(th, X, y):
    z = X @ th["w"] + th["b"]
    return jnp.logaddexp(0.0, z) - y * z


def test_l1_l2_logistic_matches_finite_differences_bias_unpenalized():
    train, val = _binary()

    def features(th, d):
        return jnp.stack([jnp.sum(jnp.abs(th["w"])), 0.5 * jnp.sum(th["w"] ** 2), jnp.mean(_logloss(th, *d))])

    loss = lossopt.LinearLoss(features, names=["l1", "l2", "data"], prox={"l1": l1(on="w")})
    tight = lossopt.argmin(loss, solver=FISTA(tol=1e-13), linear_solver=CG(tol=1e-13))
    theta0 = {"w": jnp.zeros(12), "b": jnp.zeros(())}
    V = lambda th: jnp.mean(_logloss(th, *val))  # noqa: E731
    lam = np.array([0.02, 0.01, 1.0])
    solve = jax.jit(lambda l: tight(l, theta0, train))
    th = solve(jnp.asarray(lam))
    assert float(th["b"]) != 0.0  # the bias is not thresholded
    support = np.asarray(th["w"]) != 0
    assert 0 < support.sum() < 12
    h = 1e-3
    for i in range(3):  # the active set is the same at every finite-difference point
        for step in (-h, h):
            e = np.zeros(3)
            e[i] = step * lam[i]
            assert np.array_equal(np.asarray(solve(jnp.asarray(lam + e))["w"]) != 0, support)
    g = jax.grad(lambda l: V(tight(l, theta0, train)))(jnp.asarray(lam))
    fd = _central_fd(lambda l: float(V(solve(jnp.asarray(l)))), lam, range(3), h)
    np.testing.assert_allclose(g, fd, rtol=1e-5)
    # d/dλ1 of the fixed point is −sign(θ_A) through the reduced Hessian: reverse = forward
    _, tangent = jax.jvp(lambda l: tight(l, theta0, train), (jnp.asarray(lam),), (jnp.array([1.0, 0, 0]),))
    gv = jax.grad(V)(th)
    assert abs(float(g[0]) - float(jnp.vdot(gv["w"], tangent["w"]) + gv["b"] * tangent["b"])) <= 1e-9


# ------------------------------------------------------------------ group lasso
GROUPS = np.repeat(np.arange(4), 2)  # 4 groups of 2 coordinates


def group_features(w, data):
    X, y = data
    return jnp.concatenate([group_l2(GROUPS).values(w), jnp.array([0.5 * jnp.mean((X @ w - y) ** 2)])])


def test_group_lasso_matches_finite_differences_and_has_no_nan_at_a_zero_group():
    loss = lossopt.LinearLoss(group_features, prox={range(4): group_l2(GROUPS)})
    tight = lossopt.argmin(loss, solver=FISTA(tol=1e-13), linear_solver=CG(tol=1e-13))
    lam = np.array([0.05, 0.1, 0.3, 0.4, 1.0])
    solve = jax.jit(lambda l: tight(l, jnp.zeros(D), TRAIN))
    th = np.asarray(solve(jnp.asarray(lam)))
    active = np.array([np.any(th[GROUPS == g] != 0) for g in range(4)])
    assert active.any() and not active.all()  # at least one group exactly at zero
    V = lambda w: sq_val(w, VAL)  # noqa: E731
    g = jax.grad(lambda l: V(tight(l, jnp.zeros(D), TRAIN)))(jnp.asarray(lam))
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[:4][~active] == 0)
    h = 1e-3
    for i in range(5):
        for step in (-h, h):
            e = np.zeros(5)
            e[i] = step * lam[i]
            t = np.asarray(solve(jnp.asarray(lam + e)))
            assert np.array_equal([np.any(t[GROUPS == k] != 0) for k in range(4)], active)
    fd = _central_fd(lambda l: float(V(solve(jnp.asarray(l)))), lam, range(5), h)
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-12)
    hg = tight.value_and_hypergrad(sq_val, jnp.asarray(lam), jnp.zeros(D), TRAIN, VAL)
    np.testing.assert_allclose(hg.grad, g, rtol=1e-8, atol=1e-14)
    # the feature values have a finite derivative at a zero group (jnp.linalg.norm's is NaN)
    jac = jax.jacfwd(lambda w: group_l2(GROUPS).values(w))(jnp.zeros(D))
    assert np.all(np.asarray(jac) == 0)


# ------------------------------------------------------------------ kinks
def test_kink_returns_the_one_sided_derivative_of_the_zero_branch():
    """Coordinate j exactly at its threshold: θ_j = 0 and |∂_j f_sm| = λ_j. θ*(λ) has a kink;
    lossopt returns the derivative of the piece on which θ_j stays at zero (finite, not NaN),
    which equals the one-sided derivative for λ_j increasing."""
    solve = lossopt.argmin(LASSO_W)
    lam = LAM_W.copy()
    th = np.asarray(solve(jnp.asarray(lam), jnp.zeros(D), TRAIN))
    j = int(np.flatnonzero(th == 0)[0])
    lam[j] = abs(C[j] - Q[j] @ th)  # lower λ_j to exactly the correlation: the kink
    th_kink = np.asarray(solve(jnp.asarray(lam), jnp.zeros(D), TRAIN))
    assert th_kink[j] == 0 and rel(th_kink, th) <= 1e-8
    g = np.asarray(jax.grad(lambda l: sq_val(solve(l, jnp.zeros(D), TRAIN), VAL))(jnp.asarray(lam)))
    assert np.all(np.isfinite(g)) and g[j] == 0
    # the zero branch: the closed form on the support without j (λ_j enters nowhere)
    A = np.flatnonzero(th_kink)
    s = np.sign(th_kink[A])
    QAinv = np.linalg.inv(Q[np.ix_(A, A)])
    gv = XV.T @ (XV @ th_kink - YV) / len(YV)
    expected = np.zeros(D + 1)
    expected[A] = -(gv[A] @ QAinv) * s
    expected[D] = gv[A] @ QAinv @ (lam[A] * s)
    assert rel(g, expected) <= 1e-6
    # one-sided finite differences: λ_j up stays on the zero branch (slope g[j] = 0); λ_j down
    # leaves it, with the slope of the piece where j is active (closed form on A ∪ {j})
    tight = lossopt.argmin(LASSO_W, solver=FISTA(tol=1e-13))
    V = lambda l: float(sq_val(tight(jnp.asarray(l), jnp.zeros(D), TRAIN), VAL))  # noqa: E731
    e = np.zeros(D + 1)
    e[j] = 1e-4
    up, down = (V(lam + e) - V(lam)) / 1e-4, (V(lam) - V(lam - e)) / 1e-4
    B = np.sort(np.r_[A, j])
    sB = np.sign(np.where(B == j, C[j] - Q[j] @ th_kink, th_kink[B]))
    active_slope = -(gv[B] @ np.linalg.inv(Q[np.ix_(B, B)]))[B == j][0] * sB[B == j][0]
    assert abs(up - g[j]) <= 1e-7
    assert abs(active_slope) > 1e-3 and abs(down - active_slope) <= 1e-2 * abs(active_slope)
    # the prox derivatives themselves are 0 at the threshold
    assert float(L1.prox_jvp(jnp.array(0.3), 0.3, jnp.array(1.0))) == 0.0
    z = jnp.array([0.6, 0.8])  # ‖z‖ = 1 = t
    assert np.all(np.asarray(GroupL2.prox_jvp(z, jnp.array([1.0]), jnp.array([0, 0]), 1, jnp.ones(2))) == 0)


# ------------------------------------------------------------------ prox operators
def test_prox_operators_and_their_derivatives():
    z = jnp.array([1.5, -0.2, 0.05, -3.0, 0.7, 0.0])
    t = jnp.array([0.5, 0.5, 0.5, 1.0, 0.1, 0.2])
    np.testing.assert_array_equal(L1.prox(z, t), [1.0, 0.0, 0.0, -2.0, 0.6, 0.0])
    gid, tg = jnp.array([0, 0, 1, 1, 2, 2]), jnp.array([0.5, 4.0, 0.3])
    p = GroupL2.prox(z, tg, gid, 3)
    n0 = float(jnp.linalg.norm(z[:2]))
    np.testing.assert_allclose(p[:2], (1 - 0.5 / n0) * z[:2], rtol=1e-14)
    assert np.all(np.asarray(p[2:4]) == 0)
    v = jnp.asarray(RNG.normal(size=6))
    for prox, jvp in ((lambda z: L1.prox(z, t), lambda z, v: L1.prox_jvp(z, t, v)),
                      (lambda z: GroupL2.prox(z, tg, gid, 3), lambda z, v: GroupL2.prox_jvp(z, tg, gid, 3, v))):
        np.testing.assert_allclose(jvp(z, v), jax.jvp(prox, (z,), (v,))[1], rtol=1e-12, atol=1e-15)
    # a term acts on one leaf only: the bias stays unpenalized
    theta = {"b": jnp.array(-2.0), "w": jnp.array([0.3, -0.1])}
    assert float(l1(on="w").value(theta)) == pytest.approx(0.4)
    pen = lossopt.prox.Penalty({"l1": l1(on="w")}, theta, 2, ["l1", "data"])
    out = pen.prox(jnp.array([1.0, 0.0]), jnp.array([-2.0, 0.3, -0.1]), 1.0)  # flat order: b, w
    np.testing.assert_allclose(out, [-2.0, 0.0, 0.0])


# ------------------------------------------------------------------ reporting and bad input
def test_unconverged_fista_is_reported():
    solve = lossopt.argmin(LASSO, solver=FISTA(maxiter=2))
    with pytest.warns(lossopt.ConvergenceWarning, match="inner solve did not converge"):
        _, info = solve.with_info(jnp.array([0.1, 1.0]), jnp.zeros(D), TRAIN)
        jax.effects_barrier()
    assert not bool(info.converged) and int(info.steps) == 2 and np.isfinite(float(info.residual))
    quiet = lossopt.argmin(LASSO, solver=FISTA(maxiter=2), on_unconverged="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error", lossopt.ConvergenceWarning)
        quiet.with_info(jnp.array([0.1, 1.0]), jnp.zeros(D), TRAIN)
        jax.effects_barrier()


def test_unsafe_norm_in_features_is_a_clear_error():
    def features(w, data):
        X, y = data
        return jnp.stack([jnp.linalg.norm(w[:2]) + jnp.linalg.norm(w[2:]), 0.5 * jnp.mean((X @ w - y) ** 2)])

    loss = lossopt.LinearLoss(features, names=["g", "data"], prox={"g": group_l2(size=4)})
    with pytest.raises(ValueError, match=r"NaN.*\.values\(theta\)|\.value\(theta\).*NaN"):
        lossopt.argmin(loss)(jnp.array([0.1, 1.0]), jnp.zeros(D), TRAIN)


def test_bad_prox_specs_name_the_problem():
    theta = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    with pytest.raises(TypeError, match=r"prox\['l1'\] must be a lossopt.prox term"):
        lossopt.LinearLoss(weighted_features, names=["l1", "data"], prox={"l1": 0.5})
    with pytest.raises(ValueError, match="exactly one of groups= .* or size="):
        group_l2()
    with pytest.raises(ValueError, match=r"on='v' matches no leaf of theta; its leaves are \['b', 'w'\]"):
        lossopt.prox.Penalty({"l1": l1(on="v")}, theta, 2, ["l1", "data"])
    with pytest.raises(ValueError, match="act on the same parameters"):
        lossopt.prox.Penalty({"a": l1(on="w"), "b": l1()}, theta, 3, ["a", "b", "data"])
    with pytest.raises(ValueError, match="acts on 3 coordinates.*names 2"):
        lossopt.prox.Penalty({("a", "b"): l1(on="w")}, theta, 3, ["a", "b", "data"])
    with pytest.raises(ValueError, match="'c' is not a feature name"):
        lossopt.prox.Penalty({"c": l1()}, theta, 2, ["a", "data"])
    with pytest.raises(TypeError, match="inner solver must handle them"):
        lossopt.argmin(LASSO, solver=lossopt.solvers.LBFGS())
