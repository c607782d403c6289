"""tune: the outer loop of the gradient path — exact hypergradients and a projected optimizer.

Each step solves the inner problem θ*(λ) = argmin_θ λ·f(θ, train_data) (warm-started from the
previous θ*), evaluates V(θ*) = val_loss(θ*, val_data) and its hypergradient ∇_λV (one adjoint
solve, warm-started from the previous adjoint, plus one JVP of the features), records one history
row, then lets the optimizer propose the next λ, projected onto the constraint. One step is
compiled once and reused: λ, θ, the adjoint and the data are traced arguments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from lossopt.constraints import as_bound
from lossopt.descent import hyperdescent
from lossopt.implicit import argmin
from lossopt.loss import LinearLoss
from lossopt.optim import projected

HISTORY_KEYS = ("lam", "val_loss", "hypergrad", "inner_steps", "inner_residual", "adjoint_steps",
                "adjoint_residual", "converged", "seconds")


@dataclass
class TuneResult:
    """What :func:`tune` found.

    Attributes:
      lam: the last λ evaluated.
      best_lam: the λ with the lowest validation loss among rows whose solves converged (among all
        rows if none did).
      best_val_loss: its validation loss.
      theta: θ*(lam);  best_theta: θ*(best_lam).
      history: dict of numpy arrays, one row per inner solve, λ0 first: ``lam`` (n, k),
        ``val_loss``, ``hypergrad`` (n, k), ``inner_steps``, ``inner_residual``,
        ``adjoint_steps``, ``adjoint_residual``, ``converged`` (inner and adjoint both),
        ``seconds`` (wall time since the start, after each row).
      names: the component names.
      status: "completed", "stopped by callback", "interrupted", or why the loop stopped early.
    """

    lam: np.ndarray
    best_lam: np.ndarray
    best_val_loss: float
    theta: Any
    best_theta: Any
    history: dict[str, np.ndarray]
    names: tuple[str, ...]
    status: str = "completed"
    best_step: int = 0
    constraint: Any = field(default=None, repr=False)

    @property
    def n_solves(self) -> int:
        return len(self.history["val_loss"])


def _result(rows, names, best, last_theta, status, bound) -> TuneResult:
    history = {key: np.asarray([r[key] for r in rows]) for key in HISTORY_KEYS}
    if not rows:
        history["lam"] = np.zeros((0, len(names)))
        history["hypergrad"] = np.zeros((0, len(names)))
    best_step, best_theta = best
    return TuneResult(
        lam=history["lam"][-1] if rows else None,
        best_lam=history["lam"][best_step] if rows else None,
        best_val_loss=float(history["val_loss"][best_step]) if rows else float("nan"),
        theta=last_theta, best_theta=best_theta, history=history, names=names, status=status,
        best_step=best_step, constraint=bound,
    )


def tune(
    loss: LinearLoss,
    val_loss: Callable[[Any, Any], jax.Array],
    theta0: Any,
    train_data: Any,
    val_data: Any,
    lam0: Any,
    *,
    solver=None,
    linear_solver=None,
    optimizer: optax.GradientTransformation | None = None,
    constraint=None,
    steps: int = 20,
    callback: Callable[[int, dict], Any] | None = None,
    on_unconverged: str = "warn",
) -> TuneResult:
    """Learn λ so that θ*(λ) = argmin_θ λ·f(θ, train_data) minimizes ``val_loss(θ*, val_data)``.

    Args:
      loss: the :class:`lossopt.LinearLoss`.
      val_loss: ``val_loss(theta, val_data) -> scalar``, differentiable in theta.
      theta0: initial parameters (pytree); later solves are warm-started from the previous θ*.
      train_data, val_data: pytrees passed to ``features`` and ``val_loss`` (traced, not captured).
      lam0: initial λ, shape (k,), feasible for ``constraint``.
      solver, linear_solver, on_unconverged: as in :func:`lossopt.argmin`.
      optimizer: an optax transformation on λ (default :func:`lossopt.hyperdescent`: L-BFGS on
        log λ with accept/reject, no step size to tune). It is wrapped in :func:`lossopt.projected`
        so λ stays feasible; it receives ``value=`` (the validation loss) as an extra argument.
      constraint: a :mod:`lossopt.constraints` description (bound to the loss's names) or None.
      steps: number of optimizer steps; ``steps + 1`` inner solves (λ0 included).
      callback: ``callback(step, row)`` after each solve, ``row`` a dict with the history keys;
        return True to stop.

    Returns:
      A :class:`TuneResult`. If a step raises, the exception carries the partial result as
      ``exc.partial_result``; on KeyboardInterrupt the partial result is returned
      (``status="interrupted"``).
    """
    solve = argmin(loss, solver, linear_solver, on_unconverged)
    k = loss.num_features(theta0, train_data)
    names = loss.names_for(k)
    bound = as_bound(constraint, k, names)
    lam = jnp.asarray(lam0, dtype=jnp.result_type(*jax.tree.leaves(theta0)))
    loss.check_lam(lam, k)
    try:
        bound.check(np.asarray(lam))
    except ValueError as e:
        raise ValueError(f"lam0 is not feasible for {bound}: {e}") from None
    tx = projected(hyperdescent(bound) if optimizer is None else optimizer, bound)
    opt_state = tx.init(lam)
    update = jax.jit(tx.update)

    rows: list[dict] = []
    theta, adjoint = theta0, otu.tree_zeros_like(theta0)
    best, status, start = (0, theta0), "completed", time.perf_counter()
    try:
        for step in range(steps + 1):
            hg = solve.value_and_hypergrad(val_loss, lam, theta, train_data, val_data, adjoint)
            row = {
                "lam": np.asarray(lam), "val_loss": float(hg.value), "hypergrad": np.asarray(hg.grad),
                "inner_steps": int(hg.info.steps), "inner_residual": float(hg.info.residual),
                "adjoint_steps": int(hg.adjoint_info.steps),
                "adjoint_residual": float(hg.adjoint_info.residual),
                "converged": bool(hg.info.converged) and bool(hg.adjoint_info.converged),
                "seconds": time.perf_counter() - start,
            }
            rows.append(row)
            theta, adjoint = hg.theta, hg.adjoint
            if _better(row, rows[best[0]]) or step == 0:
                best = (step, theta)
            if callback is not None and callback(step, row):
                status = "stopped by callback"
                break
            if not (np.isfinite(row["val_loss"]) and np.all(np.isfinite(row["hypergrad"]))):
                status = f"stopped: non-finite validation loss or hypergradient at step {step}"
                break
            if step == steps:
                break
            updates, opt_state = update(hg.grad, opt_state, lam, value=hg.value)
            lam = optax.apply_updates(lam, updates)
    except KeyboardInterrupt:
        status = "interrupted"
    except Exception as exc:
        exc.partial_result = _result(rows, names, best, theta, f"failed: {exc!r}", bound)
        raise
    return _result(rows, names, best, theta, status, bound)


def _better(row: dict, best: dict) -> bool:
    """Converged rows beat unconverged ones; then the lower finite validation loss wins."""
    if row["converged"] != best["converged"]:
        return row["converged"]
    return np.isfinite(row["val_loss"]) and not row["val_loss"] >= best["val_loss"]
