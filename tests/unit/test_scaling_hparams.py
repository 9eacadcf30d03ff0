"""Learning-rate and batch-size laws recover known power laws; the sweep plans lr and batch from a law."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from launcher.common import CONF_DIR
from megatrain.config import ConfigError, SweepConfig, register_configs, to_config
from megatrain.scaling.hparams import HparamPoint, bootstrap_hparams, fit_hparams, format_report, report
from megatrain.scaling.sweep import plan, write_sweep

# A law of the DeepSeek LLM form (eta_opt = a C^b, B_opt = c C^d); the constants only shape the test.
LR, BATCH = (0.3118, -0.125), (0.292, 0.3271)


def hparam_points(budgets=(1e17, 1e18, 1e19, 1e20), factors=(1 / 4, 1 / 2, 1, 2, 4), noise: float = 0.002,
                  seed: int = 0, lr_offset: float = 1.0, seeds: int = 0, effect: float = 1.0) -> list[HparamPoint]:
    """A 5 x 5 grid of (lr, batch) around each budget's true optimum; loss quadratic in the logs (its
    curvature scaled by `effect`), `noise` the relative sd of each run; `seeds` > 0 runs every cell that
    many times with seeds 1..seeds (0: once, with no seed)."""
    rng = np.random.default_rng(seed)
    points = []
    for c in budgets:
        lr_opt, b_opt = LR[0] * c ** LR[1], BATCH[0] * c ** BATCH[1]
        for f in factors:
            for g in factors:
                lr, b = lr_opt * f * lr_offset, b_opt * g
                x, y = math.log(lr / lr_opt), math.log(b / b_opt)
                loss = (2.0 + 40 * c**-0.1) * (1 + effect * (0.02 * x * x + 0.01 * y * y + 0.008 * x * y))
                for s in range(1, seeds + 1) if seeds else [None]:
                    points.append(HparamPoint(c, lr, b, loss * math.exp(rng.normal(0, noise)), budget=c, seed=s))
    return points


def test_the_lr_and_batch_laws_are_recovered_with_intervals() -> None:
    fit = fit_hparams(hparam_points(noise=0.0))
    assert (fit.lr.coefficient, fit.lr.exponent) == (pytest.approx(LR[0], rel=1e-3), pytest.approx(LR[1], abs=1e-4))
    assert fit.batch.exponent == pytest.approx(BATCH[1], abs=1e-4)
    noisy = report(hparam_points(), budget=1e21, n_boot=30, seed=0)
    assert noisy["lr"]["exponent"] == pytest.approx(LR[1], abs=0.02)
    assert noisy["batch"]["exponent"] == pytest.approx(BATCH[1], abs=0.03)
    low, high = noisy["lr"]["ci"]["exponent"]
    assert low < LR[1] < high
    low, high = noisy["batch"]["ci"]["at_budget"]
    assert low < BATCH[0] * 1e21 ** BATCH[1] < high


def test_seed_repeats_are_averaged_and_the_intervals_hold_the_known_law() -> None:
    # 3 seeds a cell, each run off by 0.15% (~0.004 in loss; one batch step from the optimum costs
    # 0.5%, ~0.012): the fit sees cell means, the bootstrap resamples the seeds, and every optimum
    # stands out of the noise (its closest neighbour ~4 standard errors above it).
    points = hparam_points(noise=0.0015, seeds=3, seed=1)
    out = report(points, budget=1e21, n_boot=100, seed=0)
    assert [o["runs"] for o in out["optima"]] == [75] * 4 and {o["seeds"] for o in out["optima"]} == {3}
    for o in out["optima"]:  # the pooled seed sd recovers the added noise
        assert o["seed_sd"] == pytest.approx(0.0015 * o["best_cell"]["loss"], rel=0.3)
    for key, (a, b) in (("lr", LR), ("batch", BATCH)):
        ci = out[key]["ci"]
        assert ci["exponent"][0] < b < ci["exponent"][1], (key, ci)
        assert ci["at_budget"][0] < a * 1e21**b < ci["at_budget"][1], (key, ci)
    assert all(o["resolved"] for o in out["optima"]) and out["warnings"] == []


def test_the_bootstrap_resamples_seeds_not_only_cells() -> None:
    # Two seeds at +-1% of an exact surface: the cell means are exact, so the point fit is, and only
    # resampling the seeds within a cell can widen the intervals, which must still hold the law.
    points = [HparamPoint(p.compute, p.lr, p.batch, p.loss * (1 + s), p.budget, seed=i)
              for p in hparam_points(noise=0.0) for i, s in enumerate((0.01, -0.01))]
    out = report(points, budget=1e21, n_boot=60, seed=0)
    assert out["lr"]["exponent"] == pytest.approx(LR[1], abs=1e-4)
    low, high = out["lr"]["ci"]["exponent"]
    assert low < LR[1] < high and high - low > 1e-3


def test_a_warning_fires_when_seed_noise_swamps_the_optimum() -> None:
    # The lr/batch effect a tenth of the synthetic one (a grid step from the optimum moves the loss by
    # ~0.003) under 1% run-to-run noise (~0.028): neighbours of the lowest cell are within the noise.
    out = report(hparam_points(noise=0.01, seeds=2, effect=0.1, seed=3), budget=1e21, n_boot=0, seed=0)
    assert any(o["resolved"] is False for o in out["optima"])
    assert any("not distinguishable from its neighbour" in w and "beyond seed noise" in w for w in out["warnings"])
    assert "NOT resolved" in "\n".join(format_report(out))


def test_one_run_per_cell_warns_that_the_noise_is_unmeasured() -> None:
    fit = fit_hparams(hparam_points())
    assert all(o["seed_sd"] is None and o["resolved"] is None for o in fit.optima)
    assert any("seed noise is not measured" in w for w in fit.warnings)


def test_the_same_run_twice_is_not_taken_for_a_seed_repeat() -> None:
    points = hparam_points(noise=0.0, seeds=1)
    with pytest.raises(ValueError, match="share budget, lr=.* and a seed: the same run given twice"):
        fit_hparams(points + points[:1])


def test_only_the_learning_rate_varied_gives_only_the_lr_law() -> None:
    points = [p for p in hparam_points(noise=0.0) if p.batch == pytest.approx(BATCH[0] * p.compute ** BATCH[1])]
    fit = fit_hparams(points)
    assert fit.batch is None and fit.lr.exponent == pytest.approx(LR[1], abs=1e-3)


def test_an_optimum_at_the_edge_of_the_grid_is_skipped_not_reported() -> None:
    # At 1e20 every learning rate swept is 8x+ too high: the best run sits at the lowest lr.
    points = hparam_points(budgets=(1e17, 1e18, 1e19)) + hparam_points(budgets=(1e20,), lr_offset=32.0)
    fit = fit_hparams(points)
    assert [o["C"] for o in fit.optima] == [pytest.approx(c) for c in (1e17, 1e18, 1e19)]
    assert "C=1e+20: the optimum lr is not bracketed" in fit.skipped[0]
    with pytest.raises(ValueError, match="bracketed optima at 2 or more budgets"):
        fit_hparams(hparam_points(budgets=(1e17,)))


def test_bootstrap_counts_resamples_that_cannot_be_fitted() -> None:
    fits, failed = bootstrap_hparams(hparam_points(budgets=(1e17, 1e18)), n=10)
    assert len(fits) + failed == 10 and len(fits) > 0


def test_the_sweep_sets_lr_and_batch_per_point_from_a_law_and_a_factor_grid(tmp_path: Path) -> None:
    from tests.unit.test_scaling_sweep import sweep_config

    cfg = sweep_config(tmp_path, lr_law=[0.3118, -0.125], batch_law=[0.292, 0.3271], tokens_per_param=20.0,
                       lr_factors=[0.5, 1.0, 2.0], batch_factors=[1.0, 2.0])
    points = plan(cfg)
    assert len(points) == 3 * 3 * 2  # one shape per budget x 3 lrs x 2 batches
    for p in points:
        centre = 0.3118 * p.budget**-0.125
        assert any(p.lr == pytest.approx(f * centre) for f in (0.5, 1.0, 2.0))
        assert p.batch % 8 == 0 and p.tokens == p.steps * p.batch * 128
    base = next(p for p in points if p.budget == 3e11 and p.name.endswith("_lr1_b0"))
    assert base.batch == 8 * round(0.292 * 3e11**0.3271 / 128 / 8)
    [argv] = write_sweep(cfg, points, ["optim.lr=1e-3", "train.global_batch_size=64", "optim.beta2=0.99"])
    assert "optim.beta2=0.99" in argv and not {"optim.lr=1e-3", "train.global_batch_size=64"} & set(argv)
    register_configs()
    with initialize_config_dir(CONF_DIR, version_base=None):
        composed = to_config(compose("config", overrides=[argv[4], "model=tiny", "model.vocab_size=512",
                                                          "train.micro_batch_size=8", f"+scaling_point={base.name}"]))
    assert composed.optim.lr == pytest.approx(base.lr) and composed.train.global_batch_size == base.batch
    assert composed.optim.min_lr == pytest.approx(base.lr * cfg.optim.min_lr / cfg.optim.lr)


def test_a_bad_law_or_factor_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"sweep.lr_law=\[0.3\]: give \[coefficient, exponent\]"):
        SweepConfig(lr_law=[0.3])
    with pytest.raises(ConfigError, match="sweep.batch_factors=.*positive factors"):
        SweepConfig(batch_factors=[0.0, 1.0])


def test_cli_fits_hparam_laws_from_a_csv(tmp_path: Path) -> None:
    with open(tmp_path / "hp.csv", "w") as f:
        f.write("C,lr,batch,loss,seed\n" + "".join(f"{p.compute},{p.lr},{p.batch},{p.loss},{p.seed}\n"
                                                  for p in hparam_points(seeds=2)))
    out = subprocess.run([sys.executable, "-m", "launcher.fit_scaling", f"fit.input={tmp_path / 'hp.csv'}",
                          "fit.approach=hparams", f"fit.output={tmp_path / 'out'}", "fit.bootstrap=10",
                          "logging.wandb_mode=disabled"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "eta_opt = " in out.stdout and "C^-0.12" in out.stdout and "sweep.lr_law=[" in out.stdout
    saved = json.loads((tmp_path / "out" / "hparams.json").read_text())
    assert saved["batch"]["exponent"] == pytest.approx(BATCH[1], abs=0.03) and saved["runs"] == 200
    assert {o["seeds"] for o in saved["optima"]} == {2} and "seed sd" in out.stdout
    assert saved["lr"]["exponent"] == pytest.approx(LR[1], abs=0.02) and saved["compute"] == "6nd"


def test_run_directories_give_lr_and_batch_from_their_config(tmp_path: Path) -> None:
    from megatrain.config import FitConfig, LoggingConfig
    from megatrain.scaling.report import refit_and_log

    for i, p in enumerate(hparam_points(noise=0.0)):
        run = tmp_path / "runs" / f"r{i}"
        run.mkdir(parents=True)
        seq = 128
        (run / "config.yaml").write_text(f"sweep:\n  budget: {p.budget}\noptim:\n  lr: {p.lr}\n"
                                         f"train:\n  global_batch_size: {p.batch / seq}\n  seq_len: {seq}\n")
        n = 1e6
        (run / "summary.json").write_text(json.dumps({"params_total": n, "params_non_embedding": n,
                                                      "tokens": p.compute / (6 * n), "final_eval_loss": p.loss}))
    outcome = refit_and_log(tmp_path / "runs", FitConfig(approach="hparams", bootstrap=0),
                            LoggingConfig(wandb_mode="disabled"), tmp_path / "fit")
    assert outcome["hparams"]["lr"]["exponent"] == pytest.approx(LR[1], abs=1e-3)
    assert outcome["hparams"]["batch"]["exponent"] == pytest.approx(BATCH[1], abs=1e-3)
