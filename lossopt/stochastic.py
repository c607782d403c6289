"""Approximate inner solves: an optax optimizer run for a fixed budget of steps on minibatches.

``Budget(tx, steps, batch_size)`` is an inner solver for :func:`lossopt.argmin` and
:func:`lossopt.tune` when an exact solve is too expensive (a neural network). It runs

    θ_{t+1} = θ_t + tx.update(∇_θ λ·f(θ_t, B_t)),   t = 0 .. steps − 1,   from θ_0 = theta0,

where B_t is a random minibatch of the training data (the full data when ``batch_size`` is None).
Warm-start it by passing the previous solution as ``theta0`` (``tune`` does); pair it with a damped,
bounded adjoint solve, e.g. ``lossopt.linear.CG(damping=1e-2, maxiter=50, tol=1e-3)``, since the
Hessian at an approximate minimizer of a non-convex loss may be indefinite.

**Where the random key travels: inside ``data``.** The data must hold exactly one typed PRNG key
leaf (``jax.random.key(seed)``), anywhere in the pytree, e.g.
``data = {"x": X, "y": y, "key": jax.random.key(0)}``; ``features`` ignores it. Keeping it in
``data`` makes θ̂(λ) a deterministic function of (λ, θ0, data) — what ``argmin`` differentiates and
what ``tune`` compares from one step to the next — and a new key is a new traced value, never a
recompilation. (``lossopt.tune_online``, a training run that is not itself differentiated, takes
its key as an explicit argument instead.) Step t draws ``batch_size`` example indices uniformly
with replacement using ``jax.random.fold_in(key, t)`` and slices every other array leaf of
``data`` along axis 0 (all of them must share that leading dimension n). ``features(θ, batch)``
must then be an average over examples (a mean, not a sum divided by a constant n), so that a
minibatch gradient estimates the full one without bias.

**What ``converged`` means for a budget.** A budget has no tolerance of its own: it always runs all
``steps``. After the last step the solver evaluates the full-data gradient g(θ) = ∇_θ λ·f(θ, data)
and reports, as every solver in :mod:`lossopt.solvers` does,

    residual = ‖g(θ_T)‖₂ / max(1, ‖g(θ_0)‖₂),        converged ⇔ residual ≤ tol,

(two full-data gradient evaluations per solve). The default ``tol`` is the exact solvers' (1e-10
in float64, 1e-5 in float32), so a budgeted solve is normally reported *not converged* — which is
the truth: the implicit derivative at θ_T is an approximation, and ``argmin``'s ``on_unconverged``
decides whether that warns, raises or passes. Set ``tol`` to the accuracy you accept. For a
μ-strongly convex L the residual still bounds the error, ‖θ_T − θ*‖ ≤ ‖g(θ_T)‖/μ, whatever the
optimizer did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from lossopt.diagnostics import SolverInfo
from lossopt.solvers import default_tol


def is_key(x) -> bool:
    """Whether ``x`` is a typed PRNG key array (``jax.random.key``)."""
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def find_key(data):
    """The one typed PRNG key leaf of ``data`` (see the module docstring)."""
    keys = [x for x in jax.tree.leaves(data) if is_key(x)]
    if len(keys) != 1:
        raise ValueError(
            f"lossopt.stochastic.Budget with batch_size draws its minibatches with a random key "
            f"carried in data, and data must hold exactly one typed key leaf "
            f"(jax.random.key(seed); raw uint32 keys cannot be told apart from data); found "
            f"{len(keys)}. Example: data = {{'x': X, 'y': y, 'key': jax.random.key(0)}}")
    return keys[0]


def num_examples(data) -> int:
    """n, the common leading dimension of the non-key array leaves of ``data``."""
    paths = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(data)
             if not is_key(x)]
    sizes = {name: (jnp.shape(x)[0] if jnp.ndim(x) else None) for name, x in paths}
    ns = {n for n in sizes.values()}
    if not paths or len(ns) != 1 or None in ns:
        raise ValueError(
            "minibatches slice every non-key leaf of data along axis 0, so all of them must be "
            f"arrays with the same leading dimension n; got leading dimensions {sizes} (keep "
            "constants in the features closure, or pass sample=)")
    return ns.pop()


def minibatch(data, key, batch_size: int):
    """``batch_size`` rows of every non-key leaf of ``data``, drawn uniformly with replacement."""
    n = num_examples(data)
    idx = jax.random.randint(key, (batch_size,), 0, n)
    return jax.tree.map(lambda x: x if is_key(x) else jnp.take(x, idx, axis=0), data)


def steps_on_minibatches(grad_fn: Callable, tx: optax.GradientTransformation, theta, opt_state,
                         data, key, steps: int, batch_size: int | None, sample: Callable | None = None):
    """``steps`` optax steps θ ← θ + tx.update(grad_fn(θ, B_t)) with B_t drawn by ``fold_in(key, t)``.

    Returns (θ, opt_state). ``grad_fn(theta, batch) -> gradient``; ``batch_size=None`` uses the
    full ``data`` at every step (then ``key`` is not used).
    """
    draw = sample if sample is not None else (lambda d, k: minibatch(d, k, batch_size))

    def body(t, carry):
        theta, state = carry
        batch = data if batch_size is None and sample is None else draw(data, jax.random.fold_in(key, t))
        updates, state = tx.update(grad_fn(theta, batch), state, theta)
        return optax.apply_updates(theta, updates), state

    return jax.lax.fori_loop(0, steps, body, (theta, opt_state))


@dataclass(frozen=True)
class Budget:
    """Run the optax transformation ``tx`` for exactly ``steps`` steps, on minibatches.

    See the module docstring for the minibatches, the random key (a typed key leaf in ``data``)
    and what ``converged`` means.

    Args:
      tx: a plain optax transformation (``optax.adam(1e-2)``, ``optax.sgd(0.1, momentum=0.9)``);
        its state is initialized afresh at every solve.
      steps: the budget of optimizer steps.
      batch_size: examples per step, or None for full-batch steps (deterministic, no key needed).
      tol: the full-data residual held to for ``converged`` (default by dtype).
      sample: optional ``sample(data, key) -> batch`` replacing the default row sampler.
    """

    tx: optax.GradientTransformation
    steps: int
    batch_size: int | None = None
    tol: float | None = None
    sample: Callable[[Any, Any], Any] | None = None

    def __post_init__(self):
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"Budget: steps must be an int >= 0, got {self.steps!r}")
        if self.batch_size is not None and (int(self.batch_size) != self.batch_size or self.batch_size < 1):
            raise ValueError(f"Budget: batch_size must be a positive int or None, got {self.batch_size!r}")

    def __repr__(self) -> str:
        return f"Budget(steps={self.steps}, batch_size={self.batch_size}, tol={self.tol})"

    def run_loss(self, loss, lam, theta0, data) -> tuple[Any, SolverInfo]:
        """(θ_T, info) for L(θ) = λ·f(θ, data); called by ``argmin`` (it needs the data to batch)."""
        stochastic = self.batch_size is not None or self.sample is not None
        key = find_key(data) if stochastic else jax.random.key(0)
        if stochastic and self.sample is None:
            num_examples(data)  # clear error now rather than inside the loop
        grad_fn = jax.grad(lambda theta, batch: loss.value(lam, theta, batch))
        return self._run(lambda th: loss.value(lam, th, data), grad_fn, theta0, data, key)

    def run(self, fun: Callable[[Any], jax.Array], theta0) -> tuple[Any, SolverInfo]:
        """Full-batch budget on a scalar function (the protocol of :mod:`lossopt.solvers`)."""
        if self.batch_size is not None or self.sample is not None:
            raise ValueError("Budget with batch_size or sample needs the data: use it through "
                             "lossopt.argmin / lossopt.tune (run_loss), not run(fun, theta0)")
        return self._run(fun, lambda theta, _: jax.grad(fun)(theta), theta0, None, jax.random.key(0))

    def _run(self, full_fun, grad_fn, theta0, data, key):
        tol = default_tol(theta0) if self.tol is None else self.tol
        g0 = jax.grad(full_fun)(theta0)
        theta, _ = steps_on_minibatches(grad_fn, self.tx, theta0, self.tx.init(theta0), data, key,
                                        self.steps, self.batch_size, self.sample)
        scale = jnp.maximum(1.0, otu.tree_norm(g0))
        value, g = jax.value_and_grad(full_fun)(theta)
        resid = jnp.where(jnp.isfinite(value), otu.tree_norm(g) / scale, jnp.nan)
        converged = jnp.isfinite(resid) & (resid <= tol)
        return theta, SolverInfo(converged, resid, jnp.asarray(self.steps), jnp.asarray(tol, resid.dtype))
