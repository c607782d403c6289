"""Learn per-class loss weights and an L2 weight for logistic regression on scikit-learn's digits.

The same job as ``lossopt tune --problem digits-class-weights``, through the Python API. Needs the demo extra:
``pip install -e '.[demo]'``, then ``python examples/digits_class_weights.py [--steps N]``.
"""

import argparse

import jax

jax.config.update("jax_enable_x64", True)  # before any array is created

import numpy as np  # noqa: E402

import lossopt  # noqa: E402
from lossopt.problems import digits_class_weights  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default: 20)")
steps = parser.parse_args().steps

# The problem bundles L(θ; λ) = λ·f(θ) (10 per-class training losses + ½‖W‖²), the validation
# loss, θ0, the train/val/test splits, the baseline λ0 and the constraint (class_0 fixed at 1).
p = digits_class_weights()

result = lossopt.tune(
    p.loss, p.val_loss, p.theta0, p.train, p.val, p.lam0,
    constraint=p.constraint, steps=steps,
    callback=lambda step, row: print(f"step {step:2d}  validation loss {row['val_loss']:.5f}"),
)

# θ*(λ0): the model trained with the untuned baseline weights.
theta0 = lossopt.argmin(p.loss)(p.lam0, p.theta0, p.train)
base, tuned = p.metrics(theta0, p.test), p.metrics(result.best_theta, p.test)
print(f"test log loss  baseline {base['log_loss']:.4f}   learned {tuned['log_loss']:.4f}")
print(f"test accuracy  baseline {base['accuracy']:.2%}   learned {tuned['accuracy']:.2%}")

classes = np.asarray(result.best_lam[:-1])  # only ratios matter: show class weights with mean 1
for name, weight in zip(result.names, classes / classes.mean()):
    print(f"{name:8s} {weight:8.3f}")
print(f"l2 weight (class weights at mean 1): {result.best_lam[-1] / classes.mean():.3g}")
