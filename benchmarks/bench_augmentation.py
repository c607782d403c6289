"""Learning augmentation probabilities on digits: online mode against the usual choices, side by side.

1. Comparison (``lossopt.augmentation.compare``): an MLP 64 → 64 (tanh) → 10 trained with Adam
   (3e-3, batch 64) for the same number of steps under each method — no augmentation, uniform p,
   the best single augmentation (by validation loss, K = 6 runs), random search over p (Dirichlet(1)
   draws, the best by validation loss, 2 runs ≈ the compute of online + retraining), online mode
   (``lossopt.tune_online``, one run), and a fresh run with the p online mode learned. Test-split
   log loss and accuracy, mean ± std over seeds.
2. Overhead of online mode: wall time of ``tune_online`` over plain training (``lossopt.online.train``,
   the same inner loop with λ fixed) for the same number of inner steps, both compiled, measured
   alternately in one process; median of repeats. Goal: ≤ 30%.

Run:  python benchmarks/bench_augmentation.py [--quick] [--write]
(--write replaces the "augmentation" section of benchmarks/RESULTS.md with this run's tables).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lossopt  # noqa: E402
from bench_core import write_section  # noqa: E402
from lossopt.augmentation import AUGMENTATIONS, METHODS, _adam, compare, describe, digits_augmentation  # noqa: E402


def comparison(seeds, steps):
    runs = {m: [] for m in METHODS}
    for seed in seeds:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lossopt.ConvergenceWarning)  # residuals are in the history
            for m, r in compare(seed, steps=steps).items():
                runs[m].append(r)
    return runs


def overhead(steps, inner_steps_list, repeats):
    p = digits_augmentation(0)
    k = len(p.names)
    tx, uniform = _adam(3e-3), np.full(k, 1.0 / k, np.float32)

    def plain():
        return jax.block_until_ready(lossopt.online.train(p.loss, p.theta0, p.train, uniform, inner_optimizer=tx,
                                                          steps=steps, batch_size=64, key=0))

    def online(n):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lossopt.ConvergenceWarning)
            r = lossopt.tune_online(p.loss, p.val_loss, p.theta0, p.train, p.val, uniform, inner_optimizer=tx,
                                    steps=steps // n, inner_steps=n, batch_size=64, key=0)
        jax.block_until_ready(r.theta)
        return r

    fns = {"plain": plain, **{n: (lambda n=n: online(n)) for n in inner_steps_list}}
    for f in fns.values():  # compile
        f()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    cg = {n: float(np.mean(online(n).history["adjoint_steps"])) for n in inner_steps_list}
    return med, cg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds, 600 steps, 3 timing repeats")
    ap.add_argument("--write", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    seeds, steps, repeats = (range(3), 600, 3) if args.quick else (range(5), 2000, 5)

    start = time.perf_counter()
    runs = comparison(list(seeds), steps)
    med, cg = overhead(steps, (100, 50), repeats)
    lines = [
        f"MLP 64 → 64 (tanh) → 10 on scikit-learn's digits (train 50% / validation 25% / test 25%, split seed 0), "
        f"six augmentations drawn once per example; every training run is {steps} Adam steps (lr 3e-3, batch 64). "
        f"Online mode: a hypergradient step every 100 inner steps (damped CG, μ = 1, ≤ 10 products, warm-started; "
        f"λ by projected Adam 0.02 on the simplex, from uniform). {len(seeds)} seeds (network initialization, "
        "augmentation draws, minibatch order); mean ± std over seeds. Model selection on validation only.",
        "",
        "| method | training runs | validation log loss | test log loss | test accuracy |",
        "|---|---|---|---|---|",
    ]
    for m, rs in runs.items():
        v, t, a = (np.array([getattr(r, f) for r in rs]) for f in ("val_log_loss", "test_log_loss", "test_accuracy"))
        lines.append(f"| {m} | {rs[0].runs:.0f} | {v.mean():.4f} ± {v.std():.4f} | {t.mean():.4f} ± {t.std():.4f} | "
                     f"{100 * a.mean():.2f}% ± {100 * a.std():.2f} |")
    online = runs["online"]
    lines += ["", "Learned probabilities (online mode, per seed):", ""]
    lines += [f"- seed {s}: {describe(r.p, AUGMENTATIONS)}" for s, r in zip(seeds, online)]
    t_on = np.array([r.test_log_loss for r in online])
    verdicts = []
    for m in ("no augmentation", "uniform", "best single", "random search"):
        t = np.array([r.test_log_loss for r in runs[m]])
        d = t_on - t
        verdicts.append(f"{m}: {d.mean():+.4f} ± {d.std():.4f} (online lower on {int(np.sum(d < 0))}/{len(d)} seeds)")
    lines += ["", "Online minus baseline, test log loss (paired by seed; negative = online better): "
              + "; ".join(verdicts) + "."]
    lines += [
        "",
        f"Overhead of online mode over plain training ({steps} inner steps, same minibatches, both compiled; "
        f"median of {repeats} alternating repeats): plain {med['plain']:.3f} s; "
        + "; ".join(f"hypergradient every {n} steps: {med[n]:.3f} s, overhead **{med[n] / med['plain'] - 1:.0%}** "
                    f"(mean {cg[n]:.1f} CG products per hypergradient)" for n in cg)
        + ". Goal ≤ 30%.",
    ]
    text = "\n".join(lines)
    print(text)
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.write:
        cmd = "python benchmarks/bench_augmentation.py" + (" --quick" if args.quick else "")
        write_section("augmentation", f"`{cmd}`  ({platform.processor() or platform.machine()}, "
                      f"{jax.device_count()} × {jax.devices()[0].platform}, jax {jax.__version__})\n\n" + text)


if __name__ == "__main__":
    sys.exit(main())
