"""Tests for lossopt.constraints: binding, errors, and the exact Euclidean projection."""

import itertools

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from lossopt import constraints as C  # noqa: E402

KINDS = ["nonnegative", "box", "fixed", "simplex", "simplex_subset", "box_simplex",
         "fixed_simplex", "nonnegative_fixed"]


def brute_force_projection(y, lo, hi, sum_mask, total):
    """argmin ||x − y||² over {lo <= x <= hi, Σ_S x = total} by enumerating each component's
    status (at lower / at upper / free) and solving the equality-constrained least squares."""
    k, best, best_d = len(y), None, np.inf
    for status in itertools.product(range(3), repeat=k):
        if any((s == 0 and not np.isfinite(lo[i])) or (s == 1 and not np.isfinite(hi[i]))
               for i, s in enumerate(status)):
            continue
        x = np.where(np.array(status) == 0, lo, np.where(np.array(status) == 1, hi, y))
        if sum_mask is not None:
            free = np.array([s == 2 for s in status]) & sum_mask
            rest = x[sum_mask & ~free].sum()
            if free.any():
                x[free] = y[free] - (y[free].sum() + rest - total) / free.sum()
            elif abs(rest - total) > 1e-9 * max(1.0, abs(total)):
                continue
        tol = 1e-9 * (1 + np.abs(x).max())
        if np.any(x < lo - tol) or np.any(x > hi + tol):
            continue
        if sum_mask is not None and abs(x[sum_mask].sum() - total) > tol:
            continue
        d = np.sum((x - y) ** 2)
        if d < best_d:
            best, best_d = x, d
    assert best is not None
    return best


def random_constraint(rng, kind, k, names):
    """A random description of the given kind; rejected by the caller if it binds to an empty
    set."""
    sub = [names[i] for i in rng.choice(k, size=rng.integers(1, k + 1), replace=False)]
    fix = {names[i]: float(rng.normal()) if kind != "nonnegative_fixed" else float(rng.uniform())
           for i in rng.choice(k, size=rng.integers(0, k), replace=False)}

    def random_box():
        lower = [None if rng.uniform() < 0.3 else float(rng.normal()) for _ in range(k)]
        upper = [None if rng.uniform() < 0.3 else
                 (lower[i] if lower[i] is not None else 0.0) + float(rng.exponential())
                 for i in range(k)]
        return C.box(lower=lower, upper=upper)

    total = float(rng.uniform(0.5, 3.0))
    return {
        "nonnegative": lambda: C.nonnegative(),
        "box": random_box,
        "fixed": lambda: C.fixed(fix),
        "simplex": lambda: C.simplex(total),
        "simplex_subset": lambda: C.simplex(total, over=sub),
        "box_simplex": lambda: random_box() & C.simplex(total, over=sub),
        "fixed_simplex": lambda: C.fixed({n: abs(v) / k for n, v in fix.items()})
        & C.simplex(total, over=sub),
        "nonnegative_fixed": lambda: C.nonnegative() & C.fixed(fix),
    }[kind]()


def random_cases(seed, n, kmax=5):
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < n:
        kind = KINDS[len(cases) % len(KINDS)]
        k = int(rng.integers(1, kmax + 1))
        names = [f"f{i}" for i in range(k)]
        try:
            bound = random_constraint(rng, kind, k, names).bind(k, names)
        except ValueError:
            continue
        y = rng.normal(scale=2.0, size=k)
        if k > 1 and rng.uniform() < 0.3:  # ties and points exactly on a bound
            y[rng.integers(k)] = y[0]
            lo = bound.lower[0]
            if np.isfinite(lo):
                y[-1] = lo
        cases.append((kind, bound, y))
    return cases


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_projection_matches_brute_force(seed):
    for kind, bound, y in random_cases(seed, 60):
        q = np.asarray(bound.project(y))
        assert q.dtype == np.float64
        ref = brute_force_projection(y, bound.lower, bound.upper, bound.sum_mask, bound.total)
        np.testing.assert_allclose(q, ref, rtol=1e-10, atol=1e-10, err_msg=f"{kind}: {bound}")
        assert bound.is_feasible(q), (kind, bound, q)
        assert np.all(q[bound.fixed_mask] == bound.lower[bound.fixed_mask])
        np.testing.assert_allclose(np.asarray(bound.project(q)), q, rtol=4e-16, atol=4e-16)


@pytest.mark.parametrize("seed", [10, 11])
def test_projection_variational_inequality(seed):
    rng = np.random.default_rng(seed)
    for kind, bound, y in random_cases(seed, 40):
        q = np.asarray(bound.project(y))
        for _ in range(10):  # random feasible points z: (q − y)·(z − q) >= 0
            z = np.asarray(bound.project(rng.normal(scale=3.0, size=bound.k)))
            assert np.dot(q - y, z - q) >= -1e-10 * (1 + np.dot(z, z)), (kind, bound)


