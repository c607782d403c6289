"""tune: the outer loop lowers the validation loss, lands on a known best λ, compiles once."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

jax.config.update("jax_enable_x64", True)

import lossopt  # noqa: E402
from lossopt.constraints import box, fixed, nonnegative  # noqa: E402
from lossopt.solvers import LBFGS  # noqa: E402

RNG = np.random.default_rng(0)
N, D = 80, 4
X = jnp.asarray(RNG.normal(size=(N, D)))
Y = X @ jnp.asarray(RNG.normal(size=D)) + 0.3 * jnp.asarray(RNG.normal(size=N))
DATA = (X, Y)
NAMES = [f"w{i}" for i in range(D)] + ["data"]


def ridge_features(w, data):
    X, y = data
    return jnp.concatenate([0.5 * w**2, jnp.array([0.5 * jnp.mean((X @ w - y) ** 2)])])


def ridge_closed(lam):
    lam = np.asarray(lam)
    A = lam[D] * np.asarray(X.T @ X) / N + np.diag(lam[:D])
    return np.linalg.solve(A, lam[D] * np.asarray(X.T @ Y) / N)


LOSS = lossopt.LinearLoss(ridge_features, names=NAMES)
# The validation target is θ*(λ_true) itself, so λ_true (with data = 1) is the unique best λ:
# V(θ) = ½‖θ − θ*(λ_true)‖² reaches 0 there. One weight must travel from 1 to 100.
LAM_TRUE = np.array([0.3, 2.0, 100.0, 0.05, 1.0])
TARGET = jnp.asarray(ridge_closed(LAM_TRUE))


def target_val(w, target):
    return 0.5 * jnp.sum((w - target) ** 2)


CONSTRAINT = nonnegative() & fixed({"data": 1.0})


def test_tune_lands_on_known_best_lambda():
    lam0 = np.ones(D + 1)
    result = lossopt.tune(LOSS, target_val, jnp.zeros(D), DATA, TARGET, lam0, constraint=CONSTRAINT, steps=40)
    h = result.history
    assert h["lam"].shape == (result.n_solves, D + 1) and h["lam"][0].tolist() == lam0.tolist()
    assert set(h) >= {"lam", "val_loss", "hypergrad", "inner_steps", "inner_residual", "adjoint_residual", "converged"}
    assert result.best_val_loss <= 1e-6 * h["val_loss"][0]
    np.testing.assert_allclose(result.best_lam, LAM_TRUE, rtol=1e-2)
    assert result.best_lam[-1] == 1.0 and np.all(h["lam"] >= 0)
    # best_lam / best_theta belong together, and best is the minimum of the history
    assert result.best_val_loss == h["val_loss"].min()
    np.testing.assert_allclose(result.best_theta, ridge_closed(result.best_lam), rtol=1e-6)


def test_default_optimizer_moves_a_weight_from_1_to_100_in_a_handful_of_steps():
    result = lossopt.tune(LOSS, target_val, jnp.zeros(D), DATA, TARGET, np.ones(D + 1), constraint=CONSTRAINT, steps=40)
    lam2 = result.history["lam"][:, 2]
    first = int(np.argmax(lam2 >= 50.0)) if np.any(lam2 >= 50.0) else None
    assert first is not None and first <= 8, lam2


def test_tune_with_user_optimizer_stays_feasible_and_improves():
    c = box(lower=0.0, upper=5.0) & fixed({"data": 1.0})
    result = lossopt.tune(LOSS, target_val, jnp.zeros(D), DATA, TARGET, np.ones(D + 1), constraint=c,
                          optimizer=optax.adam(0.3), steps=15)
    lam = result.history["lam"]
    assert np.all(lam >= 0) and np.all(lam <= 5.0) and np.all(lam[:, -1] == 1.0)
    assert result.best_val_loss < 0.5 * result.history["val_loss"][0]


def test_tune_compiles_once():
    traces = []

    def counting_val(w, target):
        traces.append(1)  # runs only when traced
        return target_val(w, target)

    def run(steps):
        traces.clear()
        lossopt.tune(LOSS, counting_val, jnp.zeros(D), DATA, TARGET, np.ones(D + 1), constraint=CONSTRAINT, steps=steps)
        return len(traces)

    assert run(2) == run(8) >= 1


def test_unconverged_solves_surface_in_tune_history():
    with pytest.warns(lossopt.ConvergenceWarning):
        result = lossopt.tune(LOSS, target_val, jnp.zeros(D), DATA, TARGET, np.ones(D + 1), constraint=CONSTRAINT,
                              solver=LBFGS(maxiter=2), steps=2)
        jax.effects_barrier()
    assert not result.history["converged"][0]
    assert np.all(result.history["inner_steps"] <= 2)


def test_failed_step_keeps_the_history():
    def exploding_callback(step, row):
        if step == 2:
            raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost") as err:
        lossopt.tune(LOSS, target_val, jnp.zeros(D), DATA, TARGET, np.ones(D + 1), constraint=CONSTRAINT,
                     steps=10, callback=exploding_callback)
    partial = err.value.partial_result
    assert partial.n_solves == 3 and partial.history["val_loss"][2] < partial.history["val_loss"][0]


def test_callback_can_stop_early():
    result = lossopt.tune(LOSS, target_val, jnp.zeros(D), DATA, TARGET, np.ones(D + 1), constraint=CONSTRAINT,
                          steps=10, callback=lambda step, row: step == 3)
    assert result.n_solves == 4 and result.status == "stopped by callback"


def test_tune_bad_input():
    with pytest.raises(ValueError, match="unknown"):
        lossopt.tune(LOSS, target_val, jnp.zeros(D), DATA, TARGET, np.ones(D + 1),
                     constraint=fixed({"dta": 1.0}))
    with pytest.raises(ValueError, match="lam0 is not feasible.*'data'"):
        lossopt.tune(LOSS, target_val, jnp.zeros(D), DATA, TARGET, np.full(D + 1, 2.0), constraint=CONSTRAINT)
    with pytest.raises(ValueError, match="length k=5"):
        lossopt.tune(LOSS, target_val, jnp.zeros(D), DATA, TARGET, np.ones(3), constraint=CONSTRAINT)
    with pytest.raises(ValueError, match=r"lam\[1\].*nan"):
        lossopt.tune(LOSS, target_val, jnp.zeros(D), DATA, TARGET, np.array([1, np.nan, 1, 1, 1.0]))


def test_hyperdescent_minimizes_a_smooth_function_without_a_step_size():
    """V(λ) = Σ (log λ_i − log t_i)² + (λ_3 − 2)²: log components, a linear one, a fixed one."""
    target = np.array([1e-3, 50.0, 3.0])
    c = nonnegative() & fixed({"f": 1.0}) & box(lower={"lin": -10.0}, upper={"lin": 10.0})
    names = ["a", "b", "c", "lin", "f"]

    def value_and_grad(lam):
        lam = np.asarray(lam)
        r = np.log(lam[:3]) - np.log(target)
        v = np.sum(r**2) + (lam[3] - 2.0) ** 2
        g = np.concatenate([2 * r / lam[:3], [2 * (lam[3] - 2.0)], [0.0]])
        return v, jnp.asarray(g)

    tx = lossopt.projected(lossopt.hyperdescent(c, names), c, names)
    lam = jnp.array([1.0, 1.0, 1.0, -5.0, 1.0])
    state, best = tx.init(lam), np.inf
    for _ in range(40):
        v, g = value_and_grad(lam)
        best = min(best, v)
        updates, state = tx.update(g, state, lam, value=v)
        lam = optax.apply_updates(lam, updates)
        assert float(lam[4]) == 1.0 and float(lam[3]) >= -10.0 and np.all(np.asarray(lam[:3]) > 0)
    assert best <= 1e-8
    np.testing.assert_allclose(np.asarray(state.inner.best_z)[:3], np.log(target), atol=1e-4)
