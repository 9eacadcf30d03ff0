"""Chinchilla scaling-law fits (Hoffmann et al. 2022, approaches 1, 2 and 3) with bootstrap intervals.

Compute is C = 6 * N * D by default, N being the parameter count the fit uses (`fit.params`) and D
the training tokens: the same convention the sweep generator uses to size its runs, so a run
planned for budget C lands on C here. With `fit.compute=measured` a point carries its measured
training FLOPs (attention and lm head included, flops.py) and C is that number: the allocation
then follows the measured cost per token, fitted as a power law k N^p of N (p = 1, k = 6 is 6ND).
The choice moves the exponents (Pearce and Song 2024; DeepSeek LLM 2024), so every fit says which.
"""

from __future__ import annotations

import ctypes
import glob
import itertools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import scipy
from scipy.optimize import minimize


@dataclass(frozen=True)
class Point:
    """One finished run: N parameters trained on D tokens reached `loss`."""

    params: float
    tokens: float
    loss: float
    budget: float | None = None  # nominal IsoFLOP budget the run was planned for, if any
    name: str = ""
    flops: float | None = None  # measured training FLOPs, set only under fit.compute=measured
    unique_tokens: float | None = None  # distinct training tokens seen (data-constrained fits)

    @property
    def compute(self) -> float:
        return self.flops if self.flops is not None else 6.0 * self.params * self.tokens


@dataclass(frozen=True)
class PowerLaw:
    """y = coefficient * C ** exponent."""

    coefficient: float
    exponent: float

    def __call__(self, compute: float) -> float:
        return self.coefficient * compute**self.exponent


@dataclass
class AllocationFit:
    """Approaches 1 and 2: compute-optimal N and D as power laws of C, from per-budget optima."""

    approach: int
    n_opt: PowerLaw
    d_opt: PowerLaw
    optima: list[dict]  # per budget: C, N, D, loss (approach 2 adds the parabola)
    skipped: list[str] = field(default_factory=list)

    def optimal(self, compute: float) -> tuple[float, float]:
        return self.n_opt(compute), self.d_opt(compute)

    def summary(self) -> dict:
        return {"a": self.n_opt.exponent, "b": self.d_opt.exponent,
                "N_opt": vars(self.n_opt), "D_opt": vars(self.d_opt)}