@pytest.mark.parametrize("seed", [20, 21])
def test_projection_float32(seed):
    for kind, bound, y in random_cases(seed, 40):
        y32 = y.astype(np.float32)
        q = np.asarray(bound.project(y32))
        assert q.dtype == np.float32
        ref = brute_force_projection(y32.astype(np.float64), bound.lower, bound.upper,
                                     bound.sum_mask, bound.total)
        np.testing.assert_allclose(q, ref, rtol=2e-6, atol=2e-6, err_msg=f"{kind}: {bound}")
        assert bound.is_feasible(q), (kind, bound, q)


def test_projection_jit_equals_eager_and_accepts_numpy():
    bound = (C.box(upper={"b": 0.4}) & C.simplex(2.0, over=["a", "b", "c"])).bind(
        4, ["a", "b", "c", "d"])
    y = np.array([3.0, 2.0, -1.0, 7.0])
    # τ solves clip(3 − τ) + 0.4 + max(−1 − τ, 0) = 2 → τ = 1.4, x = (1.6, 0.4, 0, 7)
    expected = np.array([1.6, 0.4, 0.0, 7.0])
    np.testing.assert_allclose(np.asarray(bound.project(y)), expected, rtol=1e-15)
    np.testing.assert_array_equal(np.asarray(jax.jit(bound.project)(jnp.asarray(y))),
                                  np.asarray(bound.project(y)))


def test_simplex_matches_optax_reference_large_k():
    rng = np.random.default_rng(5)
    bound = C.simplex(3.0).bind(2000)
    for _ in range(5):
        y = rng.normal(scale=rng.uniform(0.01, 10), size=2000)
        q = np.asarray(bound.project(y))
        ref = np.asarray(optax.projections.projection_simplex(jnp.asarray(y), 3.0))
        np.testing.assert_allclose(q, ref, atol=1e-12)
        assert bound.is_feasible(q) and np.all(q >= 0)


def test_capped_simplex_large_k_kkt():
    """k = 1000 with caps: x = clip(y − τ, lo, hi) for one τ (checked on interior components)."""
    rng = np.random.default_rng(6)
    k = 1000
    upper = rng.uniform(0.001, 0.01, size=k)
    bound = (C.box(upper=list(upper)) & C.simplex(2.0)).bind(k)
    y = rng.normal(scale=0.01, size=k)
    q = np.asarray(bound.project(y))
    assert bound.is_feasible(q)
    interior = (q > 0) & (q < upper)
    taus = (y - q)[interior]
    assert interior.sum() > 10 and np.ptp(taus) < 1e-15
    tau = taus.mean()
    np.testing.assert_allclose(q, np.clip(y - tau, 0, upper), atol=1e-15)


def test_fixed_and_bounds_exact():
    bound = (C.nonnegative() & C.fixed({"data": 0.1}) & C.box(upper={"l2": 0.3})).bind(
        3, ["data", "l2", "l1"])
    for dtype in (np.float32, np.float64):
        q = np.asarray(bound.project(np.array([5.0, 5.0, -5.0], dtype)))
        assert q.dtype == dtype
        np.testing.assert_array_equal(q, np.array([0.1, 0.3, 0.0], dtype))


