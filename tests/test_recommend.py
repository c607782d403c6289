"""The black-box recommender: LearnLinReg recovery, feasibility, distinctness, a finite pool of
models, bad input, determinism."""

import numpy as np
import pytest

from lossopt.blackbox import linreg
from lossopt.blackbox.local import local_step
from lossopt.blackbox.recommend import learn_linreg, normalize, pair_lams, recommend
from lossopt.blackbox.space import design
from lossopt.constraints import box, fixed, nonnegative, simplex

K = 6
CONSTRAINTS = {
    "nonnegative": nonnegative(),
    "fixed": nonnegative() & fixed({"c0": 1.0}),
    "box": box(0.01, 10.0),
    "simplex": simplex(),
    "box-fixed": box(0.0, 5.0) & fixed({"c2": 2.0}),
    "signed": box(-3.0, 3.0) & fixed({"c0": 1.0}),
    "simplex-capped": simplex(total=2.0) & box(0.0, 0.6),
}


def bind(name, k=K):
    return CONSTRAINTS[name].bind(k, [f"c{j}" for j in range(k)])


def up_to_scale(a, b):
    return np.max(np.abs(a / np.abs(a).sum() - b / np.abs(b).sum()))


def perfect_data(bound, rng, m):
    """v = c·λ*·f + const exactly, features on very different scales, negative values."""
    lam = normalize(bound.project(rng.uniform(0.2, 2.0, bound.k)), bound)
    lam = np.asarray(lam)
    F = rng.normal(size=(m, bound.k)) * np.logspace(-2, 2, bound.k) + 3.0
    return lam, F, 2.5 * F @ lam - 40.0


@pytest.mark.parametrize("name", ["nonnegative", "fixed", "box", "simplex"])
def test_perfect_linear_loss_is_recovered_from_k_plus_1_observations(name):
    bound = bind(name)
    rng = np.random.default_rng(1)
    for _ in range(3):
        lam, F, v = perfect_data(bound, rng, K + 1)
        fit = learn_linreg(F, v, bound)
        assert fit is not None and fit.exact
        assert up_to_scale(fit.lam, lam) < 1e-6
        assert fit.index == int(np.argmin(v))
        assert abs(fit.slack) < 1e-6 * np.ptp(v)
        # λ·f_i >= α v_i + β holds with equality everywhere for a perfect fit
        np.testing.assert_allclose(F @ fit.lam, fit.alpha * v + fit.beta,
                                   atol=1e-6 * np.abs(F @ fit.lam).max())
        if name == "fixed":
            assert fit.lam[0] == 1.0 and np.max(np.abs(fit.lam - lam)) < 1e-6 * lam.max()


def test_recovery_does_not_depend_on_row_order_or_duplicates():
    bound = bind("fixed")
    rng = np.random.default_rng(2)
    lam, F, v = perfect_data(bound, rng, K + 1)
    perm = rng.permutation(K + 1)
    F2, v2 = np.vstack([F[perm], F[:2]]), np.concatenate([v[perm], v[:2]])
    fit = learn_linreg(F2, v2, bound)
    assert up_to_scale(fit.lam, lam) < 1e-6
    assert v2[fit.index] == v.min()


def test_constraint_generation_gives_the_full_lp_answer(monkeypatch):
    bound = bind("nonnegative", k=12)
    rng = np.random.default_rng(3)
    F = rng.normal(size=(80, 12))
    v = F @ rng.uniform(0, 1, 12) + 0.3 * rng.normal(size=80)
    full = learn_linreg(F, v, bound, center=False)
    monkeypatch.setattr(linreg, "FULL_LP_SIZE", 0)
    monkeypatch.setattr(linreg, "CG_START", 4)
    monkeypatch.setattr(linreg, "CG_STEP", 3)
    reduced = learn_linreg(F, v, bound, center=False)
    assert reduced.exact and reduced.index == full.index
    assert reduced.slack == pytest.approx(full.slack, rel=1e-7)


