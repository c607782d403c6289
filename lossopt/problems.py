"""Ready-made tuning problems on real data bundled with scikit-learn (the ``demo`` extra).

``logreg-l1l2`` (the default of ``lossopt tune``): L1 + L2 logistic regression on breast cancer
with 465 interaction features, λ = (l1, l2, data), the L1 term a prox term; see
:func:`logreg_l1l2` and the reusable data loader :func:`breast_cancer_interactions`.

``digits-class-weights``: multinomial logistic regression on scikit-learn's handwritten digits
(1797 images of 8×8 pixels, 10 classes). θ = (W ∈ R^{64×10}, b ∈ R^10), biases unpenalized, and

    f(θ) = (f_0, …, f_9, ½‖W‖²),   f_c = (1/n) Σ_{i: y_i = c} −log softmax(W x_i + b)_{y_i},

so λ = (class weights, L2 weight), k = 11. Σ_c f_c is the usual mean training log loss. Only the
ratios of λ matter (argmin is scale invariant), so the scale is pinned by fixing the weight of
class 0 at 1: ``nonnegative() & fixed({"class_0": 1.0})``. The baseline is all class weights 1 and
scikit-learn's default L2 strength (C = 1, i.e. λ_l2 = 1/n_train). Split (fixed seed 0): a random
permutation of the 1797 images, 50% train / 25% validation / 25% test; pixels standardized with the
training mean and standard deviation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lossopt.constraints import fixed, nonnegative
from lossopt.loss import LinearLoss


@dataclass
class Problem:
    """A tuning problem: everything :func:`lossopt.tune` needs, plus held-out test data."""

    name: str
    description: str
    loss: LinearLoss
    val_loss: Callable[[Any, Any], jax.Array]
    theta0: Any
    train: Any
    val: Any
    test: Any
    lam0: np.ndarray  # the untuned baseline
    constraint: Any
    metrics: Callable[[Any, Any], dict]  # (theta, data) -> {"log_loss": ..., "accuracy": ...}


def _require_sklearn():
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        raise ImportError(
            "this problem uses data bundled with scikit-learn: pip install 'lossopt[demo]'"
        ) from None
    return sklearn.datasets


def split(n: int, seed: int = 0, fractions=(0.5, 0.25)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of a fixed-seed random train / validation / test split."""
    perm = np.random.default_rng(seed).permutation(n)
    a = int(round(fractions[0] * n))
    b = a + int(round(fractions[1] * n))
    return perm[:a], perm[a:b], perm[b:]


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    return [(x - mean) / std for x in (train, *others)]


class Splits(NamedTuple):
    """A fixed train / validation / test split as numpy arrays: each a pair ``(X, y)``."""

    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    feature_names: tuple[str, ...]


def breast_cancer_interactions(seed: int = 0) -> Splits:
    """scikit-learn's breast-cancer data with degree-2 interaction features (no download).

    569 tumours, 30 measurements each, label 1 = benign. Split with :func:`split` (seed ``seed``,
    50% / 25% / 25%: 284 / 142 / 143 rows); the 30 measurements are standardized with the training
    mean and standard deviation, expanded with all 435 pairwise products x_i·x_j (i < j;
    ``PolynomialFeatures(2, interaction_only=True, include_bias=False)``), and the resulting
    465 columns standardized again with training statistics. ``X`` is float64, ``y`` int64 (0/1).

    With 465 columns for 284 training rows most products are noise, so an L1 penalty pays: the
    best validation log loss of L1 + L2 logistic regression sits at an interior λ1 (the
    ``logreg-l1l2`` problem and ``benchmarks/bench_nonsmooth.py``). Reusable with any trainer, e.g.
    ``sklearn.linear_model.LogisticRegression`` on ``splits.train``.
    """
    datasets = _require_sklearn()
    from sklearn.preprocessing import PolynomialFeatures

    data = datasets.load_breast_cancer()
    X, y = data.data, data.target.astype(np.int64)
    tr, va, te = split(len(y), seed)
    parts = standardize(X[tr], X[va], X[te])
    poly = PolynomialFeatures(2, interaction_only=True, include_bias=False).fit(parts[0])
    parts = standardize(*(poly.transform(x) for x in parts))
    names = tuple(str(n) for n in poly.get_feature_names_out([str(n) for n in data.feature_names]))
    return Splits((parts[0], y[tr]), (parts[1], y[va]), (parts[2], y[te]), names)


def softmax_log_loss(theta, X, y):
    """Per-example −log softmax(X W + b)_y."""
    logits = X @ theta["W"] + theta["b"]
    return jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]


def classification_metrics(theta, data) -> dict:
    X, y = data
    logits = X @ theta["W"] + theta["b"]
    return {
        "log_loss": float(jnp.mean(softmax_log_loss(theta, X, y))),
        "accuracy": float(np.mean(np.asarray(jnp.argmax(logits, axis=1)) == np.asarray(y))),
    }


