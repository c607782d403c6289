"""L1 + L2 logistic regression: trainings until within 1% of the grid optimum (issue: nonsmooth).

Two problems, λ = (l1, l2, data) with data fixed at 1 (f = (‖w‖₁, ½‖w‖², mean training log loss),
bias unpenalized, L1 as a prox term):

* ``logreg-l1l2``: breast cancer with 465 interaction features (``lossopt tune``'s default
  problem); seed s = the train/validation/test split seed.
* ``synthetic``: sparse logistic regression, n = 10000 examples (50/25/25 split), d = 1000
  standardized Gaussian features, 20 nonzero true weights (‖w‖ = 3); seed s draws the data.

Search box for every method: l1 ∈ [1e-4, 1], l2 ∈ [1e-5, 1], log scale. The reference is the best
validation loss of a dense 21 × 21 log grid over that box; a method "reaches" when its best
validation loss so far is within 1% of it. Per seed (median over 5 seeds):

* lossopt: ``lossopt.tune`` from the baseline λ0 = (0.5/n, 0.5/n, 1) (scikit-learn's
  ``LogisticRegression(penalty="elasticnet", l1_ratio=0.5, C=1)``), default optimizer;
* grid search: a G × G log grid over the box, for the smallest G whose best point reaches
  (an oracle choice of the resolution, in grid search's favour); trainings = G²;
* random search: log-uniform samples over the box (numpy, seed s);
* TPE: ``optuna.samplers.TPESampler(seed=s)`` over the same log-scaled box.

Every method trains with the same solver (lossopt's FISTA, jit-compiled, cold start for the
black-box methods, warm starts for lossopt as ``tune`` does); seconds are wall time until
reaching, including each method's one compilation per problem instance.

Run:  python benchmarks/bench_nonsmooth.py [--quick] [--write]
(--write replaces the "nonsmooth" section of benchmarks/RESULTS.md with this run's tables).
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from bench_core import write_section  # noqa: E402

import lossopt  # noqa: E402
from lossopt.problems import logreg_l1l2, split  # noqa: E402
from lossopt.proxgrad import FISTA  # noqa: E402

BOX = ((1e-4, 1.0), (1e-5, 1.0))  # (l1, l2), log scale
METHODS = ("lossopt", "grid", "random", "tpe")


# ----------------------------------------------------------------------------- problems
def _log_loss(theta, data):
    X, y = data
    z = X @ theta["w"] + theta["b"]
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z)


def synthetic(seed: int, n: int = 10000, d: int = 1000, k: int = 20):
    """Sparse logistic regression in the same form as ``logreg-l1l2`` (same loss and λ0 rule)."""
    rng = np.random.default_rng(1000 + seed)
    X = rng.normal(size=(n, d))
    w = np.zeros(d)
    w[rng.choice(d, k, replace=False)] = rng.normal(size=k)
    w *= 3.0 / np.linalg.norm(w)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(X @ w)))).astype(np.float64)
    tr, va, _ = split(n, seed)
    base = logreg_l1l2()  # borrow the loss (same features, names, prox term, constraint)
    return dict(loss=base.loss, val_loss=_log_loss, theta0={"w": jnp.zeros(d), "b": jnp.zeros(())},
                train=(jnp.asarray(X[tr]), jnp.asarray(y[tr])), val=(jnp.asarray(X[va]), jnp.asarray(y[va])),
                lam0=np.array([0.5 / len(tr), 0.5 / len(tr), 1.0]), constraint=base.constraint)


def breast_cancer(seed: int):
    p = logreg_l1l2(seed)
    return dict(loss=p.loss, val_loss=p.val_loss, theta0=p.theta0, train=p.train, val=p.val,
                lam0=p.lam0, constraint=p.constraint)


class Trainer:
    """val(λ1, λ2): train θ*(λ1, λ2, 1) from θ0 (cold start) and return the validation loss."""

    def __init__(self, p):
        solve = lossopt.argmin(p["loss"], solver=FISTA(maxiter=50000), on_unconverged="ignore")

        def run(lam, theta0):
            theta, info = solve.with_info(lam, theta0, p["train"])
            return p["val_loss"](theta, p["val"]), theta, info.converged

        self._run = jax.jit(run)
        self.theta0 = p["theta0"]
        self.count = 0
        self.unconverged = 0

    def __call__(self, l1, l2, theta0=None):
        v, theta, ok = self._run(jnp.array([l1, l2, 1.0]), self.theta0 if theta0 is None else theta0)
        self.count += 1
        self.unconverged += int(not bool(ok))
        return float(v), theta


def log_grid(G: int):
    return [np.logspace(np.log10(lo), np.log10(hi), G) for lo, hi in BOX]


def dense_grid(p, G: int):
    """Validation loss on a G × G log grid (warm-started along l2: a reference, not a method)."""
    train = Trainer(p)
    l1s, l2s = log_grid(G)
    V = np.empty((G, G))
    for i, a in enumerate(l1s):
        theta = None
        for j, b in enumerate(l2s):
            V[i, j], theta = train(a, b, theta)
    return l1s, l2s, V, train.unconverged


# ----------------------------------------------------------------------------- methods
def run_lossopt(p, target, budget):
    times, vals = [], []
    t0 = time.perf_counter()

    def callback(step, row):
        times.append(time.perf_counter() - t0)
        vals.append(row["val_loss"])
        return row["val_loss"] <= target

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lossopt.ConvergenceWarning)
        lossopt.tune(p["loss"], p["val_loss"], p["theta0"], p["train"], p["val"], p["lam0"],
                     constraint=p["constraint"], steps=budget - 1, callback=callback)
    return _first_hit(vals, times, target)


def _first_hit(vals, times, target):
    hit = np.flatnonzero(np.asarray(vals) <= target)
    if not hit.size:
        return dict(trainings=np.inf, seconds=np.inf, best=min(vals))
    i = int(hit[0])
    return dict(trainings=i + 1, seconds=times[i], best=min(vals[: i + 1]))


def run_grid(p, target, max_g):
    for G in range(2, max_g + 1):
        t0 = time.perf_counter()
        train = Trainer(p)
        l1s, l2s = log_grid(G)
        best = min(train(a, b)[0] for a in l1s for b in l2s)
        if best <= target:
            return dict(trainings=G * G, seconds=time.perf_counter() - t0, best=best)
    return dict(trainings=np.inf, seconds=np.inf, best=best)


def run_random(p, target, budget, seed):
    rng = np.random.default_rng(seed)
    t0, train = time.perf_counter(), Trainer(p)
    vals, times = [], []
    for _ in range(budget):
        a, b = (float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) for lo, hi in BOX)
        vals.append(train(a, b)[0])
        times.append(time.perf_counter() - t0)
        if vals[-1] <= target:
            break
    return _first_hit(vals, times, target)


def run_tpe(p, target, budget, seed):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    t0, train = time.perf_counter(), Trainer(p)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    vals, times = [], []
    for _ in range(budget):
        trial = study.ask()
        a = trial.suggest_float("l1", *BOX[0], log=True)
        b = trial.suggest_float("l2", *BOX[1], log=True)
        v = train(a, b)[0]
        study.tell(trial, v)
        vals.append(v)
        times.append(time.perf_counter() - t0)
        if v <= target:
            break
    return _first_hit(vals, times, target)


# ----------------------------------------------------------------------------- report
def _fmt(x, spec):
    return "not reached" if not np.isfinite(x) else format(x, spec)


def _median(xs):
    return statistics.median(xs)  # inf (not reached) sorts last


def bench(name, make, seeds, grid_g, budget, max_g, show_grid):
    rows = {m: [] for m in METHODS}
    refs, interior, lines = [], [], []
    for s in seeds:
        p = make(s)
        t = time.perf_counter()
        l1s, l2s, V, unconverged = dense_grid(p, grid_g)
        i, j = np.unravel_index(np.argmin(V), V.shape)
        best = float(V[i, j])
        target = 1.01 * best
        refs.append((best, l1s[i], l2s[j], unconverged, time.perf_counter() - t))
        interior.append(0 < i < grid_g - 1)
        rows["lossopt"].append(run_lossopt(p, target, budget))
        rows["grid"].append(run_grid(p, target, max_g))
        rows["random"].append(run_random(p, target, budget, s))
        rows["tpe"].append(run_tpe(p, target, budget, s))
        print(f"  {name} seed {s}: grid best {best:.5f} at l1 = {l1s[i]:.2e}, l2 = {l2s[j]:.2e}; "
              + ", ".join(f"{m} {_fmt(r[-1]['trainings'], '.0f')}" for m, r in rows.items()), flush=True)
        if show_grid and s == seeds[0]:
            lines += _grid_table(name, s, l1s, l2s, V, (i, j))
    med = {m: (_median([r["trainings"] for r in rs]), _median([r["seconds"] for r in rs])) for m, rs in rows.items()}
    table = [
        f"**{name}** — grid reference (21 × 21): best validation loss per seed "
        + ", ".join(f"{b:.4f}" for b, *_ in refs)
        + f"; best λ1 interior (not on the grid's λ1 edge) in {sum(interior)} of {len(seeds)} seeds"
        + (f"; {sum(r[3] for r in refs)} grid solves hit FISTA's maxiter" if any(r[3] for r in refs) else ""),
        "",
        f"| method | trainings to within 1% (median of {len(seeds)}) | per seed | seconds (median) |",
        "|---|---|---|---|",
    ]
    for m in METHODS:
        per = " ".join(_fmt(r["trainings"], ".0f") for r in rows[m])
        table.append(f"| {m} | {_fmt(med[m][0], '.0f')} | {per} | {_fmt(med[m][1], '.2f')} |")
    ratio = med["tpe"][0] / med["lossopt"][0]
    table += ["", f"TPE / lossopt trainings: {_fmt(ratio, '.1f')}× (goal >= 5×); lossopt within 1% in "
              f"{_fmt(med['lossopt'][0], '.0f')} trainings (goal <= 10). Budget {budget} trainings per method "
              f"(grid: G <= {max_g})."]
    return table, lines


def _grid_table(name, seed, l1s, l2s, V, best):
    cols = list(range(0, len(l2s), max(1, len(l2s) // 6)))
    if best[1] not in cols:
        cols = sorted(cols + [best[1]])
    out = [f"Validation log loss on the {len(l1s)} × {len(l2s)} grid, {name}, seed {seed} "
           f"(rows l1, a subset of the l2 columns; * = grid best):", "", "```",
           "l1 \\ l2   " + "".join(f"{l2s[j]:>10.1e}" for j in cols)]
    for i, a in enumerate(l1s):
        out.append(f"{a:<10.1e}" + "".join(f"{V[i, j]:>9.4f}{'*' if (i, j) == best else ' '}" for j in cols))
    out += ["```", ""]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="2 seeds, 11 × 11 reference grid, synthetic n = 2000, d = 200")
    ap.add_argument("--write", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    seeds = [0, 1] if args.quick else [0, 1, 2, 3, 4]
    grid_g = 11 if args.quick else 21
    n, d = (2000, 200) if args.quick else (10000, 1000)
    t0 = time.perf_counter()
    out = []
    grid_lines = []
    for name, make, show in (("logreg-l1l2", breast_cancer, True),
                             (f"synthetic (n = {n}, d = {d})", lambda s: synthetic(s, n, d), False)):
        table, lines = bench(name, make, seeds, grid_g, budget=100, max_g=10, show_grid=show)
        out += table + [""]
        grid_lines += lines
    text = "\n".join(out + grid_lines).rstrip()
    if grid_g != 21:
        text = text.replace("grid reference (21 × 21)", f"grid reference ({grid_g} × {grid_g})")
    print()
    print(text)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if args.write:
        import optuna

        write_section("nonsmooth", f"`python benchmarks/bench_nonsmooth.py`  ({platform.processor() or platform.machine()}, "
                      f"{jax.device_count()} × {jax.devices()[0].platform}, jax {jax.__version__}, "
                      f"optuna {optuna.__version__}; {time.perf_counter() - t0:.0f} s)\n\n" + text)


if __name__ == "__main__":
    sys.exit(main())