@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
@pytest.mark.parametrize("m", [0, 1, 3, K + 4])
def test_recommendations_are_feasible_normalized_and_distinct(name, m):
    bound = bind(name)
    rng = np.random.default_rng(4)
    F = rng.normal(size=(m, K)) + 2.0
    v = F @ rng.uniform(0, 1, K) + 0.1 * rng.normal(size=m)
    avoid = design(bound, np.random.default_rng(5), 3)
    out = recommend(F, v, bound, rng=rng, n=5, avoid=avoid)
    assert out.shape == (5, K)
    rows = np.vstack([avoid, out])
    for i, lam in enumerate(out):
        bound.check(lam)
        np.testing.assert_allclose(normalize(lam, bound), lam, rtol=1e-12)
    for i in range(len(avoid), len(rows)):
        for j in range(i):
            assert not np.allclose(rows[i], rows[j], rtol=1e-6, atol=0), (i, j)


def test_normalize():
    cone = bind("nonnegative")
    np.testing.assert_allclose(normalize([1.0, 3.0, 0, 0, 0, 4.0], cone),
                               [0.125, 0.375, 0, 0, 0, 0.5])
    signed_cone = box(-np.inf, np.inf).bind(3)
    np.testing.assert_allclose(normalize([[-1.0, 3.0, 0.0]], signed_cone), [[-0.25, 0.75, 0.0]])
    pinned = bind("fixed")
    np.testing.assert_array_equal(normalize([1.0, 3.0, 0, 0, 0, 4.0], pinned),
                                  [1.0, 3.0, 0, 0, 0, 4.0])
    with pytest.raises(ValueError, match="nonzero"):
        normalize(np.zeros(K), cone)


def test_avoid_is_compared_after_normalization():
    bound = bind("nonnegative")
    rng = np.random.default_rng(6)
    lam, F, v = perfect_data(bound, rng, K + 1)
    first = recommend(F, v, bound, rng=np.random.default_rng(0))[0]
    assert up_to_scale(first, lam) < 1e-6  # the LP's answer when nothing is avoided
    again = recommend(F, v, bound, rng=np.random.default_rng(0), avoid=[7.0 * first])[0]
    assert up_to_scale(again, lam) > 1e-4  # 7λ is λ: something else is proposed


def test_single_point_constraint_is_refused():
    with pytest.raises(ValueError, match="single"):
        recommend(np.zeros((0, 2)), [], fixed({0: 1.0, 1: 2.0}).bind(2),
                  rng=np.random.default_rng(0))


def test_initial_design_is_log_uniform_within_bounds():
    bound = bind("fixed")
    X = design(bound, np.random.default_rng(0), 4000)
    assert np.all(X[:, 0] == 1.0) and np.all(X[:, 1:] > 0)
    logs = np.log10(X[:, 1:])
    assert logs.min() >= -3 and logs.max() <= 3
    assert np.mean(logs) == pytest.approx(0.0, abs=0.05)  # centred on the fixed scale
    assert np.mean(np.abs(logs) < 1.5) == pytest.approx(0.5, abs=0.03)  # uniform in log
    boxed = design(bind("box"), np.random.default_rng(0), 4000)
    assert boxed.min() >= 0.01 and boxed.max() <= 10.0


def test_deterministic_for_a_seed():
    bound = bind("fixed")
    rng = np.random.default_rng(7)
    F = rng.normal(size=(5, K))
    v = rng.normal(size=5)
    a = recommend(F, v, bound, rng=np.random.default_rng(3), n=4)
    b = recommend(F, v, bound, rng=np.random.default_rng(3), n=4)
    c = recommend(F[:0], v[:0], bound, rng=np.random.default_rng(4), n=4)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def sphere_pool(rng, n_models, k, noise):
    """Models whose features lie on a sphere's lower orthant: every model is the minimizer of
    λ·f for λ = its direction, so the argmin over the pool is exact and every model achievable."""
    U = np.abs(rng.normal(size=(n_models, k)))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    F = 2.0 - U
    lam_true = rng.uniform(0, 1, k) ** 2
    v = F @ lam_true / lam_true.sum() + noise * rng.normal(size=n_models)
    return F, v