def digits_class_weights(seed: int = 0, dtype=jnp.float64) -> Problem:
    """The ``lossopt tune`` main job (see the module docstring)."""
    datasets = _require_sklearn()
    X, y = datasets.load_digits(return_X_y=True)
    tr, va, te = split(len(y), seed)
    Xtr, Xva, Xte = standardize(X[tr], X[va], X[te])
    n_classes, n = 10, len(tr)

    def features(theta, data):
        X, y = data
        per_example = softmax_log_loss(theta, X, y)
        onehot = jax.nn.one_hot(y, n_classes, dtype=per_example.dtype)
        per_class = onehot.T @ per_example / y.shape[0]
        return jnp.concatenate([per_class, 0.5 * jnp.sum(theta["W"] ** 2)[None]])

    def val_loss(theta, data):
        X, y = data
        return jnp.mean(softmax_log_loss(theta, X, y))

    names = [f"class_{c}" for c in range(n_classes)] + ["l2"]
    as_data = lambda X, y: (jnp.asarray(X, dtype), jnp.asarray(y, jnp.int32))  # noqa: E731
    return Problem(
        name="digits-class-weights",
        description=("multinomial logistic regression on scikit-learn's digits; per-class training-"
                     "loss weights and an L2 weight (k = 11); class_0 fixed at 1"),
        loss=LinearLoss(features, names=names),
        val_loss=val_loss,
        theta0={"W": jnp.zeros((X.shape[1], n_classes), dtype), "b": jnp.zeros(n_classes, dtype)},
        train=as_data(Xtr, y[tr]), val=as_data(Xva, y[va]), test=as_data(Xte, y[te]),
        lam0=np.array([1.0] * n_classes + [1.0 / n]),
        constraint=nonnegative() & fixed({"class_0": 1.0}),
        metrics=classification_metrics,
    )


def binary_log_loss(theta, X, y):
    """Per-example logistic loss log(1 + e^z) − y·z, z = X w + b."""
    z = X @ theta["w"] + theta["b"]
    return jnp.logaddexp(0.0, z) - y * z


def binary_metrics(theta, data) -> dict:
    X, y = data
    z = X @ theta["w"] + theta["b"]
    return {
        "log_loss": float(jnp.mean(binary_log_loss(theta, X, y))),
        "accuracy": float(np.mean(np.asarray(z > 0) == (np.asarray(y) > 0.5))),
        "nonzero": int(np.count_nonzero(np.asarray(theta["w"]))),
    }


def logreg_l1l2(seed: int = 0, dtype=jnp.float64) -> Problem:
    """The ``lossopt tune`` main job: L1 + L2 logistic regression (seed example 1).

    Data: :func:`breast_cancer_interactions` (284 / 142 / 143 rows, 465 standardized features:
    30 measurements and their 435 pairwise products). θ = (w ∈ R⁴⁶⁵, b), bias unpenalized, and

        f(θ) = (‖w‖₁, ½‖w‖², mean training log loss),   λ = (l1, l2, data),  k = 3.

    ``l1`` is a prox term (``lossopt.prox.l1(on="w")``): the inner problem is solved by FISTA and
    differentiated through its proximal fixed point. The scale is pinned by the data weight:
    ``nonnegative() & fixed({"data": 1.0})``. Baseline λ0 = (0.5/n, 0.5/n, 1) with n = 284: exactly
    scikit-learn's ``LogisticRegression(penalty="elasticnet", l1_ratio=0.5, C=1)``.
    """
    from lossopt.prox import l1

    s = breast_cancer_interactions(seed)
    n = len(s.train[1])

    def features(theta, data):
        X, y = data
        w = theta["w"]
        return jnp.stack([jnp.sum(jnp.abs(w)), 0.5 * jnp.sum(w * w),
                          jnp.mean(binary_log_loss(theta, X, y))])

    def val_loss(theta, data):
        return jnp.mean(binary_log_loss(theta, *data))

    as_data = lambda X, y: (jnp.asarray(X, dtype), jnp.asarray(y, dtype))  # noqa: E731
    return Problem(
        name="logreg-l1l2",
        description=("L1 + L2 logistic regression on scikit-learn's breast cancer data with 465 "
                     "interaction features; λ = (l1, l2, data), data fixed at 1"),
        loss=LinearLoss(features, names=["l1", "l2", "data"], prox={"l1": l1(on="w")}),
        val_loss=val_loss,
        theta0={"w": jnp.zeros(s.train[0].shape[1], dtype), "b": jnp.zeros((), dtype)},
        train=as_data(*s.train), val=as_data(*s.val), test=as_data(*s.test),
        lam0=np.array([0.5 / n, 0.5 / n, 1.0]),
        constraint=nonnegative() & fixed({"data": 1.0}),
        metrics=binary_metrics,
    )


PROBLEMS = {"logreg-l1l2": logreg_l1l2, "digits-class-weights": digits_class_weights}