@dataclass
class ParametricFit:
    """Approach 3: L(N, D) = E + A / N**alpha + B / D**beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # summed Huber loss at the optimum
    cost: PowerLaw = PowerLaw(6.0, 1.0)  # training FLOPs per token as k N^p: C = k N^p D

    approach = 3

    def loss(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.cost.exponent * self.beta)

    @property
    def b(self) -> float:
        return 1.0 - self.cost.exponent * self.a

    def optimal(self, compute: float) -> tuple[float, float]:
        """argmin L(N, D) subject to k N^p D = C; with 6ND (k = 6, p = 1) Hoffmann et al. eq. 4.

        dL/dN = 0 on D = C / (k N^p) gives N^(alpha + p beta) = alpha A (C/k)^beta / (p beta B).
        """
        k, p = self.cost.coefficient, self.cost.exponent
        if self.alpha <= 0 or self.beta <= 0:
            raise ValueError(f"fitted alpha={self.alpha:.3g}, beta={self.beta:.3g}: a compute-optimal "
                             "allocation needs both exponents positive; the data do not constrain the law")
        g = (self.alpha * self.A / (p * self.beta * self.B)) ** (1.0 / (self.alpha + p * self.beta))
        n = g * (compute / k) ** self.a
        return n, compute / (k * n**p)

    def summary(self) -> dict:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta,
                "a": self.a, "b": self.b, "huber_objective": self.objective,
                "flops_per_token": {"k": self.cost.coefficient, "p": self.cost.exponent}}


Fit = AllocationFit | ParametricFit


def check_points(points: Sequence[Point]) -> None:
    """Reject what no law can be fitted to, naming the offending run."""
    if not points:
        raise ValueError("no runs to fit: the inputs held no finished run")
    for p in points:
        for key in ("params", "tokens", "loss"):
            value = getattr(p, key)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"run {p.name or '?'}: {key}={value} must be a finite positive number")


Run = TypeVar("Run")  # a Point, or a run of another fit with .budget and .compute (scaling/hparams.py)


def group_by_budget(points: Sequence[Run], rtol: float = 0.1) -> list[list[Run]]:
    """IsoFLOP groups of runs (anything with `.budget` and `.compute`): the planned budget when every run
    has one, else C within `rtol` of each other."""
    if all(p.budget for p in points):
        budgets = sorted({p.budget for p in points})
        return [[p for p in points if p.budget == b] for b in budgets]
    groups: list[list[Run]] = []
    for p in sorted(points, key=lambda p: p.compute):
        if groups and p.compute <= groups[-1][0].compute * (1 + rtol):
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def group_compute(group: Sequence[Run]) -> float:
    # A group's C: the geometric mean of its runs' compute, in the fit's N and C (fit.params,
    # fit.compute), which need not be those the sweep was planned with; the plan only groups.
    return float(np.exp(np.mean([np.log(p.compute) for p in group])))


def fit_power_law(compute: Sequence[float], values: Sequence[float]) -> PowerLaw:
    """Least squares on log y = log k + e log C."""
    x, y = np.log(np.asarray(compute, float)), np.log(np.asarray(values, float))
    if len(np.unique(x)) < 2:
        raise ValueError("a power law in C needs optima at 2 or more distinct compute budgets")
    exponent, intercept = np.polyfit(x, y, 1)
    return PowerLaw(coefficient=float(np.exp(intercept)), exponent=float(exponent))


def _allocation(approach: int, optima: list[dict], skipped: list[str]) -> AllocationFit:
    c = [o["C"] for o in optima]
    if len({o["N"] for o in optima}) < 2:
        raise ValueError(f"approach {approach}: every compute-optimal run has the same model size; "
                         "sweep at least 2 model sizes per budget")
    return AllocationFit(approach, fit_power_law(c, [o["N"] for o in optima]),
                         fit_power_law(c, [o["D"] for o in optima]), optima, skipped)


def fit_approach1(points: Sequence[Point]) -> AllocationFit:
    """Lowest loss per compute budget, kept where it beats every smaller budget (the frontier)."""
    check_points(points)
    optima, best = [], math.inf
    for group in group_by_budget(points):
        p = min(group, key=lambda q: q.loss)
        if p.loss < best:  # a larger budget that does no better is not on the frontier
            best = p.loss
            optima.append({"C": group_compute(group), "N": p.params, "D": p.tokens, "loss": p.loss, "run": p.name})
    if len(optima) < 2:
        raise ValueError("approach 1 needs the frontier at 2 or more compute budgets; "
                         f"the runs give {len(optima)}")
    return _allocation(1, optima, [])


def fit_approach2(points: Sequence[Point]) -> AllocationFit:
    """A parabola in log N per IsoFLOP budget; its minimum is that budget's optimal N."""
    check_points(points)
    optima, skipped = [], []
    for group in group_by_budget(points):
        c = group_compute(group)
        log_n = np.log([p.params for p in group])
        if len(np.unique(log_n)) < 3:
            skipped.append(f"C={c:.3g}: {len(np.unique(log_n))} model size(s), a parabola needs 3")
            continue
        curvature, slope, const = np.polyfit(log_n, [p.loss for p in group], 2)
        if curvature <= 0:
            skipped.append(f"C={c:.3g}: loss is not convex in log N, no minimum")
            continue
        x = -slope / (2 * curvature)
        sizes = sorted(p.params for p in group)
        lowest = min(group, key=lambda p: p.loss).params
        if lowest in (sizes[0], sizes[-1]) or not log_n.min() < x < log_n.max():
            # Not bracketed: the vertex is an extrapolation of the curve, not a measured minimum.
            edge = "smallest" if lowest == sizes[0] else "largest" if lowest == sizes[-1] else "an inner"
            skipped.append(f"C={c:.3g}: lowest loss at the {edge} swept size (N={lowest:.3g}), parabola "
                           f"minimum at N={math.exp(x):.3g}: the minimum is not bracketed, so N_opt there is "
                           "unconstrained; sweep sizes beyond it")
            continue
        n = float(np.exp(x))
        min_loss = float(np.polyval([curvature, slope, const], x))
        # D at the vertex along this budget's runs: exactly C / 6N under 6ND, the measured cost otherwise.
        d = c / (6 * n) if all(p.flops is None for p in group) else float(
            np.exp(np.polyval(np.polyfit(log_n, np.log([p.tokens for p in group]), 1), x)))
        optima.append({"C": c, "N": n, "D": d, "loss": min_loss,
                       "parabola": [float(curvature), float(slope), float(const)]})
    if len(optima) < 2:
        raise ValueError("approach 2 needs 2 or more IsoFLOP budgets with 3+ model sizes and a convex, "
                         f"bracketed loss curve; usable budgets: {len(optima)}" + "".join(f"\n  {s}" for s in skipped))
    return _allocation(2, optima, skipped)