def trainings_to_best(F, v, bound, rng, propose, budget):
    best = v.min()
    feats, vals, tried = [], [], []
    for t in range(1, budget + 1):
        lam = propose(np.array(feats).reshape(-1, F.shape[1]), np.array(vals), rng, tried)
        tried.append(lam)
        i = int(np.argmin(F @ lam))
        feats.append(F[i]), vals.append(v[i])
        if v[i] <= best:
            return t
    return budget + 1


def test_finite_pool_reaches_the_best_model_faster_than_random_search():
    k, bound = 8, nonnegative().bind(8)
    ours, rand = [], []
    for seed in range(5):
        F, v = sphere_pool(np.random.default_rng(100 + seed), 400, k, noise=0.002)
        ours.append(trainings_to_best(
            F, v, bound, np.random.default_rng(seed),
            lambda f, y, r, tried: recommend(f, y, bound, rng=r, avoid=tried or None)[0], 200))
        rand.append(trainings_to_best(
            F, v, bound, np.random.default_rng(seed),
            lambda f, y, r, tried: design(bound, r, 1)[0], 200))
    assert max(ours) <= 200  # every run reached the pool's best model
    assert np.median(ours) < np.median(rand)


def test_bad_input_names_row_and_column():
    bound = bind("fixed")
    rng = np.random.default_rng(0)
    F = np.ones((4, K))
    v = np.arange(4.0)
    F_nan = F.copy()
    F_nan[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"features row 2, column 3 \('c3'\)"):
        recommend(F_nan, v, bound, rng=rng)
    F_inf = F.copy()
    F_inf[1, 0] = -np.inf
    with pytest.raises(ValueError, match="row 1, column 0"):
        learn_linreg(F_inf, v, bound)
    with pytest.raises(ValueError, match="values row 3"):
        recommend(F, [0.0, 1.0, 2.0, np.inf], bound, rng=rng)
    with pytest.raises(ValueError, match="5 columns .* k = 6"):
        recommend(np.ones((4, 5)), v, bound, rng=rng)
    with pytest.raises(ValueError, match="4 rows but values has 3"):
        recommend(F, v[:3], bound, rng=rng)
    with pytest.raises(ValueError, match="row 1 has length 5"):
        recommend([[1.0] * K, [1.0] * 5], [0.0, 1.0], bound, rng=rng)
    with pytest.raises(ValueError, match="avoid row 0, column 1"):
        recommend(F, v, bound, rng=rng, avoid=[[1.0, np.nan, 1, 1, 1, 1]])
    with pytest.raises(TypeError, match="numeric"):
        recommend([["a"] * K], [0.0], bound, rng=rng)
    with pytest.raises(TypeError, match="Generator"):
        recommend(F, v, bound, rng=0)
    with pytest.raises(TypeError, match="BoundConstraint"):
        recommend(F, v, nonnegative(), rng=rng)
    with pytest.raises(ValueError, match="positive integer"):
        recommend(F, v, bound, rng=rng, n=0)


def test_local_steps_descend_a_smooth_bowl_in_log_coordinates():
    """v = Σ_j (log λ_j − log c_j)²: the trust region reaches the minimum from far away."""
    bound = (nonnegative() & fixed({0: 1.0})).bind(5)
    c = np.array([1.0, 0.01, 3.0, 0.2, 50.0])
    value = lambda lam: float(np.sum(np.log(lam[1:] / c[1:]) ** 2))  # noqa: E731
    rng = np.random.default_rng(0)
    lams = [np.ones(5)]
    vals = [value(lams[0])]
    for _ in range(60):
        lam = local_step(np.array(lams), np.array(vals), bound, rng)
        if lam is None:
            break
        bound.check(lam)
        lams.append(lam), vals.append(value(lam))
    assert vals[0] > 30 and min(vals) < 1e-2


