"""A model-based local step around the best observed λ: a trust region in log-λ coordinates.

LearnLinReg assumes the validation loss is an affine function of the features. Where it is not
(continuous training problems near their optimum), its λ settles on a fixed point short of the
optimum and keeps proposing nearly the same λ. This step then refines the incumbent directly.

Coordinates x(λ): log|λ_j| for a free component whose sign its bounds fix (floored at 1e-6 of its
typical magnitude), λ_j / scale_j where the sign is free; fixed components are left out; in a
cone the log coordinates are centred (the scale of λ is irrelevant there).

With x0 the incumbent (the best observation whose λ is known) and r_d the distance to its d-th
nearest neighbour (d = dim x), the radius is Δ = r_d / 2: it halves after about d failed steps
around the same incumbent and grows back when a step succeeds and the incumbent moves — a trust
region whose memory is the data itself, so the step is a function of the observations alone.

- fewer than d + 1 neighbours: a geometry step of length Δ0 = 0.5 along a random direction
  orthogonal to the displacements seen so far (a new direction to fit the model along);
- otherwise a least-squares model v ≈ v0 + g·(x − x0) (+ ½ Σ_j h_j (x_j − x0_j)² with 2d + 1
  neighbours) on the 2d + 1 nearest points, and the step −g/h per coordinate where h_j > 0, else
  −Δ·sign(g_j), cut to length Δ (the steepest-descent step −Δ·g/‖g‖ for the linear model).

Returns None when Δ has shrunk below ``MIN_RADIUS`` (the incumbent is locally optimal to that
resolution) — the caller explores elsewhere.

``envelope_step``: the same trust region, but the gradient of V in log λ comes from a structural
model — the Jacobian of f(θ*(λ)) from the envelope theorem (``envelope_jacobian``), combined with
a local linear model of V in f (``envelope_gradient``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from lossopt.blackbox.space import _feasible, is_cone, normalize, pin_scale
from lossopt.constraints import BoundConstraint

INITIAL_RADIUS = 0.5
MAX_RADIUS = 4.0
MIN_RADIUS = 2e-3


def trust_radius(X: np.ndarray, i0: int, d: int) -> float:
    """Δ from the observations alone (rows in the order observed): twice the distance from the
    incumbent x0 to the nearest earlier point (the step that found it; ``INITIAL_RADIUS`` if it
    came first), clipped to ``MAX_RADIUS``, halved for every max(2, d/2) later points within that
    distance of x0 (failed steps around it)."""
    x0 = X[i0]
    dist = np.linalg.norm(X - x0, axis=1)
    earlier = dist[:i0][dist[:i0] > 1e-9]
    base = min(MAX_RADIUS, 2 * earlier.min()) if earlier.size else INITIAL_RADIUS
    later = dist[i0 + 1:]
    fails = int(np.sum((later > 1e-9) & (later <= 1.01 * base)))
    return base * 0.5 ** (fails // max(2, d // 2))


class Coords:
    """x(λ) and its inverse over the free components (see the module docstring)."""

    def __init__(self, bound: BoundConstraint, lams: np.ndarray):
        self.bound = bound
        free, lo, hi = bound.free_mask, bound.lower, bound.upper
        self.log = free & ((lo >= 0) | (hi <= 0))
        self.lin = free & ~self.log
        self.sign = np.where(hi <= 0, -1.0, 1.0)[self.log]
        mag = np.abs(lams)
        typical = np.array([np.median(c[c > 0]) if np.any(c > 0) else pin_scale(bound)
                            for c in mag.T])
        self.floor = 1e-6 * typical[self.log]
        self.scale = np.maximum(mag.std(0), 1e-3 * np.maximum(typical, 1e-300))[self.lin]
        self.cone = is_cone(bound)
        self.dim = int(self.log.sum() + self.lin.sum())

    def to(self, lams: np.ndarray) -> np.ndarray:
        lams = np.atleast_2d(lams)
        xl = np.log(np.maximum(np.abs(lams[:, self.log]), self.floor))
        if self.cone and xl.shape[1]:
            xl = xl - xl.mean(1, keepdims=True)
        return np.hstack([xl, lams[:, self.lin] / self.scale])

    def back(self, x: np.ndarray, template: np.ndarray) -> np.ndarray:
        lam = template.copy()
        n_log = int(self.log.sum())
        lam[self.log] = self.sign * np.exp(x[:n_log])
        lam[self.lin] = x[n_log:] * self.scale
        return normalize(_feasible(lam, self.bound), self.bound)


def local_step(lams: np.ndarray, values: np.ndarray, bound: BoundConstraint,
               rng: np.random.Generator, jitter: float = 0.0) -> Optional[np.ndarray]:
    """One trust-region step from the best of the observations whose λ is known.

    ``lams``: (m, k) λ of the observations (rows known); ``values``: (m,); ``jitter``: a random
    perturbation of the step, as a fraction of Δ (used to spread several proposals)."""
    if len(values) == 0:
        return None
    C = Coords(bound, lams)
    d = C.dim
    if d == 0:
        return None
    X = C.to(lams)
    i0 = int(np.argmin(values))
    x0 = X[i0]
    dist = np.linalg.norm(X - x0, axis=1)
    others = np.flatnonzero(dist > 1e-9)
    others = others[np.argsort(dist[others], kind="stable")]
    d_eff = d - 1 if C.cone and C.log.any() else d  # centred log coordinates: d − 1 directions
    delta = trust_radius(X, i0, d_eff)
    if delta < MIN_RADIUS:
        return None
    near = others[dist[others] <= 3 * delta]  # a model is local or not at all
    if len(near) < d_eff:  # geometry: a direction not yet explored around x0
        step = _new_direction(X[near] - x0, C, rng) * delta
    else:
        nb = near[: 2 * d_eff + 1]
        D = X[nb] - x0
        y = values[nb] - values[i0]
        quad = len(nb) >= 2 * d_eff + 1
        A = np.hstack([D, 0.5 * D ** 2]) if quad else D
        coef = np.linalg.lstsq(A, y, rcond=None)[0]
        g = coef[:d]
        h = coef[d:] if quad else np.zeros(d)
        if C.cone and C.log.any():
            n_log = int(C.log.sum())
            g[:n_log] -= g[:n_log].mean()
        safe = h > 1e-12
        step = np.where(safe, -g / np.where(safe, h, 1.0), -delta * np.sign(g))
        if not quad:
            norm_g = np.linalg.norm(g)
            step = -delta * g / norm_g if norm_g > 0 else _new_direction(D, C, rng) * delta
        norm = np.linalg.norm(step)
        if norm > delta:
            step *= delta / norm
    if jitter:
        step = step + jitter * delta * _new_direction(np.zeros((0, d)), C, rng)
    return C.back(x0 + step, lams[i0])


def _new_direction(D: np.ndarray, C: Coords, rng: np.random.Generator) -> np.ndarray:
    """A random unit vector orthogonal to the rows of D (and, in a cone, to the log scale)."""
    d = C.dim
    basis = list(D)
    if C.cone and C.log.any():
        ones = np.zeros(d)
        ones[: int(C.log.sum())] = 1.0
        basis.append(ones)
    z = rng.standard_normal(d)
    if basis:
        Q = np.linalg.qr(np.array(basis).T)[0]
        Q = Q[:, : min(len(basis), d)]
        z = z - Q @ (Q.T @ z)
    n = np.linalg.norm(z)
    if n < 1e-12:
        z = rng.standard_normal(d)
        n = np.linalg.norm(z)
    return z / n


def replay_radius(X: np.ndarray, values: np.ndarray, d: int, initial: float, smallest: float,
                  largest: float) -> float:
    """A trust radius R (∞-norm in x) replayed over the observations in the order observed: it
    starts at ``initial``; an observation better than the incumbent at ∞-distance >= R/2 from it
    (a step that used the region and succeeded) doubles R, up to ``largest``; every max(2, d/2)
    observations within R of the incumbent that do not improve on it halve R, down to
    ``smallest``; one with the incumbent's very value (the same model again, as on a finite pool
    of models) doubles R: the loss is flat on that scale. A distant improvement (exploration)
    moves the incumbent and keeps R."""
    R, i0, fails = initial, 0, 0
    for i in range(1, len(values)):
        dist = float(np.max(np.abs(X[i] - X[i0]))) if X.shape[1] else 0.0
        if values[i] < values[i0]:
            if 0.5 * R <= dist <= 1.01 * R:
                R = max(R, min(initial, 2 * R))
            i0, fails = i, 0
        elif values[i] == values[i0] and dist > 1e-9:
            R = largest  # the same model again: a plateau on this scale, look further
        elif 1e-9 < dist <= 1.01 * R:
            fails += 1
            if fails >= max(2, d // 2):
                R, fails = max(smallest, 0.5 * R), 0
    return R


def lp_region(lams: np.ndarray, values: np.ndarray, bound: BoundConstraint,
              initial: float, min_radius: float, max_radius: float,
              shrink: int = 0) -> Optional[BoundConstraint]:
    """The feasible set intersected with a box in log-λ around the incumbent (the best observation
    whose λ is known): |λ_j| within a factor exp(±R) of the incumbent's for every free component
    whose sign is fixed (a component at 0 may grow up to a tenth of its typical magnitude times
    exp(R)); components with a free sign keep their bounds. R is the trust radius replayed
    from the observations (``replay_radius``) within [min_radius, max_radius]: it grows when a step moves the
    incumbent far and shrinks after failed steps around it; ``shrink`` halves it that many times
    more (None once below min_radius). None when no λ is known.

    In a cone the box does not pin the scale: the LP homogenizes it (λ̃ ∈ t·box), so it bounds
    the ratios λ_i / λ_j, which is all that matters there."""
    if len(values) == 0:
        return None
    C = Coords(bound, lams)
    if C.dim == 0 or not C.log.any():
        return None
    X = C.to(lams)
    i0 = int(np.argmin(values))
    d_eff = C.dim - 1 if C.cone else C.dim
    R = replay_radius(X, values, max(d_eff, 1), initial, min_radius, max_radius) * 0.5 ** shrink
    if shrink and R < min_radius:
        return None
    lam0 = normalize(lams[i0], bound)
    mag = np.abs(lam0)
    pos = np.abs(lams)
    typical = np.array([np.median(c[c > 0]) if np.any(c > 0) else pin_scale(bound)
                        for c in pos.T])
    top = np.maximum(mag, 0.1 * typical) * np.exp(R)
    bottom = mag * np.exp(-R)
    lo, hi = bound.lower.copy(), bound.upper.copy()
    j = C.log
    neg = hi <= 0
    new_lo = np.where(neg, -top, bottom)
    new_hi = np.where(neg, -bottom, top)
    lo[j] = np.maximum(lo[j], new_lo[j])
    hi[j] = np.minimum(hi[j], new_hi[j])
    if np.any(lo > hi):
        return None
    return BoundConstraint(bound.k, bound.names, lo, hi, bound.sum_mask, bound.total)


def ceiling_region(lams: np.ndarray, bound: BoundConstraint,
                   radius: float) -> Optional[BoundConstraint]:
    """The feasible set with |λ_j| <= max_i |λ_ij|·exp(radius) for every free component whose
    sign is fixed, over the observed λ (normalized; a component never seen nonzero: a tenth of
    the others' typical magnitude times exp(radius)). For an LP the observations do not determine
    (m < k + 1), whose answer is a vertex of a large set of exact fits: it may then leave a
    component at 0 (ignoring that feature is a legitimate loss, and the vertex's extreme models
    are informative), but not scale the others beyond what was observed — with a component fixed
    at 1 the vertex's other weights used to run to ~1e7. None when no λ is known."""
    if len(lams) == 0:
        return None
    C = Coords(bound, lams)
    if C.dim == 0 or not C.log.any():
        return None
    mag = np.abs(normalize(lams, bound))
    nz = mag[mag > 0]
    typical = float(np.median(nz)) if nz.size else pin_scale(bound)
    top = np.where(mag.max(0) > 0, mag.max(0), 0.1 * typical) * np.exp(radius)
    lo, hi = bound.lower.copy(), bound.upper.copy()
    j = C.log & (lo >= 0)
    hi[j] = np.maximum(np.minimum(hi[j], top[j]), lo[j])
    j = C.log & (hi <= 0)
    lo[j] = np.minimum(np.maximum(lo[j], -top[j]), hi[j])
    return BoundConstraint(bound.k, bound.names, lo, hi, bound.sum_mask, bound.total)


# ------------------------------------------------------------------ envelope-theorem local model
ENVELOPE_MAX_K = 30  # the dense Jacobian has k(k − 1)/2 unknowns: beyond this, the generic step
ENVELOPE_MIN_DIM = 4  # below this many free components the generic step (measured better there)
ENVELOPE_STEP = 0.25  # the step's length as a fraction of the trust radius Δ
ENVELOPE_FIT = 0.5  # relative residual of the Jacobian fit above which it is not used


def envelope_jacobian(lams: np.ndarray, features: np.ndarray, i0: int,
                      rows: np.ndarray) -> tuple[np.ndarray, float]:
    """The Jacobian of the trained model's features with respect to log λ near λ0 = lams[i0].

    For an exact trainer φ(λ) = min_θ λ·f(θ) is concave with ∇φ(λ) = f(θ*(λ)) (envelope theorem),
    so J = ∂f(θ*)/∂λ = ∇²φ is symmetric negative semidefinite, and J·λ = 0 (θ*(cλ) = θ*(λ)).
    In the weighted features h = λ0 ⊙ f and x = log λ the local model is

        h(x) − h0 ≈ M·(x − x0),   M = diag(λ0)·J·diag(λ0)  (symmetric, M·1 = 0),

    scale-free: h_j is term j's share of the training objective. M is parametrized by its
    off-diagonal entries (the diagonal is minus the row sum) and fitted by ridge least squares on
    the observations ``rows`` (each gives k equations; about k/2 of them determine M, against
    k(k + 1)/2 for a quadratic model of V in λ). Returns (M, relative residual of the fit).
    Every λ used must be positive."""
    lam0 = lams[i0]
    k = lam0.size
    X = np.log(lams[rows]) - np.log(lam0)
    H = (features[rows] - features[i0]) * lam0
    iu, ju = np.triu_indices(k, 1)
    P = iu.size
    D = X[:, ju] - X[:, iu]
    A = np.zeros((len(rows), k, P))
    A[:, iu, np.arange(P)] = D  # Δh_i = Σ_{j≠i} M_ij (Δx_j − Δx_i)
    A[:, ju, np.arange(P)] = -D
    A = A.reshape(-1, P)
    y = H.reshape(-1)
    AtA = A.T @ A
    ridge = 1e-6 * max(float(np.trace(AtA)) / P, 1e-300)
    m = np.linalg.solve(AtA + ridge * np.eye(P), A.T @ y)
    M = np.zeros((k, k))
    M[iu, ju] = m
    M[ju, iu] = m
    M[np.arange(k), np.arange(k)] = -M.sum(1)
    norm = float(np.linalg.norm(y))
    resid = float(np.linalg.norm(A @ m - y)) / norm if norm > 0 else np.inf
    return M, resid


def envelope_gradient(lams: np.ndarray, features: np.ndarray, values: np.ndarray, i0: int,
                      rows: np.ndarray, prior_lam: Optional[np.ndarray] = None,
                      weights: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """∇_x V at x0 = log lams[i0] (all k components) from the envelope-theorem model: with
    V ≈ V0 + b·(h − h0) locally (b = a / λ0 for V ≈ V0 + a·(f − f0)) and h − h0 ≈ M·(x − x0)
    (``envelope_jacobian``), ∇_x V ≈ M·b. b is fitted by weighted ridge least squares on the
    observations ``rows`` (Δh, ΔV), shrunk towards a prior: a ∝ ``prior_lam`` (the LP's λ, whose
    affine model is V ≈ (λ_LP·f − β)/α), its scale fitted on the same ΔV, or 0 without one — the
    ΔV determine b only in the span of the Δh, the prior fills in the rest. Exact when V is a
    smooth function of f (∇_θ V in the span of the ∇_θ f_j) and the Δx span every direction.
    None when the Jacobian fit's relative residual exceeds ``ENVELOPE_FIT``."""
    k = lams.shape[1]
    M, resid = envelope_jacobian(lams, features, i0, rows)
    if not resid <= ENVELOPE_FIT:
        return None
    lam0 = lams[i0]
    H = (features[rows] - features[i0]) * lam0
    dv = values[rows] - values[i0]
    w = np.ones(len(rows)) if weights is None else weights
    b0 = np.zeros(k)
    if prior_lam is not None and np.all(np.isfinite(prior_lam)):
        u = (features[rows] - features[i0]) @ prior_lam * w
        if u @ u > 0:
            b0 = max(0.0, float(u @ (dv * w)) / float(u @ u)) * prior_lam / lam0
    A = H * w[:, None]
    rho = 1e-3 * max(float(np.sum(A ** 2)) / k, 1e-300)
    b = b0 + np.linalg.solve(A.T @ A + rho * np.eye(k), A.T @ ((dv - H @ b0) * w))
    return M @ b


def envelope_step(lams: np.ndarray, features: np.ndarray, values: np.ndarray,
                  bound: BoundConstraint, prior_lam: Optional[np.ndarray] = None
                  ) -> Optional[np.ndarray]:
    """A step of ``ENVELOPE_STEP``·Δ from the incumbent (the best observation) against ∇_x V of
    ``envelope_gradient`` (x = log λ; Δ: ``trust_radius``), on its 2k nearest neighbours in x
    (weights 1 / (1 + (distance/Δ)²)), prior ``prior_lam``. Deterministic. None when it does
    not apply: fewer than ``ENVELOPE_MIN_DIM`` free components, k > ``ENVELOPE_MAX_K``, a free
    component whose sign its bounds leave free or fix negative, a λ <= 0 at the incumbent,
    fewer than max(3, k/2) neighbours with positive λ, Δ < ``MIN_RADIUS``, a Jacobian fit worse
    than ``ENVELOPE_FIT``, or no descent direction."""
    k = bound.k
    if len(values) < 4 or k > ENVELOPE_MAX_K:
        return None
    C = Coords(bound, lams)
    d = C.dim
    if d < ENVELOPE_MIN_DIM or C.lin.any() or not np.all(C.sign > 0):
        return None
    X = C.to(lams)
    i0 = int(np.argmin(values))
    if np.any(lams[i0] <= 0):
        return None
    dist = np.linalg.norm(X - X[i0], axis=1)
    d_eff = d - 1 if C.cone else d
    delta = trust_radius(X, i0, d_eff)
    if delta < MIN_RADIUS:
        return None
    others = np.flatnonzero((dist > 1e-9) & np.all(lams > 0, axis=1))
    others = others[np.argsort(dist[others], kind="stable")][: 2 * k]
    if len(others) < max(3, (k + 1) // 2):
        return None
    g = envelope_gradient(lams, features, values, i0, others, prior_lam,
                          1.0 / (1.0 + (dist[others] / delta) ** 2))  # nearer count more
    if g is None:
        return None
    lam0 = lams[i0]
    g = g[C.log]
    if C.cone:
        g = g - g.mean()
    norm = float(np.linalg.norm(g))
    if not norm > 0 or not np.isfinite(norm):
        return None
    return C.back(X[i0] - ENVELOPE_STEP * delta * g / norm, lam0)