# Hoffmann et al.'s initialisation grid over (a, b, e, alpha, beta), A = e^a, B = e^b, E = e^e.
CHINCHILLA_GRID = (np.arange(0, 30, 5.0), np.arange(0, 30, 5.0), np.arange(-1, 1.5, 0.5),
                   np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    small = np.abs(r) <= delta
    return np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))


def _lse_terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    a, b, e, alpha, beta = theta
    return np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    u = _lse_terms(theta, log_n, log_d)
    top = u.max(axis=0)
    w = np.exp(u - top)
    total = w.sum(axis=0)
    r = top + np.log(total) - log_l
    w /= total  # d lse / d u_k
    dr = np.clip(r, -delta, delta)  # Huber'(r)
    grad = np.array([np.sum(dr * w[0]), np.sum(dr * w[1]), np.sum(dr * w[2]),
                     -np.sum(dr * w[0] * log_n), -np.sum(dr * w[1] * log_d)])
    return float(_huber(r, delta).sum()), grad


def _grid_objective(grid: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
                    delta: float) -> np.ndarray:
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    r = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e) - log_l
    return _huber(r, delta).sum(axis=1)


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Run L-BFGS-B's tiny BLAS calls on one thread.

    On a busy machine scipy's OpenBLAS threads spin-wait on every 5-vector operation: measured
    35x slower (17.5 s against 0.5 s for one fit on 2 shared cores). A no-op where scipy is not
    built with its bundled OpenBLAS.
    """
    libs = glob.glob(os.path.join(os.path.dirname(scipy.__file__) + ".libs", "libscipy_openblas*.so*"))
    try:
        lib = ctypes.CDLL(libs[0])
        before = lib.scipy_openblas_get_num_threads()
    except (IndexError, OSError, AttributeError):
        yield
        return
    lib.scipy_openblas_set_num_threads(1)
    try:
        yield
    finally:
        lib.scipy_openblas_set_num_threads(before)


def fit_approach3(points: Sequence[Point], delta: float = 1e-3, starts: int = 32,
                  inits: Sequence[np.ndarray] = ()) -> ParametricFit:
    """Huber loss on log residuals, L-BFGS from the best `starts` points of the Chinchilla grid.

    The whole grid is scored in one vectorised pass; only its best points (plus `inits`, e.g. a
    previous fit) are refined, which finds the same optimum as refining all 4,500 at a fraction
    of the cost (what makes bootstrapping affordable).
    """
    check_points(points)
    if len(points) < 5:
        raise ValueError(f"approach 3 fits 5 parameters (E, A, B, alpha, beta) and got {len(points)} runs; "
                         "it needs at least 5")
    log_n = np.log([p.params for p in points])
    log_d = np.log([p.tokens for p in points])
    log_l = np.log([p.loss for p in points])
    if len(np.unique(log_n)) < 2 or len(np.unique(log_d)) < 2:
        raise ValueError("approach 3 needs runs at 2 or more model sizes and 2 or more token counts; "
                         f"got {len(np.unique(log_n))} size(s) and {len(np.unique(log_d))} token count(s)")
    if np.linalg.matrix_rank(np.stack([np.ones_like(log_n), log_n, log_d]), tol=1e-6) < 3:
        raise ValueError("approach 3: all runs lie on one line in (log N, log D), e.g. a single IsoFLOP "
                         "budget, so the effects of N and D cannot be separated; add another budget")
    grid = np.array(list(itertools.product(*CHINCHILLA_GRID)))
    scores = _grid_objective(grid, log_n, log_d, log_l, delta)
    candidates = [*inits, *grid[np.argsort(scores)[:starts]]]
    best = None
    with _single_threaded_blas():
        for x0 in candidates:
            # ftol is relative to max(|f|, 1) in L-BFGS-B: Huber sums of ~1e-6 need a tiny one.
            res = minimize(_objective, np.asarray(x0, float), args=(log_n, log_d, log_l, delta), jac=True,
                           method="L-BFGS-B", options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
            if best is None or res.fun < best.fun:
                best = res
    a, b, e, alpha, beta = best.x
    with np.errstate(over="ignore"):  # an unconstrained resample may run to A = inf: left out of CIs
        return ParametricFit(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)),
                             alpha=float(alpha), beta=float(beta), objective=float(best.fun), cost=cost_law(points))


def cost_law(points: Sequence[Point]) -> PowerLaw:
    """Training FLOPs per token as k N^p: 6N under 6ND, else fitted to the runs' measured FLOPs."""
    if all(p.flops is None for p in points):
        return PowerLaw(6.0, 1.0)
    if any(p.flops is None for p in points):
        raise ValueError("fit.compute=measured: some runs have no measured FLOPs (summary.json 'flops', "
                         "a CSV 'flops' column); give them or use fit.compute=6nd")
    return fit_power_law([p.params for p in points], [p.flops / p.tokens for p in points])


