"""A ready-made problem: learn data-augmentation probabilities for a small network on digits.

Data: scikit-learn's bundled digits (1797 images of 8×8 pixels, 10 classes), split 50% train /
25% validation / 25% test with seed 0 (as :mod:`lossopt.problems`), pixels scaled to [0, 1].

Augmentations (``AUGMENTATIONS``), each drawn once per training example from ``seed`` — a fixed
random draw per example, so the augmented training set is fixed and

    f_i(θ) = (1/n) Σ_j −log softmax(net_θ(a_i(x_j)))_{y_j}

(the training log loss under augmentation i) is a function of θ alone:

* ``identity``: the image itself;
* ``flip``: mirrored left–right (it changes the identity of asymmetric digits: expected to hurt);
* ``shift``: moved by one pixel up, down, left or right (zero fill);
* ``rotate``: rotated by an angle uniform in ±15° (bilinear);
* ``noise``: Gaussian pixel noise, σ = 0.15 (pixels in [0, 1]);
* ``dropout``: each pixel zeroed with probability 0.25.

Training with augmentation i chosen with probability p_i minimizes Σ_i p_i f_i(θ) in expectation: a
linear loss with λ = p on the simplex. The network is an MLP 64 → ``hidden`` (tanh) → 10; the
validation loss is the mean log loss on the un-augmented validation images.

``data`` layout: ``{"x": (n, K, 64), "y": (n,)}`` — the K augmented copies of each example sit on
axis 1, so a minibatch (a slice of axis 0) carries every augmentation of its examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lossopt.loss import LinearLoss
from lossopt.problems import _require_sklearn, split

AUGMENTATIONS = ("identity", "flip", "shift", "rotate", "noise", "dropout")


def augment(images: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """``images`` (n, 8, 8) in [0, 1] under augmentation ``name``, one random draw per image."""
    n = len(images)
    if name == "identity":
        return images.copy()
    if name == "flip":
        return images[:, :, ::-1].copy()
    if name == "shift":
        out = np.zeros_like(images)
        direction = rng.integers(0, 4, size=n)
        for d, (axis, step) in enumerate(((1, -1), (1, 1), (2, -1), (2, 1))):
            sel = direction == d
            moved = np.roll(images[sel], step, axis=axis)
            edge = 0 if step == 1 else -1
            if axis == 1:
                moved[:, edge, :] = 0.0
            else:
                moved[:, :, edge] = 0.0
            out[sel] = moved
        return out
    if name == "rotate":
        from scipy.ndimage import rotate

        angles = rng.uniform(-15.0, 15.0, size=n)
        return np.stack([rotate(img, a, reshape=False, order=1, mode="constant", cval=0.0)
                         for img, a in zip(images, angles)])
    if name == "noise":
        return images + 0.15 * rng.normal(size=images.shape)
    if name == "dropout":
        return images * (rng.random(images.shape) >= 0.25)
    raise ValueError(f"unknown augmentation {name!r}; known: {AUGMENTATIONS}")


def init_mlp(key, hidden: int = 64, dtype=jnp.float32) -> dict:
    """Glorot-normal weights, zero biases, for 64 → hidden → 10."""
    k1, k2 = jax.random.split(key)
    return {"W1": jax.random.normal(k1, (64, hidden), dtype) * float(np.sqrt(2.0 / (64 + hidden))),
            "b1": jnp.zeros(hidden, dtype),
            "W2": jax.random.normal(k2, (hidden, 10), dtype) * float(np.sqrt(2.0 / (hidden + 10))),
            "b2": jnp.zeros(10, dtype)}


def logits(theta, x):
    """MLP logits for images x (..., 64)."""
    return jnp.tanh(x @ theta["W1"] + theta["b1"]) @ theta["W2"] + theta["b2"]


def log_loss(theta, x, y):
    """Per-example −log softmax(net(x))_y; x (n, 64), y (n,)."""
    z = logits(theta, x)
    return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]


def features(theta, data) -> jax.Array:
    """f(θ) ∈ R^K: the mean training log loss under each augmentation (data["x"]: (n, K, 64))."""
    z = logits(theta, data["x"])  # (n, K, 10)
    y = jnp.broadcast_to(data["y"][:, None], z.shape[:2])
    per = jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[..., None], axis=-1)[..., 0]
    return jnp.mean(per, axis=0)


def val_loss(theta, data) -> jax.Array:
    """Mean log loss on un-augmented images: data = {"x": (n, 64), "y": (n,)}."""
    return jnp.mean(log_loss(theta, data["x"], data["y"]))


def metrics(theta, data) -> dict:
    """Log loss and accuracy on un-augmented images."""
    z = logits(theta, data["x"])
    return {"log_loss": float(val_loss(theta, data)),
            "accuracy": float(np.mean(np.asarray(jnp.argmax(z, axis=-1)) == np.asarray(data["y"])))}


@dataclass
class AugmentationProblem:
    """Everything the example and the benchmark need (see the module docstring)."""

    names: tuple[str, ...]
    loss: LinearLoss
    val_loss: Callable[[Any, Any], jax.Array]
    train: dict  # {"x": (n, K, 64), "y": (n,)}
    val: dict  # {"x": (n, 64), "y": (n,)}
    test: dict
    theta0: dict
    metrics: Callable[[Any, Any], dict]


def digits_augmentation(seed: int = 0, hidden: int = 64, dtype=jnp.float32,
                        augmentations=AUGMENTATIONS) -> AugmentationProblem:
    """The problem for one seed: augmentation draws and the network's initialization use ``seed``;
    the train / validation / test split is fixed (seed 0)."""
    datasets = _require_sklearn()
    X, y = datasets.load_digits(return_X_y=True)
    images = (X / 16.0).reshape(-1, 8, 8)
    tr, va, te = split(len(y), 0)
    rng = np.random.default_rng(seed)
    x_aug = np.stack([augment(images[tr], a, rng).reshape(len(tr), 64) for a in augmentations], axis=1)
    arr = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    labels = lambda idx: jnp.asarray(y[idx], jnp.int32)  # noqa: E731
    return AugmentationProblem(
        names=tuple(augmentations),
        loss=LinearLoss(features, names=augmentations),
        val_loss=val_loss,
        train={"x": arr(x_aug), "y": labels(tr)},
        val={"x": arr(X[va] / 16.0), "y": labels(va)},
        test={"x": arr(X[te] / 16.0), "y": labels(te)},
        theta0=init_mlp(jax.random.key(seed), hidden, dtype),
        metrics=metrics,
    )


# ------------------------------------------------------------------ the comparison protocol
@dataclass
class Run:
    """One trained model of the comparison: the p it was trained with and its scores."""

    p: np.ndarray  # the probabilities used (for online mode, the final ones)
    val_log_loss: float
    test_log_loss: float
    test_accuracy: float
    runs: float  # training runs of `steps` inner steps spent to produce it (compute)


METHODS = ("no augmentation", "uniform", "best single", "random search", "online", "online, retrained")


def compare(seed: int, *, steps: int = 2000, batch_size: int = 64, lr: float = 3e-3,
            inner_steps: int = 100, random_draws: int = 2, hidden: int = 64,
            methods=METHODS, online_options: dict | None = None) -> dict[str, Run]:
    """The methods of the comparison on one seed, every training run ``steps`` Adam steps long.

    * ``no augmentation``: p = identity only;
    * ``uniform``: p_i = 1/K;
    * ``best single``: the augmentation whose single-augmentation run has the lowest validation
      loss (K runs);
    * ``random search``: ``random_draws`` runs with p ~ Dirichlet(1), the best by validation loss
      (2 draws ≈ the compute of ``online, retrained``);
    * ``online``: :func:`lossopt.tune_online` from uniform p — one run with a hypergradient step
      every ``inner_steps`` steps; the model is the run's final θ;
    * ``online, retrained``: a fresh run with the p that online mode learned (2 runs in all).

    Model selection uses the validation split only; the test split is only scored. ``online``
    history is attached to its :class:`Run` as ``.history``.
    """
    from lossopt.online import train, tune_online

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {METHODS}")
    prob = digits_augmentation(seed, hidden=hidden)
    K = len(prob.names)
    tx = _adam(lr)

    def fit(p, runs=1.0) -> Run:
        theta = train(prob.loss, prob.theta0, prob.train, np.asarray(p, np.float32), inner_optimizer=tx,
                      steps=steps, batch_size=batch_size, key=seed)
        return _score(prob, theta, p, runs)

    def best_of(ps) -> Run:
        best = min((fit(p) for p in ps), key=lambda r: r.val_log_loss)
        best.runs = float(len(ps))
        return best

    out = {}
    if "no augmentation" in methods:
        out["no augmentation"] = fit(np.eye(K)[prob.names.index("identity")])
    if "uniform" in methods:
        out["uniform"] = fit(np.full(K, 1.0 / K))
    if "best single" in methods:
        out["best single"] = best_of(list(np.eye(K)))
    if "random search" in methods:
        out["random search"] = best_of(list(np.random.default_rng(1000 + seed).dirichlet(np.ones(K), random_draws)))
    if "online" in methods or "online, retrained" in methods:
        online = tune_online(prob.loss, prob.val_loss, prob.theta0, prob.train, prob.val,
                             np.full(K, 1.0 / K), inner_optimizer=tx, steps=steps // inner_steps,
                             inner_steps=inner_steps, batch_size=batch_size, key=seed,
                             **(online_options or {}))
        out["online"] = _score(prob, online.theta, online.lam, 1.0)
        out["online"].history = online.history
        if "online, retrained" in methods:
            out["online, retrained"] = fit(online.lam, runs=2.0)
    return {m: out[m] for m in methods}


_ADAM: dict = {}


def _adam(lr):
    """One optax.adam object per learning rate, so compiled training loops are reused."""
    import optax

    return _ADAM.setdefault(lr, optax.adam(lr))


def _score(prob, theta, p, runs) -> Run:
    v, t = prob.metrics(theta, prob.val), prob.metrics(theta, prob.test)
    return Run(np.asarray(p, float), v["log_loss"], t["log_loss"], t["accuracy"], runs)


def describe(p, names) -> str:
    """'identity 25%, flip 0%, ...'."""
    return ", ".join(f"{n} {100 * float(v):.0f}%" for n, v in zip(names, p))
