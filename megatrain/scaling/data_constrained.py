"""Data-constrained scaling (Muennighoff et al. 2023): repeated tokens are worth less than fresh ones.

A run that trains on D tokens drawn from U_D unique ones repeats its data R_D = D / U_D - 1 times;
its effective data is
    D' = U_D + U_D R_D* (1 - exp(-R_D / R_D*))          (D' = D when D <= U_D)
so the first repetitions are worth almost as much as new data and value decays with a half-life
set by the fitted R_D*. The loss is Chinchilla's with D' for D:
    L(N, D, U_D) = E + A / N^alpha + B / D'^beta.
We fit R_D* with the five Chinchilla parameters by profiling: approach 3 (fit.py) is refitted at each
R_D* of a log grid, warm-started from its neighbour, and the best grid point is refined by a bounded
scalar search. Muennighoff et al. also decay excess parameters (R_N*); that term is not fitted here.
Runs record U_D and their epochs (summary.json `unique_tokens`, `epochs`; the loader counts them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from megatrain.scaling.fit import ParametricFit, Point, fit_approach3, interval, theta

GRID = np.geomspace(0.3, 1000.0, 13)  # R_D* searched over; Muennighoff et al. fit R_D* = 15.4


@dataclass(frozen=True)
class RepeatedPoint:
    """A finished run on `tokens` tokens drawn from `unique_tokens` unique ones."""

    point: Point
    unique_tokens: float

    @property
    def repetitions(self) -> float:
        return max(0.0, self.point.tokens / self.unique_tokens - 1.0)


@dataclass
class DataConstrainedFit:
    law: ParametricFit  # fitted on effective data D'
    r_d_star: float

    def effective_tokens(self, tokens: float, unique: float) -> float:
        return effective_tokens(tokens, unique, self.r_d_star)

    def loss(self, n: float, tokens: float, unique: float) -> float:
        return float(self.law.loss(n, self.effective_tokens(tokens, unique)))

    def summary(self) -> dict:
        out = self.law.summary()
        return {k: out[k] for k in ("E", "A", "B", "alpha", "beta")} | {"R_D_star": self.r_d_star,
                                                                          "huber_objective": self.law.objective}


def effective_tokens(tokens: float, unique: float, r_star: float) -> float:
    """D' of Muennighoff et al. eq. 5 for D tokens of U_D unique ones."""
    if tokens <= unique:
        return tokens
    r = tokens / unique - 1.0
    return unique + unique * r_star * (1.0 - math.exp(-r / r_star))


def _fit_at(points: Sequence[RepeatedPoint], r_star: float, inits: Sequence[np.ndarray], starts: int) -> ParametricFit:
    eff = [dataclasses.replace(p.point, tokens=effective_tokens(p.point.tokens, p.unique_tokens, r_star))
           for p in points]
    return fit_approach3(eff, starts=starts, inits=inits)


def fit_data_constrained(points: Sequence[RepeatedPoint]) -> DataConstrainedFit:
    """E, A, B, alpha, beta and R_D* from runs of which some repeat their data (module doc)."""
    for p in points:
        if not math.isfinite(p.unique_tokens) or p.unique_tokens <= 0:
            raise ValueError(f"run {p.point.name or '?'}: unique_tokens={p.unique_tokens} must be a finite "
                             "positive number")
    repeated = [p for p in points if p.repetitions > 0.05]
    if len({round(math.log(1 + p.repetitions), 1) for p in repeated}) < 2:
        raise ValueError(f"a data-constrained fit needs runs that repeat their data at 2 or more repetition "
                         f"counts (D > U_D); {len(repeated)} of {len(points)} runs repeat it")
    fits, best = {}, None
    for r_star in GRID:  # profile over R_D*, each fit warm-started from the last
        fits[r_star] = _fit_at(points, r_star, [theta(best)] if best else [], 32 if best is None else 2)
        best = fits[r_star] if best is None or fits[r_star].objective < best.objective else best
    i = int(np.argmin([fits[r].objective for r in GRID]))
    lo, hi = math.log(GRID[max(0, i - 1)]), math.log(GRID[min(len(GRID) - 1, i + 1)])
    res = minimize_scalar(lambda x: _fit_at(points, math.exp(x), [theta(best)], 2).objective,
                          bounds=(lo, hi), method="bounded", options={"xatol": 1e-3})
    r_star = math.exp(res.x) if res.fun <= best.objective else float(GRID[i])
    return DataConstrainedFit(_fit_at(points, r_star, [theta(best)], 2), r_star)


def bootstrap_data_constrained(points: Sequence[RepeatedPoint], n: int, seed: int = 0) -> dict:
    """95% intervals of the parameters over `n` resamples of the runs."""
    rng = np.random.default_rng(seed)
    fits, failed = [], 0
    for _ in range(n):
        try:
            fits.append(fit_data_constrained([points[i] for i in rng.integers(0, len(points), len(points))]))
        except ValueError:
            failed += 1
    keys = ("E", "A", "B", "alpha", "beta", "R_D_star")
    return {"ci": {k: interval([f.summary()[k] for f in fits]) for k in keys},
            "bootstrap": {"resamples": n, "failed": failed}}
