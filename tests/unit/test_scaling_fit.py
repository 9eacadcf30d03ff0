"""Scaling-law fits recover known laws; the Chinchilla coefficients give the paper's exponents."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from megatrain.scaling.fit import (
    ParametricFit,
    Point,
    PowerLaw,
    bootstrap,
    fit_approach1,
    fit_approach2,
    fit_approach3,
    group_by_budget,
    interval,
)

CHINCHILLA = ParametricFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, objective=0.0)


def isoflop_points(law: ParametricFit = CHINCHILLA, budgets=(1e18, 3e18, 1e19, 3e19, 1e20), sizes: int = 7,
                   noise: float = 0.003, seed: int = 0) -> list[Point]:
    """An IsoFLOP sweep around each budget's true optimum, losses with log-normal noise."""
    rng = np.random.default_rng(seed)
    points = []
    for c in budgets:
        n_opt, _ = law.optimal(c)
        for n in n_opt * np.geomspace(1 / 8, 8, sizes):
            d = c / (6 * n)
            points.append(Point(n, d, float(law.loss(n, d)) * math.exp(rng.normal(0, noise)), budget=c))
    return points


def test_published_chinchilla_coefficients_give_published_exponents() -> None:
    # Hoffmann et al. 2022, Table 2 (approach 3): a = 0.46, b = 0.54.
    assert CHINCHILLA.a == pytest.approx(0.28 / 0.62) and CHINCHILLA.b == pytest.approx(0.34 / 0.62)
    assert abs(CHINCHILLA.a - 0.46) < 0.01 and abs(CHINCHILLA.b - 0.54) < 0.01
    # The closed-form allocation is the true minimum of L on each IsoFLOP line ...
    budgets = np.geomspace(1e20, 1e24, 5)
    numeric = []
    for c in budgets:
        res = minimize_scalar(lambda x, c=c: CHINCHILLA.loss(math.exp(x), c / (6 * math.exp(x))),
                              bounds=(math.log(1e6), math.log(1e13)), method="bounded",
                              options={"xatol": 1e-9})
        numeric.append(math.exp(res.x))
        assert numeric[-1] == pytest.approx(CHINCHILLA.optimal(c)[0], rel=1e-4)
    # ... and its slope in log-log is a = beta / (alpha + beta).
    slope = np.polyfit(np.log(budgets), np.log(numeric), 1)[0]
    assert slope == pytest.approx(CHINCHILLA.a, abs=1e-4)


def test_optimal_allocation_spends_the_budget() -> None:
    n, d = CHINCHILLA.optimal(5.76e23)
    assert 6 * n * d == pytest.approx(5.76e23)


def test_approach3_recovers_the_law_from_noisy_runs() -> None:
    fit = fit_approach3(isoflop_points())
    assert fit.alpha == pytest.approx(0.34, abs=0.02)
    assert fit.beta == pytest.approx(0.28, abs=0.02)
    assert fit.E == pytest.approx(1.69, abs=0.05)
    assert fit.a == pytest.approx(CHINCHILLA.a, abs=0.01)


def test_approach3_recovers_a_different_law() -> None:
    law = ParametricFit(E=2.5, A=80.0, B=3000.0, alpha=0.25, beta=0.45, objective=0.0)
    fit = fit_approach3(isoflop_points(law, noise=0.002, seed=1))
    assert (fit.alpha, fit.beta) == (pytest.approx(0.25, abs=0.02), pytest.approx(0.45, abs=0.02))
    assert fit.E == pytest.approx(2.5, abs=0.05)


@pytest.mark.parametrize("fitter", [fit_approach1, fit_approach2])
def test_approaches_1_and_2_recover_the_allocation_exponents(fitter) -> None:
    fit = fitter(isoflop_points(sizes=9, noise=0.001))
    assert fit.n_opt.exponent == pytest.approx(CHINCHILLA.a, abs=0.04)
    assert fit.d_opt.exponent == pytest.approx(CHINCHILLA.b, abs=0.04)
    assert fit.n_opt.exponent + fit.d_opt.exponent == pytest.approx(1.0, abs=1e-6)  # since C = 6ND


def test_approach2_minimum_lies_near_the_true_optimum() -> None:
    fit = fit_approach2(isoflop_points(noise=0.0))
    for o in fit.optima:
        assert o["N"] == pytest.approx(CHINCHILLA.optimal(o["C"])[0], rel=0.15)


def test_bootstrap_interval_brackets_the_true_exponent() -> None:
    points = isoflop_points()
    fits, failed = bootstrap(3, points, n=20, seed=0)
    assert failed == 0 and len(fits) == 20
    low, high = interval([f.alpha for f in fits])
    assert low < 0.34 < high and high - low < 0.1