def test_pair_lams_recovers_which_lambda_trained_which_model():
    rng = np.random.default_rng(8)
    U = np.abs(rng.normal(size=(50, 4)))
    F = 2.0 - U / np.linalg.norm(U, axis=1, keepdims=True)
    tried = [np.abs(rng.normal(size=4)) for _ in range(6)]
    rows = [int(np.argmin(F @ t)) for t in tried]
    obs = sorted(set(rows))
    paired = pair_lams(F[obs], tried)
    for t, r in zip(tried, rows):
        if rows.count(r) == 1:
            np.testing.assert_array_equal(paired[obs.index(r)], t)
        else:  # two λ gave the same model: ambiguous, left unknown
            assert np.isnan(paired[obs.index(r)]).all()
    with pytest.raises(ValueError, match="shape of features"):
        recommend(F[:3], [0.0, 1.0, 2.0], nonnegative().bind(4), rng=rng, lams=np.ones((2, 4)))


def test_centred_fit_is_exact_when_unique_and_central_when_not():
    bound = bind("fixed")
    rng = np.random.default_rng(9)
    lam, F, v = perfect_data(bound, rng, K + 1)
    assert up_to_scale(learn_linreg(F, v, bound, center=True).lam, lam) < 1e-6
    few = learn_linreg(F[:3], v[:3], bound, center=True)
    vertex = learn_linreg(F[:3], v[:3], bound, center=False)
    # 3 observations leave λ undetermined: the vertex sets components to 0, the centred fit
    # keeps every component at the design centre's scale unless the data move it
    assert np.sum(vertex.lam == 0) >= 2 and np.all(few.lam > 0)


def test_lp_trust_region_bounds_the_lp_when_v_is_not_affine_in_f():
    from lossopt.blackbox.local import lp_region, replay_radius
    from lossopt.blackbox.recommend import LP_RADIUS, _fit

    # the radius: initial, halved after max(2, d/2) failures within it, doubled (up to the
    # initial radius) by a success at its edge, set to the largest on a plateau (same value)
    X = np.array([[0.0, 0.0], [0.5, 0.0], [0.0, 0.5], [0.0, -0.5], [3.0, 3.0]])
    assert replay_radius(X[:1], np.array([1.0]), 2, 1.0, 0.1, 8.0) == 1.0
    assert replay_radius(X[:3], np.array([1.0, 2.0, 2.0]), 2, 1.0, 0.1, 8.0) == 0.5
    assert replay_radius(X[:2], np.array([1.0, 1.0]), 2, 1.0, 0.1, 8.0) == 8.0
    assert replay_radius(X[:4], np.array([1.0, 2.0, 2.0, 0.5]), 2, 1.0, 0.1, 8.0) == 1.0
    # a distant improvement (exploration) moves the incumbent and keeps R
    assert replay_radius(X[[0, 1, 2, 4]], np.array([1.0, 2.0, 2.0, 0.5]), 2, 1.0, 0.1, 8.0) == 0.5
    # the region: a box of ±R in log λ around the incumbent, inside the constraint
    bound = (nonnegative() & fixed({0: 1.0})).bind(3)
    lams = np.array([[1.0, 0.1, 1e-3], [1.0, 1.0, 1e-2]])
    region = lp_region(lams, np.array([0.5, 1.0]), bound, 1.0, 0.1, 8.0)
    assert np.allclose(region.lower, [1.0, 0.1 / np.e, 1e-3 / np.e])
    assert np.allclose(region.upper, [1.0, 0.1 * np.e, 1e-3 * np.e])
    # v not affine in f: the LP's answer stays within the trust region around the incumbent
    rng = np.random.default_rng(0)
    k = 4
    bound = (nonnegative() & fixed({0: 1.0})).bind(k)
    lams = np.hstack([np.ones((12, 1)), np.exp(rng.uniform(-3, 3, (12, k - 1)))])
    F = np.exp(-lams) + 0.01 * rng.random((12, k))
    v = np.sum(np.log(lams[:, 1:]) ** 2, 1)
    fit = _fit(F, v, bound, lams, v)[0]
    whole = learn_linreg(F, v, bound)
    i0 = int(np.argmin(v))
    step = np.abs(np.log(fit.lam[1:] / lams[i0, 1:])).max()
    assert step <= LP_RADIUS + 1e-9
    assert np.abs(np.log(np.maximum(whole.lam[1:], 1e-300) / lams[i0, 1:])).max() > LP_RADIUS
    # a rejected step (its λ tried already): the LP again in the region halved, quartered, …
    for shrink, lam in enumerate(_fit(F, v, bound, lams, v)[1](), 1):
        assert np.abs(np.log(lam[1:] / lams[i0, 1:])).max() <= LP_RADIUS * 0.5 ** shrink + 1e-9
    lams2 = np.array([[1.0, 0.1, 1e-3], [1.0, 1.0, 1e-2]])
    half = lp_region(lams2, np.array([0.5, 1.0]), (nonnegative() & fixed({0: 1.0})).bind(3),
                     1.0, 0.1, 8.0, shrink=1)
    assert np.allclose(half.upper, [1.0, 0.1 * np.exp(0.5), 1e-3 * np.exp(0.5)])
    assert lp_region(lams2, np.array([0.5, 1.0]), (nonnegative() & fixed({0: 1.0})).bind(3),
                     1.0, 0.1, 8.0, shrink=4) is None  # below the smallest radius


