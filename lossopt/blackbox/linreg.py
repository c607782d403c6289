"""LearnLinReg with a free offset: the linear program behind the black-box recommender.

Observations (f_i, v_i), i = 1..m: a trained model's feature vector and its validation loss (lower
is better). For a candidate model i* (tried in order of increasing v) find a feasible λ, α > 0 and
a free β with

    λ·f_{i*} <= λ·f_i          for every i   (i* is the minimizer of λ·f among the observations)
    λ·f_i    >= α·v_i + β      for every i   (λ·f is an upper bound of an affine function of v)

minimizing the total slack Σ_i (λ·f_i − α·v_i − β) / α, measured in units of v (Streeter, "Learning
Optimal Linear Regularizers", ICML 2019, with the offset β added). The first i* whose LP is
feasible and informative wins. If v = c·λ*·f + const exactly (c > 0), the slack is zero at
λ = λ* (up to scale) and, from k + 1 generic observations, nowhere else.

Why the slack is divided by α: the constraints are invariant under (λ, α, β) -> c·(λ, α, β), so
without it the slack of the plain objective can be driven to zero by shrinking α towards its lower
bound while choosing λ to make λ·f nearly constant over the observations — a meaningless fit
(common when m < k). The ratio is a linear-fractional program; the Charnes–Cooper substitution
λ̃ = λ/α, β̃ = β/α, t = 1/α makes it the LP solved here:

    maximize  β̃   (the slack is Σ_i (λ̃·g_i − u_i) − m·β̃ = −m·β̃ on centred data)
    s.t.      λ̃·(g_{i*} − g_i) <= 0,   β̃ − λ̃·g_i <= −u_i,   λ̃ ∈ t·C,   t >= t_min

on standardized data g_i = (f_i − mean f) / std f (column-wise; λ̃ scaled back by the std) and
u_i = (v_i − mean v) / std v — conditioning only; t·C is the constraint set's homogenization
(fixed values, box bounds and the simplex total multiplied by t). When C is a cone t is dropped.
The observations' mean cancels against β, so centring changes nothing but the numbers' size.

Two refinements, both optional:
- ``center=True`` (default): when the optimum is not unique (m < k + 1 or degenerate data) a second
  LP picks, among the solutions whose slack is within a hair of the optimum, the one closest in
  relative L1 distance to the centre of the constraint's initial design — instead of an arbitrary
  vertex that sets most components to a bound.
- constraint generation for large studies: the LP starts from a subset of the 2m rows (the best and
  worst observations, the models nearest to i*) and adds the violated ones until none is; the
  answer is the full LP's.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from lossopt.blackbox.space import _check_observations, _feasible, design_center, is_cone, normalize
from lossopt.constraints import BoundConstraint

__all__ = ["LinRegFit", "learn_linreg"]

FULL_LP_SIZE = 200_000  # m·k up to which the LP takes every observation at once
CG_START, CG_STEP, CG_MAX_ROWS = 100, 100, 600  # constraint generation beyond that
_HIGHS = dict(primal_feasibility_tolerance=1e-10, dual_feasibility_tolerance=1e-10)


class LinRegFit(NamedTuple):
    """The LP's answer in the original units: λ·f_i >= alpha·v_i + beta for every observation."""

    lam: np.ndarray  # feasible, normalized (see ``normalize``)
    index: int  # the observation (row) that λ makes the minimizer of λ·f
    alpha: float
    beta: float
    slack: float  # Σ_i (λ·f_i − alpha·v_i − beta) / alpha, in units of v
    tried: int  # how many candidate models i* were tried (1 = the best one)
    exact: bool  # False when the size cap of constraint generation stopped it early


