"""Predict, then verify: the law fitted on small budgets predicts a run 8x larger within its interval."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from megatrain.scaling.fit import Point
from megatrain.scaling.flops import param_counts
from megatrain.scaling.predict import plan_verification, predict, public, verify
from tests.unit.test_scaling_fit import CHINCHILLA, isoflop_points
from tests.unit.test_scaling_sweep import sweep_config


def test_the_prediction_at_8x_the_largest_budget_brackets_the_true_loss() -> None:
    points = isoflop_points(budgets=(1e18, 3e18, 1e19), noise=0.003)
    prediction = predict(points, 8e19, n_boot=30)
    assert prediction["C"] == 8e19 and prediction["largest_swept"] == pytest.approx(1e19, rel=0.01)
    n_true, _ = CHINCHILLA.optimal(8e19)
    assert prediction["N_opt"] == pytest.approx(n_true, rel=0.3)
    # The verification run: a size near N_opt (the shape rule cannot hit it exactly), the true law + noise.
    n = prediction["N_opt"] * 1.1
    d = 8e19 / (6 * n)
    measured = float(CHINCHILLA.loss(n, d)) * math.exp(np.random.default_rng(5).normal(0, 0.003))
    result = verify(prediction, Point(n, d, measured, name="verify"))
    assert result["inside"] and abs(result["relative_error"]) < 0.01
    assert result["extrapolation"] == pytest.approx(8.0, rel=0.01)
    assert result["predicted"] == pytest.approx(float(CHINCHILLA.loss(n, d)), rel=0.01)
    wrong = verify(prediction, Point(n, d, measured * 1.2, name="verify"))
    assert not wrong["inside"] and wrong["relative_error"] > 0.1
    assert "_law" not in public(prediction) and len(public(prediction)["interval"]) == 2


def test_the_verification_run_is_the_shape_closest_to_n_opt_spending_the_budget(tmp_path: Path) -> None:
    cfg = sweep_config(tmp_path)
    point = plan_verification(cfg, {"C": 3e13, "N_opt": 2e5})
    assert param_counts(point.model).non_embedding == point.params
    assert 0.5 < point.params / 2e5 < 2
    assert abs(6 * point.params * point.tokens - 3e13) <= 6 * point.params * 8 * 128


def test_run_verification_fits_trains_the_predicted_point_and_reports(tmp_path: Path) -> None:
    import json

    import yaml

    from megatrain.scaling.predict import format_verification, run_verification
    from tests.unit.test_scaling_report import LAW, fake_sweep

    cfg = sweep_config(tmp_path)
    cfg.sweep.verify, cfg.fit.bootstrap = 8.0, 20
    sweep = Path(cfg.sweep.dir)
    fake_sweep(sweep, budgets=(1e18, 1e19, 1e20))
    (sweep / "conf" / "scaling_point").mkdir(parents=True)
    trained = []

    def train(argv: list[str]) -> None:  # stands in for the multirun: the true law at the planned N, D
        trained.append(argv)
        point = yaml.safe_load((sweep / "conf" / "scaling_point" / "verify.yaml").read_text().split("\n", 1)[1])
        n = param_counts(sweep_config(tmp_path).model.__class__(**{**vars(cfg.model), **point["model"]})).non_embedding
        d = point["train"]["steps"] * 8 * 128
        loss = LAW["E"] + LAW["A"] / n ** LAW["alpha"] + LAW["B"] / d ** LAW["beta"]
        run = sweep / "runs" / "verify"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"params_total": n, "params_non_embedding": n, "tokens": d,
                                                      "final_eval_loss": loss}))

    result = run_verification(cfg, [], train)
    assert trained[0][-1] == "+scaling_point=verify" and not any("scaling_refit" in a for a in trained[0])
    v = result["verification"]
    assert v["extrapolation"] == pytest.approx(8.0, rel=0.05) and abs(v["relative_error"]) < 0.01
    assert v["error"] == pytest.approx(v["measured"] - v["predicted"])
    assert v["inside"] == (v["interval"][0] <= v["measured"] <= v["interval"][1])
    assert json.loads((sweep / "verify.json").read_text())["verification"]["measured"] == v["measured"]
    assert ("inside the interval" if v["inside"] else "OUTSIDE the interval") in format_verification(result)
