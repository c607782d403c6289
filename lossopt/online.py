"""tune_online: learn λ within one training run, alternating inner steps and hypergradient steps.

Retraining a network for every λ is what makes the outer loop of :func:`lossopt.tune` expensive.
``tune_online`` (a sibling of ``tune``, not an option of it) interleaves the two loops instead, as
Lorraine, Vicol & Duvenaud (AISTATS 2020) do: one outer step is

1. ``inner_steps`` optimizer steps on θ with λ fixed, on minibatches of the training data:
   θ ← θ + tx.update(∇_θ λ·f(θ, B));
2. one hypergradient at the current θ, by the implicit formula of :mod:`lossopt.implicit` with a
   damped, bounded adjoint solve on a fresh training minibatch B':

       (H_{B'}(θ) + μI) u = ∇_θ V(θ, val_data),      ∇_λV ≈ −J_f(θ, B') u,

   with u warm-started from the previous outer step (H = ∇²_θ λ·f; the damping μ keeps the system
   positive definite where H is indefinite, as it may be away from a minimum);
3. one step of the projected optimizer on λ (:func:`lossopt.projected`), so λ stays feasible.

θ is a training iterate, not a minimizer, so these hypergradients are approximations by design;
what ``tune_online`` records for each outer step is how far off they may be: the adjoint
solve's residual and steps, and the norm of the training gradient at θ (on B').

**λ stays on the simplex** (``constraint=simplex()`` by default). For an exact minimizer the
scale of λ is inert (argmin_θ (cλ)·f = argmin_θ λ·f), but under a fixed budget of optimizer steps
it multiplies the learning rate, so a free scale would let the outer loop tune the step size
instead of the mixture. On the simplex λ_i is directly the weight of term i (for augmentations,
its probability).

One outer step is compiled once (θ, optimizer states, λ, u and the data are traced arguments) and
run from a Python loop that records one history row per outer step. The compiled step is kept and
reused by later calls that pass the same objects (loss, val_loss, optimizers, linear solver) and
the same sizes: create an optimizer once, not inside a loop of runs.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from lossopt.constraints import BoundConstraint, as_bound, simplex
from lossopt.diagnostics import LinearInfo, SolverInfo, check_mode, report_now
from lossopt.implicit import argmin
from lossopt.linear import CG
from lossopt.loss import LinearLoss
from lossopt.optim import projected
from lossopt.stochastic import minibatch, steps_on_minibatches
from lossopt.tune import TuneResult

# Defaults: Adam on λ; CG damped enough for the curvature of mean log losses with λ on the
# simplex (eigenvalues of order 1, negative ones down to about −0.2 on the digits network), bounded
# to 10 products per outer step and warm-started.
DEFAULT_OPTIMIZER = optax.adam(0.02)
DEFAULT_LINEAR_SOLVER = CG(damping=1.0, maxiter=10, tol=1e-3)

ONLINE_HISTORY_KEYS = ("lam", "val_loss", "hypergrad", "train_grad_norm", "adjoint_steps",
                       "adjoint_residual", "adjoint_converged", "inner_steps", "seconds")


class _AtPoint:
    """The implicit formula evaluated at the given θ (no solve): ``theta0`` is returned as is.

    Its info reports ‖∇_θ λ·f(θ, batch)‖ as the residual and ``converged=False``: θ was not solved.
    """

    def run(self, fun, theta0):
        g = jax.grad(fun)(theta0)
        resid = otu.tree_norm(g)
        return theta0, SolverInfo(jnp.asarray(False), resid, jnp.asarray(0), jnp.asarray(0.0, resid.dtype))


def train(loss: LinearLoss, theta0: Any, train_data: Any, lam: Any, *, inner_optimizer:
          optax.GradientTransformation, steps: int, batch_size: int | None = 64,
          key: jax.Array | int = 0) -> Any:
    """Plain training with λ fixed: ``steps`` optimizer steps on λ·f over minibatches.

    The same inner loop as :func:`tune_online` (same minibatch draws for the same ``key``), without
    the hypergradient steps — the baseline its overhead is measured against. Returns θ.
    """
    key = jax.random.key(key) if isinstance(key, int) else key
    lam = jnp.asarray(lam, jnp.result_type(*jax.tree.leaves(theta0)))
    run = _cached(_train_fn, loss, inner_optimizer, steps, batch_size)
    return run(theta0, train_data, lam, key)


def _train_fn(loss, tx, steps, batch_size):
    grad_fn = jax.grad(lambda theta, batch, lam: loss.value(lam, theta, batch))

    @jax.jit
    def run(theta0, data, lam, key):
        theta, _ = steps_on_minibatches(lambda th, b: grad_fn(th, b, lam), tx, theta0, tx.init(theta0),
                                        data, key, steps, batch_size)
        return theta

    return run


def tune_online(
    loss: LinearLoss,
    val_loss: Callable[[Any, Any], jax.Array],
    theta0: Any,
    train_data: Any,
    val_data: Any,
    lam0: Any,
    *,
    inner_optimizer: optax.GradientTransformation,
    steps: int = 20,
    inner_steps: int = 100,
    batch_size: int | None = 64,
    hyper_batch_size: int | None = None,
    optimizer: optax.GradientTransformation | None = None,
    constraint=None,
    linear_solver=None,
    key: jax.Array | int = 0,
    callback: Callable[[int, dict], Any] | None = None,
    on_unconverged: str = "warn",
) -> TuneResult:
    """Learn λ within one training run (see the module docstring).

    Args:
      loss, val_loss, theta0, train_data, val_data, lam0: as in :func:`lossopt.tune`;
        ``features(θ, batch)`` must be a mean over examples (minibatches are slices of axis 0 of
        every array leaf of ``train_data``; typed key leaves are left alone).
      inner_optimizer: the optax transformation that trains θ (its state persists across outer steps).
      steps: outer steps; the run makes ``steps * inner_steps`` inner steps in all.
      inner_steps: inner steps between two hypergradient steps.
      batch_size: examples per inner step (None: the full training data).
      hyper_batch_size: examples in B' for the curvature and the feature JVP (default
        ``batch_size``; None with ``batch_size=None``: the full training data).
      optimizer: optax transformation on λ (default ``optax.adam(0.02)``), wrapped in
        :func:`lossopt.projected`.
      constraint: feasible set for λ (default ``simplex()``: see the module docstring).
      linear_solver: the adjoint solver (default ``CG(damping=1.0, maxiter=10, tol=1e-3)``: damped
        and bounded, warm-started). μ must exceed −λ_min(H) for CG to apply; the default suits
        mean log losses with λ on the simplex — check ``history["adjoint_residual"]``.
      key: PRNG key (or int seed) for the minibatches; explicit here because the run is not
        differentiated (``lossopt.stochastic.Budget`` takes it from the data instead).
      callback: ``callback(step, row)`` after each outer step; return True to stop.
      on_unconverged: how adjoint solves that missed their tolerance are reported, once, after
        the run (``"warn"``, ``"raise"``, ``"ignore"``); their residuals are in the history either way.

    Returns:
      A :class:`lossopt.TuneResult`: ``lam`` the final λ, ``theta`` the final θ, ``best_lam`` /
      ``best_theta`` / ``best_val_loss`` at the outer step with the lowest validation loss (that θ
      was trained along the λ trajectory up to then, not with ``best_lam`` alone), and ``history``
      with one row per outer step: ``lam`` (λ used for that step's inner steps), ``val_loss`` (at
      θ after them), ``hypergrad``, ``train_grad_norm``, ``adjoint_steps``, ``adjoint_residual``,
      ``adjoint_converged``, ``inner_steps`` (cumulative), ``seconds``.
    """
    check_mode(on_unconverged)
    key = jax.random.key(key) if isinstance(key, int) else key
    k = loss.num_features(theta0, train_data)
    names = loss.names_for(k)
    bound = as_bound(simplex() if constraint is None else constraint, k, names)
    dtype = jnp.result_type(*jax.tree.leaves(theta0))
    lam = jnp.asarray(lam0, dtype)
    loss.check_lam(lam, k)
    try:
        bound.check(np.asarray(lam0))  # in lam0's own precision (a float32 simplex sums to 1 ± eps32)
    except ValueError as e:
        raise ValueError(f"lam0 is not feasible for {bound}: {e}") from None
    linear_solver = DEFAULT_LINEAR_SOLVER if linear_solver is None else linear_solver
    optimizer = DEFAULT_OPTIMIZER if optimizer is None else optimizer
    lam_tx = projected(optimizer, bound)
    tx = inner_optimizer
    hb = batch_size if hyper_batch_size is None else hyper_batch_size
    outer_step = _cached(_outer_step_fn, loss, val_loss, tx, optimizer, bound, linear_solver,
                         inner_steps, batch_size, hb)

    rows: list[dict] = []
    theta, opt_state, lam_state = theta0, tx.init(theta0), lam_tx.init(lam)
    u = otu.tree_zeros_like(theta0)
    best, status, start = (0, theta0), "completed", time.perf_counter()
    try:
        for step in range(steps):
            theta, opt_state, lam, lam_state, u, stats = outer_step(
                theta, opt_state, lam, lam_state, u, train_data, val_data, jax.random.fold_in(key, step))
            lam_used, value, grad, grad_norm, ainfo = stats
            rows.append({
                "lam": np.asarray(lam_used), "val_loss": float(value), "hypergrad": np.asarray(grad),
                "train_grad_norm": float(grad_norm), "adjoint_steps": int(ainfo.steps),
                "adjoint_residual": float(ainfo.residual), "adjoint_converged": bool(ainfo.converged),
                "tol": float(ainfo.tol), "inner_steps": (step + 1) * inner_steps,
                "seconds": time.perf_counter() - start,
            })
            if rows[-1]["val_loss"] < rows[best[0]]["val_loss"] or step == 0:
                best = (step, theta)
            if callback is not None and callback(step, rows[-1]):
                status = "stopped by callback"
                break
            if not (np.isfinite(rows[-1]["val_loss"]) and np.all(np.isfinite(rows[-1]["hypergrad"]))):
                status = f"stopped: non-finite validation loss or hypergradient at outer step {step}"
                break
    except KeyboardInterrupt:
        status = "interrupted"
    except Exception as exc:
        exc.partial_result = _online_result(rows, names, best, theta, lam, f"failed: {exc!r}", bound)
        raise
    result = _online_result(rows, names, best, theta, lam, status, bound)
    if rows:
        h = result.history
        info = LinearInfo(h["adjoint_converged"], h["adjoint_residual"], h["adjoint_steps"],
                          np.asarray([r["tol"] for r in rows]))
        report_now(info, "tune_online: the adjoint solve (one per outer step, batch element = step)",
                   on_unconverged)
    return result


def _outer_step_fn(loss, val_loss, tx, optimizer, bound, linear_solver, inner_steps, batch_size, hb):
    """One outer step (inner steps, hypergradient, projected λ step), jitted."""
    hyper = argmin(loss, _AtPoint(), linear_solver, on_unconverged="ignore")
    lam_tx = projected(optimizer, bound)
    grad_fn = jax.grad(lambda theta, batch, lam: loss.value(lam, theta, batch))

    @jax.jit
    def outer_step(theta, opt_state, lam, lam_state, u, data, val, key):
        k_inner, k_hyper = jax.random.split(key)
        theta, opt_state = steps_on_minibatches(lambda th, b: grad_fn(th, b, lam), tx, theta, opt_state,
                                                data, k_inner, inner_steps, batch_size)
        batch = data if hb is None else minibatch(data, k_hyper, hb)
        hg = hyper.value_and_hypergrad(val_loss, lam, theta, batch, val, u)
        updates, lam_state = lam_tx.update(hg.grad, lam_state, lam, value=hg.value)
        return (theta, opt_state, optax.apply_updates(lam, updates), lam_state, hg.adjoint,
                (lam, hg.value, hg.grad, hg.info.residual, hg.adjoint_info))

    return outer_step


_CACHE: dict = {}


def _cached(factory, *args):
    """``factory(*args)``, reused across calls with equal arguments (so repeated runs compile once).

    A bound constraint is keyed by its contents; arguments that cannot be hashed skip the cache.
    """
    key = tuple((a.k, a.names, a.lower.tobytes(), a.upper.tobytes(),
                 None if a.sum_mask is None else a.sum_mask.tobytes(), a.total)
                if isinstance(a, BoundConstraint) else a for a in (factory, *args))
    try:
        hash(key)
    except TypeError:
        return factory(*args)
    if key not in _CACHE:
        if len(_CACHE) >= 16:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = factory(*args)
    return _CACHE[key]


def _online_result(rows, names, best, theta, lam, status, bound) -> TuneResult:
    history = {key: np.asarray([r[key] for r in rows]) for key in ONLINE_HISTORY_KEYS}
    if not rows:
        history["lam"] = history["hypergrad"] = np.zeros((0, len(names)))
    best_step, best_theta = best
    return TuneResult(
        lam=np.asarray(lam), best_lam=history["lam"][best_step] if rows else None,
        best_val_loss=float(history["val_loss"][best_step]) if rows else float("nan"),
        theta=theta, best_theta=best_theta, history=history, names=names, status=status,
        best_step=best_step, constraint=bound,
    )
