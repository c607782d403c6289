"""Tests for lossopt.optim.projected: λ stays exactly feasible under any optax step."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from lossopt import constraints as C  # noqa: E402
from lossopt.optim import ProjectedState, feasible_step, projected  # noqa: E402

NAMES = ["data", "l2", "l1", "aug", "cls"]
CONSTRAINTS = {
    "nonneg_fixed": C.nonnegative() & C.fixed({"data": 0.1}),
    "box": C.box(lower=[1e-20, -0.3, None, 0.7, -5.0], upper={"l2": 0.1, "aug": 0.7000001}),
    "simplex": C.simplex(1.0),
    "capped_simplex": C.box(upper={"l2": 0.3, "l1": 0.3, "aug": 0.3, "cls": 0.3}) & C.simplex(1.0, over=["l2", "l1", "aug", "cls"])
    & C.fixed({"data": 1.0}),
    "simplex_subset": C.simplex(3.7, over=["l1", "cls"]) & C.box(lower={"data": 1e-7}),
}


def assert_exactly_feasible(bound, lam):
    lam = np.asarray(lam)
    lo, hi = bound.lower.astype(lam.dtype), bound.upper.astype(lam.dtype)
    assert np.all(lam >= lo) and np.all(lam <= hi), (bound, lam)
    assert np.all(lam[bound.fixed_mask] == lo[bound.fixed_mask])
    assert bound.is_feasible(lam), (bound, lam)


def run(tx, bound, lam0, grads, jit):
    state = tx.init(lam0)
    update = jax.jit(tx.update) if jit else tx.update
    lam, history = lam0, []
    for g in grads:
        updates, state = update(g, state, lam)
        assert updates.dtype == lam.dtype
        lam = optax.apply_updates(lam, updates)
        assert_exactly_feasible(bound, lam)
        history.append(lam)
    return history


@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("jit", [False, True])
def test_stays_exactly_feasible(name, dtype, jit):
    rng = np.random.default_rng([sorted(CONSTRAINTS).index(name), np.dtype(dtype).itemsize, jit])
    bound = CONSTRAINTS[name].bind(5, NAMES)
    for inner, big in ((optax.sgd(3.0), True), (optax.adam(2.0), True), (optax.sgd(1e-9), False)):
        tx = projected(inner, CONSTRAINTS[name], names=NAMES)
        lam0 = bound.project(jnp.asarray(rng.normal(size=5) * 10, dtype))
        assert_exactly_feasible(bound, lam0)
        scales = 10.0 ** rng.uniform(-8, 3, size=(25, 1))
        grads = [jnp.asarray(g, dtype) for g in rng.normal(size=(25, 5)) * scales]
        history = run(tx, bound, lam0, grads, jit)
        # large steps do move λ (it is not stuck at λ0)
        assert not big or max(np.abs(np.asarray(lam - lam0)).max() for lam in history) > 0.1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_infeasible_start_is_feasible_after_one_ulp(dtype):
    """From an infeasible λ0 no update u can give fl(λ0 + u) = 0.1 exactly when |λ0| >> 0.1: the
    first step lands within one ulp of λ0 of the projection, every later step exactly."""
    bound = CONSTRAINTS["nonneg_fixed"].bind(5, NAMES)
    tx = projected(optax.sgd(1.0), bound)
    lam0 = jnp.asarray([-37.3, 12.1, -3.0, 1e3, 5.0], dtype)
    state = tx.init(lam0)
    zero = jnp.zeros(5, dtype)
    updates, state = tx.update(zero, state, lam0)
    lam1 = np.asarray(optax.apply_updates(lam0, updates))
    expected = np.asarray(bound.project(lam0))
    assert np.all(lam1 >= 0)
    assert np.all(np.abs(lam1 - expected) <= np.spacing(np.abs(np.asarray(lam0))))
    updates, state = tx.update(zero, state, jnp.asarray(lam1))
    lam2 = optax.apply_updates(jnp.asarray(lam1), updates)
    assert_exactly_feasible(bound, lam2)
    np.testing.assert_array_equal(np.asarray(lam2), expected)


def test_updates_equal_projection_of_inner_step():
    bound = CONSTRAINTS["capped_simplex"].bind(5, NAMES)
    tx = projected(optax.sgd(0.5), bound)
    lam = jnp.asarray([1.0, 0.25, 0.25, 0.25, 0.25])
    g = jnp.asarray([3.0, -1.0, 0.2, 0.4, 2.0])
    updates, _ = tx.update(g, tx.init(lam), lam)
    expected = np.asarray(bound.project(lam - 0.5 * g))
    # y = (−0.5 | 0.75, 0.15, 0.05, −0.75) with caps 0.3 on S: τ = −0.85, three at the cap
    np.testing.assert_allclose(expected, [1.0, 0.3, 0.3, 0.3, 0.1], atol=1e-15)
    np.testing.assert_array_equal(np.asarray(optax.apply_updates(lam, updates))[:4],
                                  expected[:4])
    np.testing.assert_allclose(np.asarray(optax.apply_updates(lam, updates)), expected,
                               atol=1e-16)


def test_unconstrained_is_the_inner_transformation():
    lam = jnp.asarray([0.3, -2.0, 5.0])
    g = jnp.asarray([1.0, 2.0, -3.0])
    tx, ref = projected(optax.adam(0.1)), optax.adam(0.1)
    u1, s1 = tx.update(g, tx.init(lam), lam)
    u2, s2 = ref.update(g, ref.init(lam), lam)
    np.testing.assert_array_equal(np.asarray(optax.apply_updates(lam, u1)),
                                  np.asarray(optax.apply_updates(lam, u2)))
    assert isinstance(s1, ProjectedState)
    np.testing.assert_array_equal(np.asarray(s1.inner[0].mu), np.asarray(s2[0].mu))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_feasible_step_rounding(dtype):
    """fl(p + (q − p)) ≠ q for about half of random pairs; the guarded step never leaves a
    one-sided bound, lands within two ulps, and is exact in the Sterbenz range q/p ∈ [1/2, 2]."""
    rng = np.random.default_rng(np.dtype(dtype).itemsize)
    n = 20000
    p = (10 ** rng.uniform(-3, 3, n) * rng.choice([-1, 1], n)).astype(dtype)
    q = (10 ** rng.uniform(-3, 3, n) * rng.choice([-1, 1], n)).astype(dtype)
    q[:2000] = p[:2000] * rng.uniform(0.5, 2.0, 2000).astype(dtype)
    inf = np.full(n, np.inf, dtype)
    naive = p + (q - p)
    assert (naive < q).mean() > 0.1 and (naive > q).mean() > 0.1
    above = p + np.asarray(feasible_step(jnp.asarray(p), jnp.asarray(q), jnp.asarray(q), inf))
    below = p + np.asarray(feasible_step(jnp.asarray(p), jnp.asarray(q), -inf, jnp.asarray(q)))
    fixed = p + np.asarray(feasible_step(jnp.asarray(p), jnp.asarray(q), jnp.asarray(q),
                                         jnp.asarray(q)))
    ulp = np.spacing(np.maximum(np.abs(p), np.abs(q)))
    assert np.all(above >= q) and np.all(above - q <= 2 * ulp)
    assert np.all(below <= q) and np.all(q - below <= 2 * ulp)
    np.testing.assert_array_equal(fixed[:2000], q[:2000])
    assert np.all(np.abs(fixed - q) <= 2 * ulp)
    # p = 1, q = lower bound 1e-20: the naive step gives 0 < 1e-20; the guarded one 2^-53
    p1, q1 = jnp.ones(1), jnp.full(1, 1e-20)
    assert float((p1 + (q1 - p1))[0]) == 0.0
    assert float((p1 + feasible_step(p1, q1, q1, jnp.full(1, jnp.inf)))[0]) == 2.0 ** -53


class _NeedsValue:
    """An inner transformation that requires the extra argument ``value`` (like a line search)."""

    @staticmethod
    def make():
        def init(params):
            return jnp.zeros(())

        def update(updates, state, params=None, *, value, **extra):
            return jax.tree.map(lambda g: -0.1 * value * g, updates), state + value

        return optax.GradientTransformationExtraArgs(init, update)


def test_extra_args_pass_through():
    tx = projected(_NeedsValue.make(), C.nonnegative())
    lam = jnp.asarray([1.0, 2.0])
    state = tx.init(lam)
    updates, state = tx.update(jnp.asarray([20.0, 1.0]), state, lam, value=2.0, other=1)
    # inner step −0.1·2·g = (−4, −0.2): λ + u = (−3, 1.8) → projected (0, 1.8)
    np.testing.assert_array_equal(np.asarray(optax.apply_updates(lam, updates)), [0.0, 1.8])
    assert float(state.inner) == 2.0
    with pytest.raises(TypeError):
        tx.update(jnp.asarray([1.0, 1.0]), state, lam)  # inner tx did not get its `value`


def test_errors():
    tx = projected(optax.sgd(0.1), C.fixed({"data": 1.0}), names=["data", "l2"])
    lam = jnp.asarray([1.0, 0.0])
    state = tx.init(lam)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(jnp.ones(2), state)
    with pytest.raises(ValueError, match="1-D"):
        tx.init(jnp.ones((2, 1)))
    with pytest.raises(ValueError, match=r"names has length 2 but k = 3"):
        tx.init(jnp.ones(3))
    with pytest.raises(ValueError, match=r"unknown component name 'data'"):
        projected(optax.sgd(0.1), C.fixed({"data": 1.0})).init(jnp.ones(2))
    with pytest.raises(ValueError, match=r"'data' \(index 0\)"):
        projected(optax.sgd(0.1), C.fixed({"data": -1.0}) & C.nonnegative(),
                  names=["data", "l2"]).init(lam)
