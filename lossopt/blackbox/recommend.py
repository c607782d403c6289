"""Recommend the next λ to train with, from observed models (f(θ_i), V(θ_i)) — the black-box path.

``recommend(features, values, bound, rng=..., n=1, avoid=None, lams=None)`` returns n feasible,
normalized λ (rows of an (n, k) array), distinct from each other and from the rows of ``avoid``
(λ already tried or pending). Each row is drawn as follows:

1. With probability ``EXPLORATION`` = 10%, or while fewer than 2 observations exist: the
   **initial design** (below), so the search never stays stuck and is asymptotically complete.
2. Otherwise, in 1 − ``LOCAL_SHARE`` = 75% of the remaining draws: **LearnLinReg**
   (``lossopt.blackbox.linreg.learn_linreg``), the feasible λ that makes the best-validated model
   the minimizer of λ·f among the observations while λ·f fits the validation loss as a tight affine
   upper bound — on the best 2(k + 1) observations only: where v is not linear in f, the far-off,
   bad observations would dominate the fit (on the digits benchmark this lowered the best
   validation loss after 120 trainings from 0.1260 to 0.1206). It recovers a perfect linear loss
   v = c·λ*·f + const exactly from k + 1 generic observations. Its answer is used unless it is
   within a relative ``STAGNATION_RTOL`` = 5% (every component) of a λ already tried: then the
   model it makes optimal has in effect been trained already. Where the LP is determined
   (m >= k + 1) but its affine model does not fit (total slack above ``FIT_TRUST`` = 1e-3 of the
   slack of λ = 0), its extrapolation to a far vertex is not supported by the data: the LP is
   solved again within a trust region, a box of ±R in log-λ around the incumbent
   (``lossopt.blackbox.local.lp_region``; R starts at a quarter decade, halves after failed
   steps within it down to a tenth of a decade, grows back after steps that succeed at its edge
   and to three decades when a step returns the incumbent's model again); when that λ has been
   tried, the LP in the region halved, quartered, … (a rejected trust-region step). On the digits
   benchmark (k = 11) this lowered the median best validation loss after 60 trainings from 0.1260
   to about 0.1200 (3 to 8 seeds; the trajectories are chaotic: changing R by 1% moves a seed's
   result by ±0.001); where v is affine in f (a pool of models) the LP is unrestricted as before.
   It also keeps suggestions from k + 1 observations near the observed λ: the 12 rows of
   examples/observations.csv (k = 11) used to give the LP vertex class_0 = class_2 = 0. With
   fewer than k + 1 observations (an LP the data do not determine) each weight is capped at
   exp(``LP_RADIUS``) times the largest observed (``local.ceiling_region``): with class_0 fixed at
   1 the vertex's other weights used to reach ~1e7; a weight may still go to 0 (bounding it below
   too, or centring the LP on the incumbent, made the pool benchmark 1.5–2× slower).
3. In the first ``LOCAL_SHARE`` + ``ENVELOPE_SHARE`` = 25% + 25% of those draws (before the LP or
   the generic step): the **envelope step** (``lossopt.blackbox.local.envelope_step``). For an
   exact trainer φ(λ) = min_θ λ·f(θ) is concave with ∇φ = f(θ*(λ)), so the observed (λ_i, f_i)
   near the incumbent give the Jacobian ∂f(θ*)/∂λ — symmetric negative semidefinite, null on λ —
   from about k/2 of them (each gives k numbers); with a local linear model of V in f (shrunk
   towards the LP's λ) it gives ∇_{log λ}V, and the step goes a quarter of the trust radius
   against it. On the digits benchmark (k = 11) its steps improved the incumbent 51–54% of the time
   (generic local steps 24%, the LP's λ 36%); over 48 seeds the best validation loss after 60
   trainings reached the target (best + 1%) in 27 seeds instead of 23, median 0.11970 instead of
   0.11982, mean 0.12003 instead of 0.12071 (giving the generic step the same extra share
   instead: 9 of 24 seeds instead of 10). It applies with 4 to ``ENVELOPE_MAX_K`` = 30 free
   components of fixed sign and positive λ near the incumbent (on (a) of the benchmark, 2 free
   components, it was slightly slower: median 13–14 trainings instead of 12 over 9 seeds);
   elsewhere, or when its Jacobian fit is poor, the draw goes on as below.
4. Otherwise (the remaining 25%, or when the LP stagnates): a **trust-region step** around the
   best observation (``lossopt.blackbox.local``): a linear / diagonal-quadratic model of v in
   log-λ coordinates fitted on the nearby observations, whose radius grows after a success and
   shrinks after failures — the refinement LearnLinReg cannot do when v is not linear in f. It
   needs the λ of the observations: ``lams``, or, when not given, λ paired with observations
   through ``avoid`` (``pair_lams``: a training with λ_a returns argmin_i λ_a·f_i).
5. If that repeats a known λ too: multiplicative steps λ_j·exp(σ·z_j) around the LP's λ
   (additive where a component's sign is free), σ doubling from 0.1; finally the design.

**Initial design**: each free component independently log-uniform over 10^±3 around the
constraint's pin scale (the geometric mean of the fixed values, or total/|S| on a simplex, or 1),
log-uniform between positive box bounds, normal where the sign is free; simplex components as
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

import math

import numpy as np

from lossopt.blackbox.linreg import LinRegFit, learn_linreg
from lossopt.blackbox.local import ceiling_region, envelope_step, local_step, lp_region
from lossopt.blackbox.space import (_as_matrix, _check_avoid, _check_observations, _feasible,
                                    design, normalize, perturb)
from lossopt.constraints import BoundConstraint

__all__ = ["recommend", "normalize", "learn_linreg", "LinRegFit", "EXPLORATION"]

EXPLORATION = 0.1
DISTINCT_RTOL = 1e-3
STAGNATION_RTOL = 0.05
LOCAL_SHARE = 0.25
ENVELOPE_SHARE = 0.25  # draws beyond LOCAL_SHARE that try the envelope step before the LP
LP_OBSERVATIONS = 2  # the LP sees the best LP_OBSERVATIONS·(k + 1) observations
FIT_TRUST = 1e-4  # relative slack below which the LP's model is trusted on the whole set
LP_RADIUS = math.log(10.0) / 4  # the LP's trust region in log-λ: a quarter decade initially,
LP_MIN_RADIUS = math.log(10.0) / 10  # a tenth of a decade at least
LP_MAX_RADIUS = 3 * math.log(10.0)  # and three decades at most


def recommend(features, values, bound: BoundConstraint, *, rng: np.random.Generator, n: int = 1,
              avoid=None, lams=None) -> np.ndarray:
    """The next n λ to train with: an (n, k) array of feasible, normalized, distinct rows.

    ``features``: (m, k) feature vectors f(θ_i) of complete trainings (m may be 0); ``values``: (m,)
    their validation losses (lower is better, any sign); ``bound``: a BoundConstraint; ``rng``: a
    numpy Generator (the only source of randomness); ``avoid``: (p, k) λ already tried or pending;
    ``lams``: optional (m, k) λ each observation was trained with (rows of NaN where unknown);
    when None, it is inferred from ``avoid`` (see ``pair_lams``).
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
    known = _check_lams(lams, F, bound) if lams is not None else pair_lams(F, taken)
    best = np.sort(np.argsort(v, kind="stable")[:LP_OBSERVATIONS * (bound.k + 1)])
    ok = ~np.isnan(known).any(1)
    fit, smaller = _fit(F[best], v[best], bound, known[ok], v[ok]) if F.shape[0] >= 2 else (
        None, None)
    local = (known[ok], v[ok], F[ok])
    out = []
    for _ in range(n):
        lam = _propose(fit, local, bound, rng, taken, smaller)
        out.append(lam)
        taken.append(lam)
    return np.stack(out)


