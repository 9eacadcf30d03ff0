"""Fit outputs (JSON, CSV, PNG), W&B logging, the fit_scaling CLI and the live-refit callback."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from megatrain.config import FitConfig, LoggingConfig
from megatrain.scaling.callback import RefitCallback
from megatrain.scaling.report import format_results, refit_and_log

LAW = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def law_csv(path: Path, noise: float = 0.003, budgets=(1e18, 1e19, 1e20)) -> Path:
    rng = np.random.default_rng(0)
    g = (LAW["alpha"] * LAW["A"] / (LAW["beta"] * LAW["B"])) ** (1 / (LAW["alpha"] + LAW["beta"]))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["N", "C", "loss"])
        for c in budgets:
            for n in g * (c / 6) ** 0.4516 * np.geomspace(1 / 6, 6, 5):
                d = c / (6 * n)
                loss = LAW["E"] + LAW["A"] / n ** LAW["alpha"] + LAW["B"] / d ** LAW["beta"]
                w.writerow([n, c, loss * math.exp(rng.normal(0, noise))])
    return path


def fake_sweep(sweep: Path, budgets=(1e18, 1e19, 1e20)) -> None:
    """Finished run directories of a sweep, as the trainer leaves them."""
    sweep.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(open(law_csv(sweep / "law.csv", budgets=budgets))))
    for i, r in enumerate(rows):
        run = sweep / "runs" / f"c{float(r['C']):.0e}_{i}"
        run.mkdir(parents=True)
        n, c = float(r["N"]), float(r["C"])
        (run / "config.yaml").write_text(f"sweep:\n  budget: {c}\n")
        (run / "summary.json").write_text(json.dumps({
            "params_total": n * 1.2, "params_non_embedding": n, "tokens": c / (6 * n), "flops": c,
            "final_loss": float(r["loss"]), "final_eval_loss": float(r["loss"])}))


def test_refit_writes_laws_tables_plots_and_an_offline_wandb_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    fake_sweep(tmp_path / "sweep")
    out = tmp_path / "fit"
    outcome = refit_and_log(tmp_path / "sweep", FitConfig(bootstrap=5, budget=5.76e23),
                            LoggingConfig(wandb_mode="offline"), out)
    a3 = json.loads((out / "approach3.json").read_text())
    assert {"E", "A", "B", "alpha", "beta"} <= set(a3)
    assert a3["alpha"] == pytest.approx(0.34, abs=0.05) and a3["optimal"]["C"] == 5.76e23
    both = json.loads((out / "fit.json").read_text())
    assert set(both["approaches"]) == {"1", "2", "3"} and both["params"] == "non_embedding"
    optimal = list(csv.DictReader(open(out / "optimal.csv")))
    assert [r["approach"] for r in optimal] == ["1", "2", "3"]
    n, d = float(optimal[2]["N_opt"]), float(optimal[2]["D_opt"])
    assert 6 * n * d == pytest.approx(5.76e23) and float(optimal[2]["N_low"]) <= n <= float(optimal[2]["N_high"])
    assert len(list(csv.DictReader(open(out / "points.csv")))) == 15
    for png in ("isoflop", "frontier", "allocation", "surface"):
        assert (out / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    run_dirs = list((out / "wandb").glob(f"offline-run-*-{outcome['wandb_run']}"))
    assert run_dirs and list(run_dirs[0].glob("run-*.wandb"))


def test_cli_fits_a_csv_and_reports_the_budget_allocation(tmp_path: Path) -> None:
    law_csv(tmp_path / "law.csv")
    out = subprocess.run([sys.executable, "-m", "launcher.fit_scaling", f"fit.input=[{tmp_path / 'law.csv'}]",
                          "fit.approach=3", f"fit.output={tmp_path / 'out'}", "fit.budget=1e21",
                          "fit.bootstrap=0", "logging.wandb_mode=disabled"],
                         capture_output=True, text=True, check=True, preexec_fn=lambda: os.umask(0o022))
    assert "approach 3: E=" in out.stdout and "C=1e+21: N_opt=" in out.stdout
    assert sorted(p.name for p in (tmp_path / "out").glob("approach*.json")) == ["approach3.json"]
    # results are for colleagues too: the user's umask, not mkstemp's 0600
    written = [*(tmp_path / "out").glob("*.json"), *(tmp_path / "out").glob("*.csv")]
    assert written and {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o644)}


def test_console_summary_names_each_approach_once_and_prints_float_noise_as_0() -> None:
    result = {"a": 0.5, "b": 0.5, "ci": {"a": [7.14e-17, 0.61], "N_opt": [1e8, 2e9]},
              "optimal": {"C": 1e20, "N": 1e9, "D": 2e10, "tokens_per_param": 20.0}}
    text = format_results({"output": "fit", "basis": "N = non-embedding", "results": {1: result},
                           "errors": {2: "approach 2 needs 2 or more IsoFLOP budgets", 3: "too few runs"}})
    assert "a=0.500 [0, 0.61]" in text and "e-17" not in text
    assert "not fitted: approach 2 needs 2 or more IsoFLOP budgets" in text and "approach 2: approach 2" not in text
    assert "not fitted: approach 3: too few runs" in text


def test_cli_rejects_bad_losses_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("N,D,loss\n" + "".join(f"{1e6 * i},{1e8 / i},3.0\n" for i in (1, 2, 3, 4))
                                      + "5e6,2e7,nan\n")
    out = subprocess.run([sys.executable, "-m", "launcher.fit_scaling", f"fit.input=[{tmp_path / 'bad.csv'}]",
                          "fit.approach=3", f"fit.output={tmp_path / 'out'}", "logging.wandb_mode=disabled"],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "bad.csv:6: loss=nan must be a finite positive number" in out.stderr


def test_callback_refits_after_each_job_and_tolerates_too_few_runs(tmp_path: Path, capsys) -> None:
    config = OmegaConf.create({"sweep": {"dir": str(tmp_path / "sweep")}, "fit": {"bootstrap": 0},
                               "logging": {"wandb_mode": "disabled"}})
    done = JobReturn(status=JobStatus.COMPLETED)
    fake_sweep(tmp_path / "sweep", budgets=(1e18,))  # one budget: nothing can be fitted yet
    RefitCallback().on_job_end(config, done)
    assert "not fitted yet" in capsys.readouterr().out
    fake_sweep(tmp_path / "sweep", budgets=(1e19, 1e20))  # the sweep goes on
    RefitCallback().on_job_end(config, done)
    assert "approach 3" in capsys.readouterr().out
    assert (tmp_path / "sweep" / "fit" / "approach3.json").exists()


def test_measured_compute_is_read_from_the_runs_and_reported(tmp_path: Path) -> None:
    from megatrain.scaling.report import format_results

    fake_sweep(tmp_path / "sweep")
    outcome = refit_and_log(tmp_path / "sweep", FitConfig(approach="3", bootstrap=0, compute="measured",
                                                          params="total"),
                            LoggingConfig(wandb_mode="disabled"), tmp_path / "fit")
    both = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert both["compute"] == "measured" and both["params"] == "total"
    cost = both["approaches"]["3"]["flops_per_token"]  # fake runs: flops = 6 N_non_embedding D = 5 N_total D
    assert (cost["k"], cost["p"]) == (pytest.approx(5.0), pytest.approx(1.0))
    assert "(N = total parameters, C = measured training FLOPs" in format_results(outcome)
    (tmp_path / "sweep" / "runs" / "extra").mkdir()
    (tmp_path / "sweep" / "runs" / "extra" / "summary.json").write_text(json.dumps(
        {"params_total": 1e6, "params_non_embedding": 1e6, "tokens": 1e8, "final_eval_loss": 3.0}))
    with pytest.raises(ValueError, match="fit.compute=measured: 1 run.*record no training FLOPs"):
        refit_and_log(tmp_path / "sweep", FitConfig(approach="3", bootstrap=0, compute="measured"),
                      LoggingConfig(wandb_mode="disabled"), tmp_path / "fit")
