"""lossopt: learn the hyperparameters λ of linear losses L(θ; λ) = λ·f(θ).

Gradient path: :func:`argmin` (θ*(λ) with its implicit derivative) and :func:`tune` (the outer
loop, with a projected optax optimizer). Black-box path: :class:`Study` (ask/tell for training
done elsewhere, see :mod:`lossopt.blackbox`). See README.md and DESIGN.md.
"""

from lossopt import constraints, linear, prox, proxgrad, solvers
from lossopt.descent import hyperdescent
from lossopt.diagnostics import ConvergenceError, ConvergenceWarning, LinearInfo, SolverInfo
from lossopt.implicit import Argmin, Hypergradient, argmin
from lossopt.loss import LinearLoss
from lossopt.optim import projected
from lossopt.tune import TuneResult, tune
from lossopt import online, stochastic  # approximate solves and online mode (augmentation)
from lossopt.online import tune_online
from lossopt.stochastic import Budget
from lossopt.blackbox.study import Study, Suggestion

__version__ = "0.1.0"

__all__ = [
    "Argmin", "ConvergenceError", "ConvergenceWarning", "Hypergradient", "LinearInfo", "LinearLoss",
    "SolverInfo", "Study", "Suggestion", "TuneResult", "argmin", "constraints", "hyperdescent",
    "linear", "projected", "prox", "proxgrad", "solvers", "tune",
]
__all__ += ["Budget", "online", "stochastic", "tune_online"]
