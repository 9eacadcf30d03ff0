"""Predict, then verify: extrapolate the fitted law to a larger budget and check it with a run there.

From the finished points, approach 3 gives the compute-optimal (N, D) at a budget several times the
largest swept one and its predicted loss, with two 95% intervals: `law_interval`, L(N, D) over the
bootstrap refits (the law's uncertainty alone), and `interval`, the prediction interval for one new
run: each refit's prediction times a residual of the full fit drawn at random (the law's
uncertainty plus the run-to-run scatter the fit left). A verification run is judged against the
latter. It cannot have exactly N_opt parameters: the prediction is re-evaluated at its own (N, D).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import yaml

from megatrain.config import Config
from megatrain.scaling import fit as fitting
from megatrain.scaling.collect import collect, read_run_dir
from megatrain.scaling.fit import Point
from megatrain.scaling.flops import param_counts, training_flops_per_token
from megatrain.scaling.report import update_wandb_summary
from megatrain.scaling.sweep import GROUP, SweepPoint, multirun_command, point_config, shaped_model

VERIFY = "verify"  # the run directory and point name of the verification run


def predict(points: Sequence[Point], budget: float, n_boot: int, seed: int = 0) -> dict:
    """Compute-optimal N, D and loss at `budget` with bootstrap fits kept for `verify`."""
    law = fitting.fit_approach3(points)
    n, d = law.optimal(budget)
    boots, failed = fitting.bootstrap(3, points, n_boot, seed) if n_boot > 0 else ([], 0)
    residuals = np.log([p.loss for p in points]) - np.log([float(law.loss(p.params, p.tokens)) for p in points])
    noise = np.exp(np.random.default_rng(seed).choice(residuals, size=len(boots)))
    out = {"C": budget, "N_opt": n, "D_opt": d, "loss": float(law.loss(n, d)),
           "largest_swept": max(p.compute for p in points), "runs": len(points),
           "residual_std": float(np.std(residuals)), "bootstrap": {"resamples": n_boot, "failed": failed},
           "_law": law, "_boots": boots, "_noise": noise}
    return out | _intervals(out, n, d)


def _intervals(prediction: dict, n: float, d: float) -> dict:
    at = np.array([float(b.loss(n, d)) for b in prediction["_boots"]])
    return {"law_interval": fitting.interval(at), "interval": fitting.interval(at * prediction["_noise"])}


def verify(prediction: dict, run: Point) -> dict:
    """Predicted loss (and interval) at the verification run's own N and D against its measured loss."""
    predicted = float(prediction["_law"].loss(run.params, run.tokens))
    spans = _intervals(prediction, run.params, run.tokens)
    low, high = spans["interval"]
    return {"run": run.name, "N": run.params, "D": run.tokens, "C": run.compute, "predicted": predicted,
            **spans, "measured": run.loss, "error": run.loss - predicted,
            "relative_error": (run.loss - predicted) / run.loss, "inside": bool(low <= run.loss <= high),
            "extrapolation": run.compute / prediction["largest_swept"]}


def public(record: dict) -> dict:
    """The prediction without the fits it keeps for verify, for JSON."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def plan_verification(cfg: Config, prediction: dict) -> SweepPoint:
    """The run at the prediction's budget: the shape-rule model closest to N_opt, D = C / (cost per token)."""
    ray = [shaped_model(cfg.model, n, cfg.sweep.head_dim, cfg.sweep.aspect) for n in range(1, 257)]
    model = min(ray, key=lambda m: abs(math.log(getattr(param_counts(m), cfg.fit.params) / prediction["N_opt"])))
    counts = param_counts(model)
    n = getattr(counts, cfg.fit.params)
    per_step = (cfg.train.global_batch_size or cfg.train.micro_batch_size) * cfg.train.seq_len
    per_token = training_flops_per_token(model, cfg.train.seq_len) if cfg.fit.compute == "measured" else 6.0 * n
    steps = max(1, round(prediction["C"] / per_token / per_step))
    return SweepPoint(VERIFY, prediction["C"], model, n, counts.total, steps, steps * per_step,
                      steps * per_step * training_flops_per_token(model, cfg.train.seq_len))


def run_verification(cfg: Config, overrides: list[str], train: Callable[[list[str]], None]) -> dict:
    """sweep.verify: fit the finished sweep, train the predicted optimum at sweep.verify x the largest
    budget with `train(argv)`, and compare; writes <sweep.dir>/verify.json."""
    sweep_dir = Path(cfg.sweep.dir).resolve()
    points = [p for p in collect([str(sweep_dir / "runs")], cfg.fit.params, cfg.fit.loss, cfg.fit.compute)
              if Path(p.name).name != VERIFY]
    prediction = predict(points, cfg.sweep.verify * max(p.compute for p in points), cfg.fit.bootstrap or 100,
                         cfg.fit.seed)
    point = plan_verification(cfg, prediction)
    body = yaml.safe_dump(point_config(cfg, point, sweep_dir), sort_keys=False)
    (sweep_dir / "conf" / GROUP / f"{VERIFY}.yaml").write_text("# @package _global_\n" + body)
    # No live refit: the verification run is not one of the points the law is fitted on.
    train([a for a in multirun_command([point], sweep_dir, overrides) if "scaling_refit" not in a])
    run = read_run_dir(sweep_dir / "runs" / VERIFY, cfg.fit.params, cfg.fit.loss)
    if cfg.fit.compute == "6nd" and run is not None:
        run = dataclasses.replace(run, flops=None)
    result = {"prediction": public(prediction), "verification": verify(prediction, run)}
    (sweep_dir / "verify.json").write_text(json.dumps(result, indent=2, default=float))
    v = result["verification"]
    update_wandb_summary(sweep_dir / "fit", cfg.fit, cfg.logging, {
        f"verify/{k}": v[k] for k in ("C", "N", "D", "predicted", "measured", "error", "relative_error", "inside",
                                      "extrapolation")} | {"verify/interval_low": v["interval"][0],
                                                           "verify/interval_high": v["interval"][1]})
    return result


def format_verification(result: dict) -> str:
    p, v = result["prediction"], result["verification"]
    return (f"predict: C={p['C']:.3g} ({v['extrapolation']:.3g}x the largest swept) N_opt={p['N_opt']:.4g} "
            f"D_opt={p['D_opt']:.4g} L={p['loss']:.4f}\n"
            f"verify: {v['run']} N={v['N']:.4g} D={v['D']:.4g}: predicted {v['predicted']:.4f} "
            f"[{v['interval'][0]:.4f}, {v['interval'][1]:.4f}] (law alone [{v['law_interval'][0]:.4f}, "
            f"{v['law_interval'][1]:.4f}]), measured {v['measured']:.4f}, error "
            f"{v['error']:+.4f} ({100 * v['relative_error']:+.2f}%), {'inside' if v['inside'] else 'OUTSIDE'} "
            "the interval")
