"""Recommend the next λ to train with, from observed models (f(θ_i), V(θ_i)) — the black-box path.

``recommend(features, values, bound, rng=..., n=1, avoid=None)`` returns n feasible, normalized λ
(rows of an (n, k) array), distinct from each other and from the rows of ``avoid`` (λ already tried
or pending). Each row comes from the first of these that gives a new λ:

1. **LearnLinReg** (``lossopt.blackbox.linreg.learn_linreg``): the feasible λ that makes the
   best-validated model the minimizer of λ·f among the observations while λ·f fits the validation
   loss as a tight affine upper bound. It recovers a perfect linear loss v = c·λ*·f + const exactly
   from k + 1 generic observations; with fewer it is centred on the initial design.
2. **Local search around it**: multiplicative steps λ_j·exp(σ·z_j) (additive where a component's
   sign is free), σ doubling from 0.1 while they repeat a known λ. When the LP's λ repeats one
   already tried, the model it makes optimal has already been trained, so the nearby λ are where
   the next better model can be.
3. **Initial design** (also every draw with probability ``EXPLORATION`` = 10%, so the search never
   stays stuck): each free component independently log-uniform over 10^±3 around the constraint's
   pin scale (the geometric mean of the fixed values, or total/|S| on a simplex, or 1), log-uniform
   between positive box bounds, uniform/normal where the sign is free; simplex components as
   log-uniform weights rescaled to the total and projected onto the box.

**Normalization.** argmin_θ (cλ)·f(θ) = argmin_θ λ·f(θ) for c > 0, so when the feasible set is a
cone — no sum constraint, every lower bound 0 or −∞, every upper bound 0 or +∞ (components fixed at
0 allowed) — a λ and its positive multiples are the same recommendation. ``normalize`` then returns
the representative with Σ_j |λ_j| = 1 (for nonnegative λ: Σ_j λ_j = 1, the probability simplex).
Otherwise the scale is pinned by the constraint (a fixed nonzero component, a simplex total, box
bounds) and λ is returned unchanged. Two λ count as the same when, after normalization, every
component agrees to a relative ``DISTINCT_RTOL`` = 1e-3.

Deterministic for a given ``rng`` state and inputs.
"""

from __future__ import annotations

import numpy as np

from lossopt.blackbox.linreg import LinRegFit, learn_linreg
from lossopt.blackbox.space import (_check_avoid, _check_observations, design, normalize,
                                    perturb)
from lossopt.constraints import BoundConstraint

__all__ = ["recommend", "normalize", "learn_linreg", "LinRegFit", "EXPLORATION"]

EXPLORATION = 0.1
DISTINCT_RTOL = 1e-3


def recommend(features, values, bound: BoundConstraint, *, rng: np.random.Generator, n: int = 1,
              avoid=None) -> np.ndarray:
    """The next n λ to train with: an (n, k) array of feasible, normalized, distinct rows.

    ``features``: (m, k) feature vectors f(θ_i) of complete trainings (m may be 0); ``values``: (m,)
    their validation losses (lower is better, any sign); ``bound``: a BoundConstraint; ``rng``: a
    numpy Generator (the only source of randomness); ``avoid``: (p, k) λ already tried or pending.
    """
    F, v = _check_observations(features, values, bound)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    taken = list(_check_avoid(avoid, bound))
    if np.all(bound.fixed_mask) or (bound.sum_mask is not None and np.sum(
            bound.sum_mask & bound.free_mask) == 1 and np.all(bound.fixed_mask | bound.sum_mask)):
        raise ValueError(f"the constraint {bound!r} admits a single λ: there is nothing to tune")
    fit = learn_linreg(F, v, bound) if F.shape[0] >= 2 else None
    out = []
    for _ in range(n):
        lam = _propose(fit, bound, rng, taken)
        out.append(lam)
        taken.append(lam)
    return np.stack(out)


def _propose(fit, bound, rng, taken) -> np.ndarray:
    explore = fit is None or rng.random() < EXPLORATION
    if not explore:
        if _novel(fit.lam, taken):
            return fit.lam
        sigma = 0.1
        for _ in range(12):
            for _ in range(4):
                lam = perturb(fit.lam, bound, rng, sigma)
                if _novel(lam, taken):
                    return lam
            sigma *= 2
    for _ in range(1000):
        lam = design(bound, rng, 1)[0]
        if _novel(lam, taken):
            return lam
    raise ValueError(f"could not find a λ distinct from the {len(taken)} known ones under "
                     f"{bound!r}")


def _novel(lam: np.ndarray, taken) -> bool:
    if not taken:
        return True
    T = np.asarray(taken)
    big = np.maximum(np.abs(T), np.abs(lam))
    floor = 1e-12 * big.max(1, keepdims=True) + 1e-300
    rel = np.abs(T - lam) / (big + floor)
    return bool(np.all(rel.max(1) > DISTINCT_RTOL))