def test_underdetermined_lp_stays_below_the_observed_range():
    from lossopt.blackbox.local import ceiling_region
    from lossopt.blackbox.recommend import LP_RADIUS, _fit

    rng = np.random.default_rng(1)
    k = 6
    bound = (nonnegative() & fixed({0: 1.0})).bind(k)
    lams = np.hstack([np.ones((4, 1)), np.exp(rng.uniform(-1, 1, (4, k - 1)))])
    F = rng.random((4, k))
    v = rng.random(4)
    region = ceiling_region(lams, bound, LP_RADIUS)
    assert np.allclose(region.upper[1:], lams[:, 1:].max(0) * np.exp(LP_RADIUS))
    assert np.all(region.lower == bound.lower)  # a weight may still go to 0
    fit = _fit(F, v, bound, lams, v)[0]
    whole = learn_linreg(F, v, bound)
    assert np.all(fit.lam[1:] <= lams[:, 1:].max(0) * np.exp(LP_RADIUS) * (1 + 1e-9))
    assert whole.lam.max() > 100 * lams.max()  # the unbounded vertex it replaces


# ------------------------------------------------------------ envelope-theorem local model
def _quadratic_inner(k=6, p=9, seed=0):
    """f_j(θ) = ½‖A_j θ − c_j‖²: θ*(λ) = (Σ λ_j A_jᵀA_j)⁻¹ Σ λ_j A_jᵀc_j in closed form."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(k, 7, p))
    c = rng.normal(size=(k, 7))

    def theta(lam):
        Q = np.einsum("j,jab,jac->bc", lam, A, A)
        return np.linalg.solve(Q, np.einsum("j,jab,ja->b", lam, A, c))

    def f(lam):
        return 0.5 * np.sum((A @ theta(lam) - c) ** 2, axis=1)

    def true_M(lam):  # diag(λ)·J·diag(λ), J = ∂f/∂λ = −∇f H⁻¹ ∇fᵀ
        t = theta(lam)
        G = np.einsum("jab,ja->jb", A, A @ t - c)  # ∇_θ f_j
        H = np.einsum("j,jab,jac->bc", lam, A, A)
        J = -G @ np.linalg.solve(H, G.T)
        return lam[:, None] * J * lam[None, :]

    return f, theta, true_M


def test_envelope_jacobian_matches_closed_form():
    from lossopt.blackbox.local import envelope_jacobian

    f, _, true_M = _quadratic_inner()
    rng = np.random.default_rng(1)
    lam0 = np.array([1.0, 0.5, 2.0, 0.3, 1.5, 0.8])
    # 5 neighbours: fewer than the k + 1 = 7 a linear model of V in λ needs
    L = np.vstack([lam0, lam0 * np.exp(0.01 * rng.normal(size=(5, 6)))])
    F = np.array([f(x) for x in L])
    M, resid = envelope_jacobian(L, F, 0, np.arange(1, 6))
    Mt = true_M(lam0)
    assert np.allclose(Mt, Mt.T, atol=1e-10) and np.allclose(Mt.sum(1), 0, atol=1e-10)
    assert np.linalg.norm(M - Mt) / np.linalg.norm(Mt) < 0.02
    assert resid < 0.02
    assert np.all(np.linalg.eigvalsh(M) < 1e-6 * np.abs(Mt).max())  # negative semidefinite


def test_envelope_gradient_direction():
    """V a smooth function of f (∇_θ V in the span of the ∇_θ f_j): M·b is ∇_{log λ} V."""
    from lossopt.blackbox.local import envelope_gradient

    f, _, _ = _quadratic_inner()
    w = np.array([0.3, 1.0, 0.2, 0.7, 0.5, 0.1])

    def V(lam):
        y = f(lam)
        return np.log(w @ y) + 0.05 * (y[0] - y[3]) ** 2

    rng = np.random.default_rng(2)
    lam0 = np.array([1.0, 0.5, 2.0, 0.3, 1.5, 0.8])
    L = np.vstack([lam0, lam0 * np.exp(1e-3 * rng.normal(size=(12, 6)))])
    F = np.array([f(x) for x in L])
    v = np.array([V(x) for x in L])
    g = envelope_gradient(L, F, v, 0, np.arange(1, 13))
    e = 1e-5
    true_g = np.array([(V(lam0 * np.exp(e * u)) - V(lam0 * np.exp(-e * u))) / (2 * e)
                       for u in np.eye(6)])
    assert abs(true_g.sum()) < 1e-6 * np.abs(true_g).max()  # scale invariance
    cos = g @ true_g / np.linalg.norm(g) / np.linalg.norm(true_g)
    assert cos > 0.99
    assert np.linalg.norm(g - true_g) / np.linalg.norm(true_g) < 0.1


@pytest.mark.parametrize("name", ["fixed", "box", "simplex", "nonnegative"])
def test_envelope_step_feasible_descends_deterministic(name):
    from lossopt.blackbox.local import envelope_step

    bound = bind(name)
    f, _, _ = _quadratic_inner()
    w = np.array([0.3, 1.0, 0.2, 0.7, 0.5, 0.1])
    rng = np.random.default_rng(3)
    E = np.exp(0.3 * rng.normal(size=(14, K)))
    L = normalize(E / E.sum(1, keepdims=True) if name == "simplex" else np.stack(
        [bound.project(x) for x in E]), bound)
    assert np.all(L > 0)
    F = np.array([f(x) for x in L])
    v = np.log(F @ w)
    lam = envelope_step(L, F, v, bound)
    assert lam is not None
    assert np.allclose(lam, envelope_step(L, F, v, bound))
    assert np.allclose(bound.project(lam), lam, atol=1e-9)
    assert np.allclose(normalize(lam, bound), lam)
    i0 = int(np.argmin(v))
    assert np.log(f(lam) @ w) < v[i0]  # a descent step (short, well-determined model)


def test_envelope_step_declines():
    from lossopt.blackbox.local import envelope_step

    rng = np.random.default_rng(4)
    for bound in (bind("signed"), nonnegative().bind(3, ["a", "b", "c"])):  # sign free; d < 4
        L = normalize(np.stack([np.abs(bound.project(np.exp(0.3 * rng.normal(size=bound.k))))
                                for _ in range(10)]), bound)
        assert envelope_step(L, rng.random((10, bound.k)), rng.random(10), bound) is None