class _Scaled:
    """Standardized observations and the constraint set in scaled coordinates λ' = λ·s."""

    def __init__(self, F: np.ndarray, v: np.ndarray, bound: BoundConstraint):
        m, k = F.shape
        self.m, self.k, self.bound = m, k, bound
        mu = F.mean(0)
        sd = F.std(0)
        self.constant = sd <= 1e-12 * np.maximum(np.abs(mu), 1e-300)
        s = np.where(self.constant, np.where(np.abs(mu) > 0, np.abs(mu), 1.0), sd)
        self.s, self.mu = s, mu
        self.G = np.where(self.constant, 0.0, (F - mu) / s)
        vm, vs = v.mean(), v.std()
        self.vm, self.vs = vm, (vs if vs > 1e-300 else 1.0)
        self.u = (v - vm) / self.vs
        lo, hi = bound.lower * s, bound.upper * s
        self.cone = is_cone(bound)
        self.lo, self.hi = lo, hi

    def homogeneous_constraints(self):
        """(variable bounds of λ̃, equality rows, inequality rows) of λ̃ ∈ t·C; rows act on (λ̃, t)."""
        b, k = self.bound, self.k
        lo, hi = self.lo, self.hi
        vlo = np.where(lo >= 0, 0.0, -np.inf)  # sign information is homogeneous
        vhi = np.where(hi <= 0, 0.0, np.inf)
        eq_rows, ub_rows = [], []  # each: (dict j -> coef on λ̃_j, coef on t)
        if not self.cone:
            for j in range(k):
                if lo[j] == hi[j]:
                    if lo[j] != 0:
                        eq_rows.append(({j: 1.0}, -lo[j]))
                    continue
                if np.isfinite(lo[j]) and lo[j] != 0:  # λ̃_j >= lo'_j t
                    ub_rows.append(({j: -1.0}, lo[j]))
                if np.isfinite(hi[j]) and hi[j] != 0:  # λ̃_j <= hi'_j t
                    ub_rows.append(({j: 1.0}, -hi[j]))
            if b.sum_mask is not None:
                idx = np.flatnonzero(b.sum_mask)
                w = 1.0 / self.s[idx]
                c = 1.0 / w.max()
                eq_rows.append(({int(j): float(wj * c) for j, wj in zip(idx, w)}, -b.total * c))
        return vlo, vhi, eq_rows, ub_rows

    def pin_scale(self) -> float:
        """A typical magnitude of λ' fixed by the constraint (for t_min)."""
        vals = [np.abs(self.lo[self.bound.fixed_mask])]
        finite = np.isfinite(self.lo) & np.isfinite(self.hi)
        vals.append(np.abs(self.hi[finite]))
        if self.bound.total is not None:
            vals.append(np.array([abs(self.bound.total) * self.s[self.bound.sum_mask].mean()]))
        vals = np.concatenate(vals)
        vals = vals[vals > 0]
        return float(vals.max()) if vals.size else 1.0


def _rows_matrix(rows, k, tcol, n_var):
    """Sparse rows (coefficients on λ̃ and on t) over n_var variables; t sits in column tcol."""
    data, ri, ci = [], [], []
    for r, (coefs, tcoef) in enumerate(rows):
        for j, c in coefs.items():
            data.append(c), ri.append(r), ci.append(j)
        if tcoef != 0:
            data.append(tcoef), ri.append(r), ci.append(tcol)
    return sparse.csr_matrix((data, (ri, ci)), shape=(len(rows), n_var))


