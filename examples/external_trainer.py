"""Tune a training that lossopt cannot see inside: scikit-learn, through ask/tell.

The trainer is scikit-learn's LogisticRegression on the bundled handwritten digits (no JAX in
the training). Its loss is linear in λ = (one weight per class, one L2 weight):

    λ·f(θ) = Σ_c λ_c f_c(θ) + λ_l2 · ½‖W‖²,   f_c(θ) = (1/n) Σ_{i: y_i = c} −log p_θ(y_i | x_i),

which is what LogisticRegression minimizes, up to the factor λ_l2, with C = 1 and per-example
weights s_i = λ_{y_i} / (n·λ_l2) (its objective is ½‖W‖² + C Σ_i s_i ℓ_i; the intercept is not
penalized, as in f). Each training is converged tightly (tol 1e-10) and checked: the gradient of
λ·f at the returned model is printed at the end. A training that does not converge is told as
failed — an unconverged model can fake a validation loss.

The loop: tell the default model (scikit-learn's C = 1, all class weights 1) as a first
observation, then ask for λ, train, tell f(θ) and the validation log loss (the metric of our
choice), about 30 times. Run from the repository root:

    python examples/external_trainer.py                    # 30 trainings, in memory
    python examples/external_trainer.py --storage study.db # resumable, shareable with workers
    python examples/external_trainer.py --trainings 12 --save-csv examples/observations.csv

The same loop works for any trainer — PyTorch, XGBoost, a cluster job — that can report f(θ).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

import lossopt
from lossopt.constraints import box, fixed, nonnegative
from lossopt.problems import split, standardize

CLASSES = 10
NAMES = [f"class_{c}" for c in range(CLASSES)] + ["l2"]


def load():
    """Digits, split 50/25/25 with seed 0 and standardized (as in `lossopt tune`)."""
    X, y = load_digits(return_X_y=True)
    tr, va, te = split(len(y), seed=0)
    Xtr, Xva, Xte = standardize(X[tr], X[va], X[te])
    return (Xtr, y[tr]), (Xva, y[va]), (Xte, y[te])


def train(lam: np.ndarray, data) -> tuple[LogisticRegression, bool]:
    """argmin_θ λ·f(θ) with scikit-learn; returns the model and whether lbfgs converged."""
    X, y = data
    n = len(y)
    weights = lam[:CLASSES][y] / (n * lam[CLASSES])
    model = LogisticRegression(C=1.0, tol=1e-10, max_iter=20000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X, y, sample_weight=weights)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return model, converged


def per_example_log_loss(model: LogisticRegression, X, y) -> np.ndarray:
    return -model.predict_log_proba(X)[np.arange(len(y)), y]


def features(model: LogisticRegression, data) -> np.ndarray:
    """f(θ) = (f_0, ..., f_9, ½‖W‖²) of a trained model, computed from the model itself."""
    X, y = data
    losses = per_example_log_loss(model, X, y)
    f = [losses[y == c].sum() / len(y) for c in range(CLASSES)]
    return np.array(f + [0.5 * float(np.sum(model.coef_ ** 2))])


def gradient_norm(model: LogisticRegression, lam: np.ndarray, data) -> float:
    """‖∇_θ λ·f(θ)‖∞ at the trained θ = (W, b): ~0 when the trainer minimized exactly λ·f."""
    X, y = data
    n = len(y)
    P = model.predict_proba(X)
    P[np.arange(n), y] -= 1.0
    P *= (lam[:CLASSES][y] / n)[:, None]
    grad_W = X.T @ P + lam[CLASSES] * model.coef_.T
    grad_b = P.sum(axis=0)
    return float(max(np.abs(grad_W).max(), np.abs(grad_b).max()))


def metrics(model: LogisticRegression, data) -> tuple[float, float]:
    X, y = data
    return float(per_example_log_loss(model, X, y).mean()), float(model.score(X, y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainings", type=int, default=30,
                        help="trainings in all, the default model included (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the study (default 0)")
    parser.add_argument("--storage", help="SQLite file for the study (default: in memory)")
    parser.add_argument("--save-csv", metavar="PATH", help="write the observations as CSV")
    args = parser.parse_args()

    train_data, val_data, test_data = load()
    n = len(train_data[1])
    # The scale is pinned by class_0 = 1; the other weights and the L2 strength get a wide box
    # (around the defaults 1 and 1/n) so that the initial design samples them log-uniformly.
    constraint = (nonnegative() & fixed({"class_0": 1.0})
                  & box(lower={**{f"class_{c}": 0.1 for c in range(1, CLASSES)}, "l2": 1e-5},
                        upper={**{f"class_{c}": 10.0 for c in range(1, CLASSES)}, "l2": 0.1}))
    study = lossopt.Study(names=NAMES, constraint=constraint, storage=args.storage,
                          seed=args.seed)

    lam0 = np.array([1.0] * CLASSES + [1.0 / n])  # scikit-learn's default: C = 1
    t0 = time.perf_counter()
    worst_grad, best = 0.0, math.inf
    print(f"{'#':>3}  {'id':>3}  {'val loss':>9}  {'best':>9}  {'λ_l2':>9}  "
          f"{'class weights (min..max)':>24}  note")

    def record(step: int, trial_id: int, lam: np.ndarray, model, converged: bool) -> None:
        nonlocal worst_grad, best
        val = metrics(model, val_data)[0]
        note = ""
        if converged:
            worst_grad = max(worst_grad, gradient_norm(model, lam, train_data))
            best = min(best, val)
        else:
            note = "did not converge: told as failed"
        print(f"{step:>3}  {trial_id:>3}  {val:>9.5f}  {best:>9.5f}  {lam[-1]:>9.3g}  "
              f"{lam[:CLASSES].min():>11.3g} .. {lam[:CLASSES].max():<9.3g}  {note}", flush=True)

    already = len(study.trials)
    if already == 0:  # the default model is the first observation (told with its λ)
        model, ok = train(lam0, train_data)
        tid = study.tell(features(model, train_data), metrics(model, val_data)[0], lam=lam0,
                         failed=not ok)
        record(1, tid, lam0, model, ok)
        already = 1
    for step in range(already + 1, args.trainings + 1):
        suggestion = study.ask()
        lam = suggestion.lam
        model, ok = train(lam, train_data)
        if ok:
            study.tell(features(model, train_data), metrics(model, val_data)[0], id=suggestion.id)
        else:
            study.tell(None, None, id=suggestion.id, failed=True)
        record(step, suggestion.id, lam, model, ok)
    seconds = time.perf_counter() - t0

    best_trial = study.best
    default_model, _ = train(lam0, train_data)
    tuned_model, _ = train(best_trial.lam, train_data)
    rows = [("validation log loss", metrics(default_model, val_data)[0],
             metrics(tuned_model, val_data)[0]),
            ("test log loss", *[metrics(m, test_data)[0] for m in (default_model, tuned_model)]),
            ("test accuracy", *[metrics(m, test_data)[1] for m in (default_model, tuned_model)])]
    print(f"\n{len(study.trials)} trainings in {seconds:.1f} s; best: trial {best_trial.id}")
    print(f"{'':<22}{'default':>10}{'tuned':>10}")
    for label, a, b in rows:
        fmt = (lambda x: f"{x:>10.2%}") if "accuracy" in label else (lambda x: f"{x:>10.4f}")
        print(f"{label:<22}{fmt(a)}{fmt(b)}")
    print("\nbest λ: " + ", ".join(f"{k}={v:.3g}" for k, v in zip(NAMES, best_trial.lam)))
    print(f"largest ‖∇_θ λ·f‖∞ at a converged trained model: {worst_grad:.1e} "
          "(the trainer minimizes exactly λ·f)")
    if args.save_csv:
        study.to_csv(args.save_csv)
        print(f"wrote {args.save_csv}")


if __name__ == "__main__":
    main()
