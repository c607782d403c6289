"""Learn data-augmentation probabilities for a small network on scikit-learn's digits, online.

Six augmentations — identity, horizontal flip (it changes the identity of asymmetric digits),
one-pixel shifts, small rotations, Gaussian noise, pixel dropout — each drawn once per training
example, so f_i(θ) = training log loss under augmentation i is a function of θ, and training with
augmentation i chosen with probability p_i minimizes p·f(θ). ``lossopt.tune_online`` learns p
within one training run (a hypergradient step every 100 Adam steps, p kept on the simplex) and the
script compares the result on the held-out test split with: no augmentation, uniform p, the best
single augmentation (by validation loss), and random search over p with about the same compute.

Needs the demo extra (``pip install -e '.[demo]'``). Then

    python examples/augmentation.py            # 3 seeds, every method (under a minute in all)
    python examples/augmentation.py --quick    # 1 seed, uniform vs online, short run (seconds)
"""

import argparse
import time
import warnings

import numpy as np

import lossopt  # noqa: F401  (the library; the problem lives in lossopt.augmentation)
from lossopt.augmentation import AUGMENTATIONS, METHODS, compare, describe

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="one seed, uniform vs online, 600 steps")
parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default: 3)")
parser.add_argument("--steps", type=int, default=2000, help="Adam steps per training run (default: 2000)")
parser.add_argument("--inner-steps", type=int, default=100, help="Adam steps between hypergradient steps (default: 100)")
args = parser.parse_args()

seeds = [0] if args.quick else list(range(args.seeds))
steps, inner_steps = (600, 50) if args.quick else (args.steps, args.inner_steps)
methods = ("uniform", "online") if args.quick else METHODS

start = time.perf_counter()
runs = {m: [] for m in methods}
for seed in seeds:
    with warnings.catch_warnings():
        # Online hypergradients are approximate by design; their adjoint residuals are kept in the
        # history (printed below) instead of a warning per run.
        warnings.simplefilter("ignore", lossopt.ConvergenceWarning)
        result = compare(seed, steps=steps, inner_steps=inner_steps, methods=methods)
    for m, r in result.items():
        runs[m].append(r)
    h = result["online"].history
    print(f"seed {seed}: online p = {describe(result['online'].p, AUGMENTATIONS)}  "
          f"(adjoint residual ≤ {h['adjoint_residual'].max():.1e}, "
          f"{int(h['adjoint_converged'].sum())}/{len(h['adjoint_converged'])} adjoint solves converged)")

print(f"\nTest split, {len(seeds)} seed(s), {steps} Adam steps per training run (mean ± std over seeds):\n")
print(f"{'method':20s} {'runs':>5s} {'val log loss':>16s} {'test log loss':>16s} {'test accuracy':>16s}")
for m, rs in runs.items():
    v, t, a = (np.array([getattr(r, f) for r in rs]) for f in ("val_log_loss", "test_log_loss", "test_accuracy"))
    print(f"{m:20s} {rs[0].runs:5.0f} {v.mean():9.4f} ± {v.std():.4f} {t.mean():9.4f} ± {t.std():.4f} "
          f"{100 * a.mean():9.2f}% ± {100 * a.std():.2f}")

mean_p = np.mean([r.p for r in runs["online"]], axis=0)
print(f"\nlearned probabilities: {describe(mean_p, AUGMENTATIONS)}")
t_online = np.mean([r.test_log_loss for r in runs["online"]])
for m in methods:
    if m.startswith("online"):
        continue
    t = np.array([r.test_log_loss for r in runs[m]])
    verdict = "lower" if t_online < t.mean() else "not lower"
    print(f"online test log loss is {verdict} than {m} ({t_online:.4f} vs {t.mean():.4f})")
print(f"({time.perf_counter() - start:.0f} s)")