class _LP:
    """The LP for one i*, with constraint generation over the observation rows.

    Columns: λ̃ (k), β̃, then t (absent in a cone); in the centring stage also d (k, the
    deviations from the reference) and, in a cone, a free scale τ of the reference.
    """

    def __init__(self, sc: _Scaled, istar: int, ref):
        self.sc, self.istar = sc, istar
        self.with_t = not sc.cone
        self.vlo, self.vhi, self.eq_rows, self.ub_rows = sc.homogeneous_constraints()
        self.D = sc.G[istar] - sc.G  # argmin rows: λ̃·D_i <= 0
        ok = np.abs(self.D).max(1) > 1e-12  # duplicates of i* give empty rows
        ok[istar] = False
        self.arg_ok = ok
        self.t_min = 1e-8 / sc.pin_scale()
        self.ref = ref

    def _build(self, fit_idx, arg_idx, face=None):
        """The LP over the given observation rows. ``face`` (from a solved stage 1) turns it into
        the centring stage: rows and bounds with nonzero duals become equalities — by
        complementary slackness exactly the optimal face — and Σ_j d_j, d_j >= ±(λ̃_j − τ r_j)/w_j
        is minimized (τ = t, or a free scale of the reference in a cone)."""
        sc, k, with_t = self.sc, self.sc.k, self.with_t
        tcol = k + 1
        dcol = k + 1 + int(with_t)
        n_var = dcol + (k + int(not with_t) if face is not None else 0)
        taucol = tcol if with_t else n_var - 1
        nf, na = len(fit_idx), len(arg_idx)
        fit = np.zeros((nf, n_var))
        fit[:, :k], fit[:, k] = -sc.G[fit_idx], 1.0  # β̃ − λ̃·g_i <= −u_i
        arg = np.zeros((na, n_var))
        arg[:, :k] = self.D[arg_idx]  # λ̃·(g_{i*} − g_i) <= 0
        A = [sparse.csr_matrix(fit), sparse.csr_matrix(arg)]
        b = [-sc.u[fit_idx], np.zeros(na)]
        if self.ub_rows:
            A.append(_rows_matrix(self.ub_rows, k, tcol, n_var))
            b.append(np.zeros(len(self.ub_rows)))
        A_ub, b_ub = sparse.vstack(A, format="csr"), np.concatenate(b)
        A_eq = _rows_matrix(self.eq_rows, k, tcol, n_var)
        b_eq = np.zeros(len(self.eq_rows))
        bounds = list(zip(self.vlo, self.vhi)) + [(None, 0.0)]  # β̃ <= 0: the sum of all fit rows
        if with_t:
            bounds.append((self.t_min, None))
        c = np.zeros(n_var)
        if face is None:
            c[k] = -1.0
        else:
            tight_fit, tight_arg, tight_ub, fixed_vars = face
            tight = np.concatenate([np.isin(fit_idx, tight_fit), np.isin(arg_idx, tight_arg),
                                    tight_ub])
            A_eq = sparse.vstack([A_eq, A_ub[tight]], format="csr")
            b_eq = np.concatenate([b_eq, b_ub[tight]])
            A_ub, b_ub = A_ub[~tight], b_ub[~tight]
            for col, val in fixed_vars:
                bounds[col] = (val, val)
            r, w = self.ref
            rows_k = np.arange(k)
            dev = []
            for sgn in (1.0, -1.0):
                data = np.concatenate([sgn / w, -sgn * r / w, -np.ones(k)])
                ci = np.concatenate([rows_k, np.full(k, taucol), dcol + rows_k])
                dev.append(sparse.csr_matrix((data, (np.tile(rows_k, 3), ci)), shape=(k, n_var)))
            A_ub = sparse.vstack([A_ub] + dev, format="csr")
            b_ub = np.concatenate([b_ub, np.zeros(2 * k)])
            bounds += [(0, None)] * (k + int(not with_t))
            c[dcol:dcol + k] = 1.0
        if A_eq.shape[0] == 0:
            A_eq = b_eq = None
        return c, A_ub, b_ub, A_eq, b_eq, bounds

    def solve(self, face=None, rows=None):
        """Solve with constraint generation: returns (x, fit_idx, arg_idx, face of the optimum)
        or None when infeasible."""
        sc = self.sc
        m, k = sc.m, sc.k
        exact = True
        if rows is not None:
            fit_idx, arg_idx = rows
        elif m * k <= FULL_LP_SIZE:
            fit_idx, arg_idx = np.arange(m), np.flatnonzero(self.arg_ok)
        else:  # constraint generation from the best observations and the models nearest i*
            fit_idx = np.union1d(np.argsort(sc.u, kind="stable")[:CG_START], [self.istar])
            dist = np.abs(self.D).sum(1)
            dist[~self.arg_ok] = np.inf
            arg_idx = np.sort(np.argsort(dist, kind="stable")[:CG_START])
            arg_idx = arg_idx[self.arg_ok[arg_idx]]
        while True:
            c, A_ub, b_ub, A_eq, b_eq, bounds = self._build(fit_idx, arg_idx, face)
            res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=bounds,
                          method="highs", options=_HIGHS)
            if res.status != 0:
                return None
            x = res.x
            lt, bt = x[:k], x[k]
            tol = 1e-9 * (1.0 + np.abs(lt).sum())
            fit_viol = bt - sc.G @ lt + sc.u
            arg_viol = self.D @ lt
            arg_viol[~self.arg_ok] = -np.inf
            new_fit = np.setdiff1d(np.flatnonzero(fit_viol > tol), fit_idx)
            new_arg = np.setdiff1d(np.flatnonzero(arg_viol > tol), arg_idx)
            if not new_fit.size and not new_arg.size:
                break
            if len(fit_idx) + len(arg_idx) >= CG_MAX_ROWS:
                exact = False  # deterministic cap on the LP's size: an approximate answer
                break
            fit_idx = np.union1d(fit_idx, new_fit[np.argsort(-fit_viol[new_fit])[:CG_STEP]])
            arg_idx = np.union1d(arg_idx, new_arg[np.argsort(-arg_viol[new_arg])[:CG_STEP]])
        self.exact = exact
        if face is not None:
            return x, fit_idx, arg_idx, None
        dual = np.abs(res.ineqlin.marginals)
        thr = 1e-9 * max(1.0, dual.max(initial=0.0))
        nf, na = len(fit_idx), len(arg_idx)
        n_base = k + 1 + int(self.with_t)
        fixed_vars = [(j, x[j]) for j in range(n_base)
                      if abs(res.lower.marginals[j]) > thr or abs(res.upper.marginals[j]) > thr]
        face = (fit_idx[dual[:nf] > thr], arg_idx[dual[nf:nf + na] > thr],
                dual[nf + na:] > thr, fixed_vars)
        return x, fit_idx, arg_idx, face