def test_bound_attributes_and_masks():
    bound = (C.nonnegative() & C.fixed({"data": 1.0}) & C.simplex(1.0, over=["a", "b"])
             & C.box(upper={"c": 2.0})).bind(5, ["data", "a", "b", "c", "d"])
    assert bound.k == 5 and bound.names == ("data", "a", "b", "c", "d")
    np.testing.assert_array_equal(bound.lower, [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(bound.upper, [1, np.inf, np.inf, 2, np.inf])
    np.testing.assert_array_equal(bound.fixed_mask, [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(bound.free_mask, [0, 1, 1, 1, 1])
    np.testing.assert_array_equal(bound.sum_mask, [0, 1, 1, 0, 0])
    np.testing.assert_array_equal(bound.positive_mask, [0, 0, 0, 0, 1])
    assert bound.total == 1.0
    text = repr(bound)
    assert "data=1" in text and "c∈[0, 2]" in text and "sum(a+b)=1" in text
    assert repr(C.nonnegative() & C.fixed({"data": 1.0})) == "nonnegative() & fixed({'data': 1.0})"


def test_defaults_and_indices():
    bound = (C.box(lower=-1.0, upper=[None, 2.0, 3.0]) & C.fixed({0: 0.5})).bind(3)
    assert bound.names == ("0", "1", "2")
    np.testing.assert_array_equal(bound.lower, [0.5, -1, -1])
    np.testing.assert_array_equal(bound.upper, [0.5, 2, 3])
    assert bound.sum_mask is None and bound.total is None
    # identical simplex constraints are allowed; intersections of intersections flatten
    c = (C.simplex() & C.nonnegative()) & (C.simplex() & C.box(upper=0.5))
    assert isinstance(c, C.Intersection) and len(c.parts) == 4
    np.testing.assert_array_equal(c.bind(2).upper, [0.5, 0.5])


def test_is_feasible_and_check():
    bound = (C.nonnegative() & C.fixed({"data": 1.0}) & C.simplex(2.0, over=["a", "b"])).bind(
        3, ["data", "a", "b"])
    assert bound.is_feasible([1.0, 0.5, 1.5])
    assert not bound.is_feasible([1.0, 0.5, 1.6])
    assert not bound.is_feasible([1.0, -1e-300, 2.0])
    assert not bound.is_feasible([1.0 + 1e-15, 0.5, 1.5])
    assert not bound.is_feasible([1.0, np.nan, 1.5])
    assert not bound.is_feasible([1.0, 0.5])
    bound.check(np.array([1.0, 0.5, 1.5]))
    with pytest.raises(ValueError, match=r"'a' \(index 1\).*-0.5.*lower bound 0.0"):
        bound.check([1.0, -0.5, 2.5])
    with pytest.raises(ValueError, match=r"'data' \(index 0\).*fixed value 1.0"):
        bound.check([2.0, 0.5, 1.5])
    with pytest.raises(ValueError, match=r"\['a', 'b'\] sum to 3.0"):
        bound.check([1.0, 1.5, 1.5])


def test_as_bound():
    unconstrained = C.as_bound(None, 3, ["a", "b", "c"])
    assert np.all(unconstrained.lower == -np.inf) and np.all(unconstrained.upper == np.inf)
    np.testing.assert_array_equal(np.asarray(unconstrained.project(np.array([-9.0, 0, 9]))),
                                  [-9.0, 0, 9])
    bound = C.nonnegative().bind(2)
    assert C.as_bound(bound, 2) is bound
    with pytest.raises(ValueError, match="k = 2"):
        C.as_bound(bound, 3)
    with pytest.raises(TypeError):
        C.as_bound("nonnegative", 2)


NAMES = ["data", "l2", "l1"]


@pytest.mark.parametrize("make, exc, pattern", [
    (lambda: C.box(lower={"dat": 1.0}), ValueError, r"'dat'.*valid names are \['data'"),
    (lambda: C.fixed({7: 1.0}), ValueError, "index 7 is out of range"),
    (lambda: C.box(lower={"l1": 2.0}, upper={"l1": 1.0}), ValueError,
     r"'l1' \(index 2\): empty bounds: lower bound 2.0"),
    (lambda: C.nonnegative() & C.box(upper={"l2": -1.0}), ValueError, r"'l2' \(index 1\)"),
    (lambda: C.fixed({"data": 1.0}) & C.fixed({0: 2.0}), ValueError,
     r"'data' \(index 0\): conflicting fixed values 1.0"),
    (lambda: C.fixed({"data": 2.0}) & C.simplex(1.0), ValueError,
     r"infeasible.*sum to 2.0 > total 1.0.*'data' \(index 0\) = 2.0"),
    (lambda: C.box(upper={"l1": 0.1, "l2": 0.2}) & C.simplex(1.0, over=["l1", "l2"]),
     ValueError, r"upper bounds.*sum to 0.30.*'l1' \(index 2\)"),
    (lambda: C.box(lower={"l2": float("nan")}), ValueError, r"'l2' \(index 1\).*nan"),
    (lambda: C.box(upper=[1.0, 2.0]), ValueError, r"length 2, expected k = 3.*'data'"),
    (lambda: C.box(upper=[1.0, float("nan"), 2.0]), ValueError, r"'l2' \(index 1\).*nan"),
    (lambda: C.fixed({"data": -1.0}) & C.nonnegative(), ValueError,
     r"component 'data' \(index 0\): fixed value -1.0 is below the lower bound 0.0"),
    (lambda: C.fixed({"l1": float("inf")}), ValueError, r"'l1' \(index 2\).*finite"),
    (lambda: C.box(lower={"l1": float("inf")}), ValueError, r"'l1' \(index 2\)"),
    (lambda: C.simplex(over=["l1", "data", 2]), ValueError, r"'l1' \(index 2\).*twice"),
    (lambda: C.simplex(1.0) & C.simplex(2.0), ValueError, "at most one sum constraint"),
    (lambda: C.simplex(over=["l1"]) & C.simplex(over=["l2"]), ValueError, "at most one sum"),
])
def test_bind_errors_name_the_component(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make().bind(3, NAMES)


@pytest.mark.parametrize("make, exc", [
    (lambda: C.fixed("x"), TypeError),
    (lambda: C.fixed({"a": "x"}), TypeError),
    (lambda: C.fixed({1.5: 1.0}), TypeError),
    (lambda: C.box(lower="x"), TypeError),
    (lambda: C.box(lower=float("nan")), ValueError),
    (lambda: C.simplex(0.0), ValueError),
    (lambda: C.simplex(over="data"), TypeError),
    (lambda: C.simplex(over=[]), ValueError),
    (lambda: C.nonnegative().bind(3, ["a", "b"]), ValueError),
    (lambda: C.nonnegative().bind(2, ["a", "a"]), ValueError),
    (lambda: C.nonnegative().bind(0), ValueError),
])
def test_construction_errors(make, exc):
    with pytest.raises(exc):
        make()


def test_project_wrong_shape():
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        C.nonnegative().bind(3).project(np.zeros(4))
