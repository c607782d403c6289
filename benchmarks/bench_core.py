"""Core gradient-path measurements, side by side in one run (issue: core).

1. Backward-pass overhead: (T_grad − T_solve) / T_solve on logistic regression n = 20000, d = 500,
   float64, with a plain CG adjoint — T_solve is the inner solve alone, T_grad the value and
   hypergradient (inner solve + adjoint solve + one feature JVP). Measured for jax.grad through
   ``solve`` and for ``solve.value_and_hypergrad``.
2. k-scaling: the same hypergradient with per-example weights (k = n + 1) divided by k = 2.
3. Outer steps of ``lossopt tune`` on the main job (digits-class-weights) until the validation
   loss is within 1% of the best reachable (the best over a 100-step run).

Run:  python benchmarks/bench_core.py [--quick] [--write]
(--write replaces the "core" section of benchmarks/RESULTS.md with this run's table).
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lossopt  # noqa: E402
from lossopt.problems import digits_class_weights  # noqa: E402


def timed(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def logistic_data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d) / np.sqrt(d)
    X = rng.normal(size=(2 * n, d))
    y = (X @ w + 0.5 * rng.normal(size=2 * n) > 0).astype(np.float64)
    return (jnp.asarray(X[:n]), jnp.asarray(y[:n])), (jnp.asarray(X[n:]), jnp.asarray(y[n:]))


def logloss(w, X, y):
    z = X @ w
    return jnp.logaddexp(0.0, z) - y * z


def overhead(n, d, repeats):
    train, val = logistic_data(n, d)
    V = lambda w, data: jnp.mean(logloss(w, *data))  # noqa: E731
    k2 = lossopt.LinearLoss(lambda w, data: jnp.stack([0.5 * w @ w, jnp.mean(logloss(w, *data))]))
    kn = lossopt.LinearLoss(lambda w, data: jnp.concatenate([logloss(w, *data) / n, (0.5 * w @ w)[None]]))
    rows = {}
    for name, loss, lam in (("k = 2", k2, jnp.array([1e-3, 1.0])),
                            (f"k = n + 1 = {n + 1}", kn, jnp.concatenate([jnp.ones(n), jnp.array([1e-3])]))):
        solve = lossopt.argmin(loss)
        theta0 = jnp.zeros(d)
        t_solve = timed(jax.jit(lambda l, t0, tr: solve(l, t0, tr)), lam, theta0, train, repeats=repeats)
        grad_fn = jax.jit(jax.value_and_grad(lambda l, t0, tr, va: V(solve(l, t0, tr), va)))
        t_grad = timed(grad_fn, lam, theta0, train, val, repeats=repeats)
        hyper = lambda l, t0, tr, va: solve.value_and_hypergrad(V, l, t0, tr, va)  # noqa: E731
        t_hyper = timed(hyper, lam, theta0, train, val, repeats=repeats)
        hg = hyper(lam, theta0, train, val)
        rows[name] = dict(t_solve=t_solve, t_grad=t_grad, t_hyper=t_hyper,
                          inner_steps=int(hg.info.steps), adjoint_steps=int(hg.adjoint_info.steps))
    return rows


def main_job_steps(steps):
    p = digits_class_weights()
    run = lambda s: lossopt.tune(p.loss, p.val_loss, p.theta0, p.train, p.val, p.lam0,  # noqa: E731
                                 constraint=p.constraint, steps=s)
    long = run(100)
    best = long.best_val_loss
    t = time.perf_counter()
    r = run(steps)
    seconds = time.perf_counter() - t
    within = np.flatnonzero(r.history["val_loss"] <= 1.01 * best)
    return dict(best=best, baseline=float(r.history["val_loss"][0]),
                steps_to_1pct=int(within[0]) if within.size else None, steps=steps, seconds=seconds,
                found=r.best_val_loss)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n = 4000, d = 200, fewer repeats")
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    n, d, repeats = (4000, 200, 3) if args.quick else (20000, 500, 5)

    rows = overhead(n, d, repeats)
    job = main_job_steps(40)
    lines = [
        f"Logistic regression, n = {n}, d = {d}, float64, L-BFGS inner (tol 1e-10), plain CG adjoint "
        f"(tol 1e-10); median of {repeats} timed runs after compilation.",
        "",
        "| features | T_solve (s) | T_grad (s) | (T_grad − T_solve)/T_solve, jax.grad | same, value_and_hypergrad | inner steps | CG steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['t_solve']:.3f} | {r['t_grad']:.3f} | "
                     f"{(r['t_grad'] - r['t_solve']) / r['t_solve']:.2f} | "
                     f"{(r['t_hyper'] - r['t_solve']) / r['t_solve']:.2f} | {r['inner_steps']} | {r['adjoint_steps']} |")
    (a, ra), (b, rb) = rows.items()
    lines += [
        "",
        f"k-scaling: T_grad(k = n + 1) / T_grad(k = 2) = {rb['t_grad'] / ra['t_grad']:.2f} (jax.grad), "
        f"{rb['t_hyper'] / ra['t_hyper']:.2f} (value_and_hypergrad). Goal <= 1.5.",
        "",
        f"Main job (digits-class-weights, k = 11): baseline validation loss {job['baseline']:.5f}; best "
        f"reachable (100-step run) {job['best']:.5f}; a 40-step run (the CLI default is 20) reaches within 1% after "
        f"**{job['steps_to_1pct']} outer steps** (goal <= 20) and finds {job['found']:.5f} "
        f"({job['seconds']:.1f} s for {job['steps'] + 1} inner solves, compilation included).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("core", f"`python benchmarks/bench_core.py`  ({platform.processor() or platform.machine()}, "
                      f"{jax.device_count()} × {jax.devices()[0].platform}, jax {jax.__version__})\n\n" + text)


def write_section(key: str, body: str) -> None:
    """Replace the section between <!-- key --> markers in RESULTS.md (append if absent)."""
    path = pathlib.Path(__file__).with_name("RESULTS.md")
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