def learn_linreg(features, values, bound: BoundConstraint, *, max_models: int = 10,
                 center: bool = False) -> Optional[LinRegFit]:
    """LearnLinReg with a free offset (see the module docstring) on checked float arrays.

    ``features``: (m, k) finite; ``values``: (m,) finite; ``bound``: the constraint bound to k.
    Tries the ``max_models`` best-validated observations as i* (ties broken by row order) and
    returns the first fit that is feasible and informative (its slack is below that of λ = 0, the
    fit that ignores the features), or None. ``center``: pick the near-optimal solution closest to
    the design centre when the optimum is not unique (see the module docstring).
    """
    F, v = _check_observations(features, values, bound)
    m, k = F.shape
    if m < 2:
        return None
    if m * k > FULL_LP_SIZE:
        max_models = min(max_models, 3)
    sc = _Scaled(F, v, bound)
    baseline = float(np.sum(sc.u.max() - sc.u))  # slack of λ̃ = 0, β̃ = −max u
    if baseline <= 0:
        return None
    ref = None
    if center:
        r = design_center(bound) * sc.s
        w = np.abs(r)
        w = np.maximum(w, 1e-3 * (w.mean() if w.any() else 1.0))
        ref = (r, w)
    order = np.argsort(v, kind="stable")
    seen = set()
    tried = 0
    for istar in order:
        key = F[istar].tobytes()
        if key in seen:  # a duplicate of a model already tried as i*
            continue
        seen.add(key)
        tried += 1
        if tried > max_models:
            break
        lp = _LP(sc, int(istar), ref)
        out = lp.solve()
        if out is None:
            continue
        x, fit_idx, arg_idx, face = out
        slack = -m * x[k]
        if slack >= baseline * (1 - 1e-9):
            continue  # uninformative: λ·f says nothing about v
        exact = lp.exact
        if center and exact:
            out2 = lp.solve(face=face, rows=(fit_idx, arg_idx))
            if out2 is not None:
                x = out2[0]
        lt = x[:k]
        t = x[k + 1] if lp.with_t else 1.0
        lam = lt / t / sc.s
        lam = _feasible(lam, bound)
        try:
            lam_n = normalize(lam, bound)
        except ValueError:
            continue
        c = float(np.sum(np.abs(lam)) / np.sum(np.abs(lam_n))) if sc.cone else 1.0
        g = F @ lam_n
        if exact and g[istar] > g.min() + 1e-9 * (np.abs(g).max() + 1e-300):
            continue  # rounding destroyed the argmin property (degenerate)
        alpha = 1.0 / (t * sc.vs * c)  # λ̃ = λ/α in the scaled units, undone
        beta = float(np.min(g - alpha * v))
        slack_v = float(np.sum(g - alpha * v - beta) / alpha)
        lam = lam_n
        return LinRegFit(lam, int(istar), float(alpha), beta, slack_v, tried, exact)
    return None