def theta(fit: ParametricFit) -> np.ndarray:
    """The fit in the log-sum-exp parameters (a, b, e, alpha, beta), to warm-start another fit."""
    return np.array([math.log(fit.A), math.log(fit.B), math.log(fit.E), fit.alpha, fit.beta])


FITTERS: dict[int, Callable[[Sequence[Point]], Fit]] = {1: fit_approach1, 2: fit_approach2, 3: fit_approach3}


def fit(approach: int, points: Sequence[Point]) -> Fit:
    return FITTERS[approach](points)


def bootstrap(approach: int, points: Sequence[Point], n: int, seed: int = 0) -> tuple[list[Fit], int]:
    """Refit on `n` resamples of the runs; returns the fits and how many resamples could not be fitted.

    Approaches 1 and 2 resample within each IsoFLOP budget so that every budget keeps its runs;
    approach 3 resamples all runs and warm-starts from the full-data fit.
    """
    rng = np.random.default_rng(seed)
    points = list(points)
    full = fit(approach, points)
    groups = group_by_budget(points)
    fits, failed = [], 0
    for _ in range(n):
        if approach == 3:
            sample = [points[i] for i in rng.integers(0, len(points), len(points))]
        else:
            sample = [g[i] for g in groups for i in rng.integers(0, len(g), len(g))]
        try:
            if approach == 3:
                fits.append(fit_approach3(sample, starts=2, inits=[theta(full)]))
            else:
                fits.append(fit(approach, sample))
        except ValueError:  # a resample can lose the sizes a fit needs
            failed += 1
    return fits, failed


def interval(values: Sequence[float], level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval [low, high]."""
    values = np.asarray([v for v in values if math.isfinite(v)], float)
    if values.size == 0:
        return [math.nan, math.nan]
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
