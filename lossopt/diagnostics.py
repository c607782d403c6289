"""Solve statistics and how an unconverged solve is reported.

Every inner solve and every adjoint (linear) solve carries its statistics. When one of them misses
its tolerance, the hypergradient built on it is not exact, and the user's ``on_unconverged`` choice
decides what happens:

* ``"warn"`` (default): a :class:`ConvergenceWarning` is issued (turn it into an error with
  ``warnings.filterwarnings("error", category=lossopt.ConvergenceWarning)``);
* ``"raise"``: a :class:`ConvergenceError` is raised. Inside ``jax.jit`` the check runs in a host
  callback, and XLA re-raises it as a ``jax.errors.JaxRuntimeError`` (a ``RuntimeError``) whose
  message carries the :class:`ConvergenceError` text;
* ``"ignore"``: nothing is reported (``info`` still carries the statistics).

The check is a ``jax.debug.callback``, so it works under ``jit``, ``grad``, ``vmap`` and inside the
transposed linear solve of reverse mode.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import numpy as np

MODES = ("warn", "raise", "ignore")


class ConvergenceWarning(UserWarning):
    """An inner or adjoint solve missed its tolerance: the result is not exact."""


class ConvergenceError(RuntimeError):
    """Raised instead of :class:`ConvergenceWarning` when ``on_unconverged="raise"``."""


class SolverInfo(NamedTuple):
    """Statistics of an inner solve (a pytree, so it travels through jit and vmap).

    Attributes:
      converged: ``residual <= tol`` and everything finite.
      residual: the solver's optimality residual at the returned point (see the solver's ``tol``).
      steps: iterations taken.
      tol: the tolerance the residual was held to.
    """

    converged: Any
    residual: Any
    steps: Any
    tol: Any


class LinearInfo(NamedTuple):
    """Statistics of a linear solve ``A x = b``: ``residual = ‖A x − b‖ / ‖b‖`` (recomputed at the
    end, not the recurrence's estimate), ``steps`` (matrix-vector products), ``converged``."""

    converged: Any
    residual: Any
    steps: Any
    tol: Any


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"on_unconverged must be one of {MODES}, got {mode!r}")
    return mode


def _describe(what: str, converged, residual, steps, tol) -> str | None:
    converged = np.asarray(converged)
    if bool(np.all(converged)):
        return None
    residual = np.asarray(residual, dtype=float)
    steps = np.asarray(steps)
    tol = np.asarray(tol, dtype=float)
    bad = ~converged
    worst = np.where(bad, np.nan_to_num(residual, nan=np.inf), -np.inf)
    i = np.unravel_index(int(np.argmax(worst)), worst.shape) if worst.ndim else ()
    where = f" (batch element {tuple(int(j) for j in i)}, {int(bad.sum())} of {bad.size} unconverged)" if worst.ndim else ""
    r = residual[i]
    cause = "non-finite values" if not np.isfinite(r) else f"residual {r:.3g} > tol {float(tol[i] if tol.ndim else tol):.3g}"
    return (
        f"{what} did not converge: {cause} after {int(steps[i])} steps{where}. "
        "A result built on it is not exact; raise maxiter, loosen tol, or check the inputs."
    )


def _emit(mode: str, message: str | None) -> None:
    if message is None:
        return
    if mode == "raise":
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=2)


def report(info, what: str, mode: str) -> None:
    """Report ``info`` (a :class:`SolverInfo` or :class:`LinearInfo`) through a host callback."""
    if mode == "ignore":
        return

    def callback(converged, residual, steps, tol):
        _emit(mode, _describe(what, converged, residual, steps, tol))

    jax.debug.callback(callback, info.converged, info.residual, info.steps, info.tol)


def report_now(info, what: str, mode: str) -> None:
    """Report ``info`` holding concrete values, from Python (no callback)."""
    if mode != "ignore":
        _emit(mode, _describe(what, info.converged, info.residual, info.steps, info.tol))