def _fit(F, v, bound, lams, values):
    """LearnLinReg on the whole feasible set; where it is determined (m >= k + 1) but does not fit
    (total slack above ``FIT_TRUST`` of the slack of λ = 0: v is not affine in f), again within
    the trust region around the incumbent (``lp_region``), so that its extrapolation is bounded by
    what the observations support. Its λ normalized for ``bound``. Returns (fit, smaller): smaller()
    yields the LP's λ in the trust region halved, quartered, … (down to ``LP_MIN_RADIUS``), the
    steps to try when the LP's λ has been tried already (a rejected trust-region step)."""
    none = lambda: iter(())  # noqa: E731
    if len(v) <= bound.k:  # underdetermined: no weight beyond the observed range
        region = ceiling_region(lams, bound, LP_RADIUS)
        fit = learn_linreg(F, v, region) if region is not None else None
        if fit is None:
            return learn_linreg(F, v, bound), none
        return fit._replace(lam=normalize(_feasible(fit.lam, bound), bound)), none
    fit = learn_linreg(F, v, bound)
    if fit is None:
        return fit, none
    if fit.slack <= FIT_TRUST * max(float(np.sum(v.max() - v)), 1e-300):
        return fit, none

    def solve(region):
        local = learn_linreg(F, v, region)
        return None if local is None else local._replace(
            lam=normalize(_feasible(local.lam, bound), bound))

    def smaller():
        for shrink in range(1, 8):
            region = lp_region(lams, values, bound, LP_RADIUS, LP_MIN_RADIUS, LP_MAX_RADIUS, shrink)
            if region is None:
                return
            out = solve(region)
            if out is not None:
                yield out.lam

    region = lp_region(lams, values, bound, LP_RADIUS, LP_MIN_RADIUS, LP_MAX_RADIUS)
    local = solve(region) if region is not None else None
    return (fit, none) if local is None else (local, smaller)


