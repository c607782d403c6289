"""Learn the L1 and L2 weights of logistic regression on breast cancer with interaction features.

The same job as ``lossopt tune`` (problem ``logreg-l1l2``), written out with the Python API: the
loss λ1‖w‖₁ + λ2·½‖w‖² + 1·(mean training log loss), with the L1 term declared as a prox term so
that the inner problem is solved by FISTA and the hypergradient is exact through the L1 kink.
Needs the demo extra: ``pip install -e '.[demo]'``, then
``python examples/logreg_l1_l2.py [--steps N]``.
"""

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)  # before any array is created

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lossopt  # noqa: E402
from lossopt.constraints import fixed, nonnegative  # noqa: E402
from lossopt.problems import breast_cancer_interactions  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default: 20)")
steps = parser.parse_args().steps

# 284 / 142 / 143 rows, 465 standardized features (30 measurements and their pairwise products).
splits = breast_cancer_interactions(seed=0)
train, val, test = [(jnp.asarray(X), jnp.asarray(y, jnp.float64)) for X, y in splits[:3]]
n, d = train[0].shape


def log_loss(theta, data):
    X, y = data
    z = X @ theta["w"] + theta["b"]
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z)


def features(theta, data):
    w = theta["w"]
    return jnp.stack([jnp.sum(jnp.abs(w)), 0.5 * jnp.sum(w * w), log_loss(theta, data)])


# The L1 term acts on the weights only (the bias stays unpenalized).
loss = lossopt.LinearLoss(features, names=["l1", "l2", "data"], prox={"l1": lossopt.prox.l1(on="w")})
theta0 = {"w": jnp.zeros(d), "b": jnp.zeros(())}
lam0 = np.array([0.5 / n, 0.5 / n, 1.0])  # = LogisticRegression(penalty="elasticnet", l1_ratio=0.5, C=1)

t0 = time.perf_counter()
result = lossopt.tune(
    loss, log_loss, theta0, train, val, lam0,
    constraint=nonnegative() & fixed({"data": 1.0}), steps=steps,
    callback=lambda step, row: print(f"step {step:2d}  λ1 {row['lam'][0]:.3e}  λ2 {row['lam'][1]:.3e}  "
                                     f"validation loss {row['val_loss']:.5f}"),
)
seconds = time.perf_counter() - t0

base = lossopt.argmin(loss)(lam0, theta0, train)  # θ*(λ0): the untuned baseline


def report(theta):
    X, y = test
    z = X @ theta["w"] + theta["b"]
    accuracy = float(jnp.mean((z > 0) == (y > 0.5)))
    return log_loss(theta, test), accuracy, int(jnp.count_nonzero(theta["w"]))


(bl, ba, bn), (tl, ta, tn) = report(base), report(result.best_theta)
print(f"validation log loss  baseline {float(log_loss(base, val)):.4f}   learned {result.best_val_loss:.4f}")
print(f"test log loss        baseline {float(bl):.4f}   learned {float(tl):.4f}")
print(f"test accuracy        baseline {ba:.2%}   learned {ta:.2%}")
print(f"nonzero weights      baseline {bn}   learned {tn}   (of {d})")
print(f"learned λ1 = {result.best_lam[0]:.4g}, λ2 = {result.best_lam[1]:.4g} "
      f"({result.n_solves} inner solves, {seconds:.1f} s)")