def test_budgets_are_grouped_by_compute_when_not_planned() -> None:
    points = [Point(1e6, 1e8 * f, 3.0) for f in (1.0, 1.05, 0.97, 10.0, 10.3)]
    assert [len(g) for g in group_by_budget(points)] == [3, 2]


def test_one_model_size_is_rejected_with_a_clear_error() -> None:
    points = [Point(1e7, d, 3.0 - 0.1 * i) for i, d in enumerate(np.geomspace(1e9, 1e11, 6))]
    with pytest.raises(ValueError, match="2 or more model sizes"):
        fit_approach3(points)
    with pytest.raises(ValueError, match="parabola needs 3"):
        fit_approach2(points)
    with pytest.raises(ValueError, match="same model size"):
        fit_approach1(points)


def test_fewer_runs_than_parameters_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least 5"):
        fit_approach3(isoflop_points()[:4])


@pytest.mark.parametrize("loss", [float("nan"), 0.0, -1.0, float("inf")])
def test_bad_losses_are_rejected_naming_the_run(loss: float) -> None:
    points = isoflop_points()
    points[3] = Point(points[3].params, points[3].tokens, loss, name="runs/bad")
    for fitter in (fit_approach1, fit_approach2, fit_approach3):
        with pytest.raises(ValueError, match=r"runs/bad: loss=.* finite positive"):
            fitter(points)


def test_non_convex_budgets_are_skipped_and_reported() -> None:
    points = isoflop_points(budgets=(1e18, 1e19, 1e20))
    flipped = [Point(p.params, p.tokens, 10 - p.loss, p.budget) if p.budget == 1e19 else p for p in points]
    fit = fit_approach2(flipped)
    assert len(fit.optima) == 2 and "not convex" in fit.skipped[0]


def test_a_single_isoflop_budget_cannot_separate_n_and_d_in_approach3() -> None:
    with pytest.raises(ValueError, match="one line in \\(log N, log D\\)"):
        fit_approach3(isoflop_points(budgets=(1e19,)))


def test_approach2_skips_a_budget_whose_minimum_is_not_bracketed() -> None:
    # At 1e20 every swept size is above the optimum: the lowest loss sits at the smallest size.
    points = isoflop_points(budgets=(1e18, 1e19))
    n_opt = CHINCHILLA.optimal(1e20)[0]
    for n in n_opt * np.geomspace(2, 30, 5):
        points.append(Point(n, 1e20 / (6 * n), float(CHINCHILLA.loss(n, 1e20 / (6 * n))), budget=1e20))
    fit = fit_approach2(points)
    assert [o["C"] for o in fit.optima] == [pytest.approx(1e18), pytest.approx(1e19)]
    assert "C=1e+20: lowest loss at the smallest swept size" in fit.skipped[0]
    assert "not bracketed" in fit.skipped[0]


def measured_points(law: ParametricFit, k: float, p: float, budgets=(1e18, 3e18, 1e19, 3e19, 1e20)) -> list[Point]:
    """IsoFLOP runs whose true cost is C = k N^p D (attention, lm head), not 6ND, around each optimum."""
    points = []
    for c in budgets:
        n_opt, _ = law.optimal(c)
        for n in n_opt * np.geomspace(1 / 8, 8, 7):
            d = c / (k * n**p)
            points.append(Point(n, d, float(law.loss(n, d)), budget=c, flops=c))
    return points


def test_measured_flops_recover_the_allocation_under_the_true_cost() -> None:
    # The true cost per token is 9 N^0.95, not 6N: the law's optimum moves and so do its exponents.
    cost = (9.0, 0.95)
    law = ParametricFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, objective=0.0,
                        cost=PowerLaw(*cost))
    points = measured_points(law, *cost)
    fit = fit_approach3(points)
    assert (fit.cost.coefficient, fit.cost.exponent) == (pytest.approx(9.0, rel=1e-6), pytest.approx(0.95))
    assert fit.a == pytest.approx(0.28 / (0.34 + 0.95 * 0.28), abs=0.01)
    n, d = fit.optimal(1e22)
    assert 9.0 * n**0.95 * d == pytest.approx(1e22)
    assert n == pytest.approx(law.optimal(1e22)[0], rel=0.1)
    for fitter in (fit_approach1, fit_approach2):
        alloc = fitter(points)
        assert alloc.n_opt.exponent == pytest.approx(law.a, abs=0.04)
        assert alloc.d_opt.exponent == pytest.approx(law.b, abs=0.04)
    # The same runs priced at 6ND put the optimum of a true 1e22-FLOP budget 34% too small.
    six = fit_approach3([Point(q.params, q.tokens, q.loss, q.budget) for q in points])
    assert six.optimal(1e22)[0] < 0.7 * n