def pair_lams(F: np.ndarray, tried) -> np.ndarray:
    """The λ each observation was trained with, inferred from the λ tried: a training with λ_a
    returns the minimizer of λ_a·f, so among the observations it is argmin_i λ_a·f_i. A row is
    paired only when exactly one tried λ points at it (pending or failed λ can point anywhere)."""
    out = np.full(F.shape, np.nan)
    if not len(tried) or not len(F):
        return out
    T = np.asarray(tried)
    hit = np.argmin(T @ F.T, axis=1)
    rows, counts = np.unique(hit, return_counts=True)
    for r, c in zip(rows, counts):
        if c == 1:
            out[r] = T[hit == r][0]
    return out


def _propose(fit, local, bound, rng, taken, smaller=None) -> np.ndarray:
    """One λ: the LP's unless it stagnates, else a local step, else a perturbation, else the
    initial design (also with probability EXPLORATION)."""
    draw = rng.random()
    if fit is not None and draw >= EXPLORATION:
        lp_turn = draw >= EXPLORATION + LOCAL_SHARE * (1 - EXPLORATION) or not len(local[1])
        envelope_turn = draw < EXPLORATION + (LOCAL_SHARE + ENVELOPE_SHARE) * (1 - EXPLORATION)
        if envelope_turn and len(local[1]):
            lam = envelope_step(local[0], local[2], local[1], bound, prior_lam=fit.lam)
            if lam is not None and _novel(lam, taken):
                return lam
        if lp_turn and _novel(fit.lam, taken, STAGNATION_RTOL):
            return fit.lam
        if lp_turn and smaller is not None:
            for lam in smaller():
                if _novel(lam, taken, STAGNATION_RTOL):
                    return lam
        for attempt in range(4):
            lam = local_step(*local[:2], bound, rng, jitter=0.5 * attempt) if len(local[1]) else None
            if lam is None:
                break
            if _novel(lam, taken):
                return lam
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


def _novel(lam: np.ndarray, taken, rtol: float = None) -> bool:
    if not taken:
        return True
    T = np.asarray(taken)
    big = np.maximum(np.abs(T), np.abs(lam))
    floor = 1e-12 * big.max(1, keepdims=True) + 1e-300
    rel = np.abs(T - lam) / (big + floor)
    return bool(np.all(rel.max(1) > (DISTINCT_RTOL if rtol is None else rtol)))




def _check_lams(lams, F, bound) -> np.ndarray:
    try:
        L = np.array(lams, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"lams must be numeric: {e}") from None
    if L.shape != F.shape:
        raise ValueError(f"lams must have the shape of features {F.shape}, got {L.shape}")
    unknown = np.isnan(L).all(1)
    _as_matrix(L[~unknown], "lams (known rows)", bound.k, bound.names)
    return normalize(L, bound) if not unknown.any() else np.where(
        unknown[:, None], np.nan, normalize(np.where(unknown[:, None], 1.0, L), bound))
