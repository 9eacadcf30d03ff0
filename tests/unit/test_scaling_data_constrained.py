"""Data-constrained fits (Muennighoff et al. 2023) recover a known R_D*; the loader counts unique tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatrain.scaling.data_constrained import (
    RepeatedPoint,
    effective_tokens,
    fit_data_constrained,
)
from megatrain.scaling.fit import ParametricFit, Point

LAW = ParametricFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, objective=0.0)


def repeated_runs(r_star: float = 15.0, noise: float = 0.001, seed: int = 0) -> list[RepeatedPoint]:
    """Sizes x unique-data sizes x epochs 1-64: the loss follows L(N, D') with the given R_D*."""
    rng = np.random.default_rng(seed)
    runs = []
    for n in (1e7, 3e7, 1e8, 3e8):
        for unique in (1e8, 1e9):
            for epochs in (0.5, 1, 2, 4, 8, 16, 32, 64):
                d = unique * epochs
                loss = float(LAW.loss(n, effective_tokens(d, unique, r_star))) * math.exp(rng.normal(0, noise))
                runs.append(RepeatedPoint(Point(n, d, loss, name=f"N{n:.0e}_U{unique:.0e}_e{epochs}"), unique))
    return runs


def test_effective_data_is_fresh_data_at_first_and_saturates() -> None:
    assert effective_tokens(5e8, 1e9, 15.0) == 5e8
    assert effective_tokens(2e9, 1e9, 15.0) == pytest.approx(2e9, rel=0.04)  # one repeat: almost new
    assert effective_tokens(1e12, 1e9, 15.0) == pytest.approx(16e9, rel=1e-6)  # U_D (1 + R_D*) at most


@pytest.mark.parametrize("r_star", [5.0, 15.0])
def test_the_fit_recovers_r_d_star_and_the_law(r_star: float) -> None:
    fit = fit_data_constrained(repeated_runs(r_star))
    assert fit.r_d_star == pytest.approx(r_star, rel=0.15)
    assert fit.law.alpha == pytest.approx(0.34, abs=0.03) and fit.law.beta == pytest.approx(0.28, abs=0.03)


def test_runs_that_never_repeat_cannot_fit_r_d_star() -> None:
    fresh = [p for p in repeated_runs() if p.point.tokens <= p.unique_tokens]
    with pytest.raises(ValueError, match="repeat their data at 2 or more repetition counts"):
        fit_data_constrained(fresh)


def test_cli_fits_r_d_star_from_a_csv_with_unique_tokens(tmp_path) -> None:
    import json
    import subprocess
    import sys

    with open(tmp_path / "rep.csv", "w") as f:
        f.write("N,D,unique_tokens,loss\n" + "".join(f"{p.point.params},{p.point.tokens},{p.unique_tokens},"
                                                     f"{p.point.loss}\n" for p in repeated_runs()))
    base = [sys.executable, "-m", "launcher.fit_scaling", "fit.approach=data", f"fit.output={tmp_path / 'out'}",
            "fit.bootstrap=0", "logging.wandb_mode=disabled"]
    out = subprocess.run([*base, f"fit.input={tmp_path / 'rep.csv'}"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "data-constrained: R_D*=" in out.stdout and "up to 64 epochs" in out.stdout
    assert json.loads((tmp_path / "out" / "data.json").read_text())["R_D_star"] == pytest.approx(15, rel=0.15)
    (tmp_path / "fresh.csv").write_text("N,D,loss\n1e7,1e8,3.0\n")
    out = subprocess.run([*base, f"fit.input={tmp_path / 'fresh.csv'}"], capture_output=True, text=True)
    assert out.returncode == 2 and "record no unique_tokens" in out.stderr


def test_the_loader_counts_unique_tokens_and_epochs(tmp_path) -> None:
    from megatrain.config import Config
    from megatrain.data.dataset import build_loader
    from tests.unit.data_calls import run_prepare

    cfg = Config()
    (tmp_path / "a.txt").write_text("one two three four five six seven eight nine ten\n\n" * 200)
    cfg.prepare.input, cfg.prepare.output = str(tmp_path / "a.txt"), str(tmp_path / "data")
    cfg.prepare.text_unit = "paragraph"
    cfg.tokenizer.vocab_size, cfg.logging.progress = 280, False
    run_prepare(cfg)
    cfg.data.path = str(tmp_path / "data")
    loader = build_loader(cfg.data, split="train", seq_len=16, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    windows = loader.windows[0]
    for _ in range(3):
        loader.next_batch()
    assert loader.seen() == (6 * 16, pytest.approx(6 / windows))
    for _ in range(windows):  # two epochs and then some: unique stops at the data, epochs go on
        loader.next_batch()
    unique, epochs = loader.seen()
    assert unique == windows * 16 and epochs == pytest.approx((windows * 2 + 6) / windows)


def test_collect_reads_unique_tokens_from_a_run_summary(tmp_path) -> None:
    import json

    from megatrain.scaling.collect import read_run_dir

    (tmp_path / "summary.json").write_text(json.dumps({"params_total": 2e6, "params_non_embedding": 1e6,
                                                       "tokens": 4e8, "unique_tokens": 1e8, "epochs": 4.0,
                                                       "final_eval_loss": 3.1}))
    assert read_run_dir(tmp_path).unique_tokens == 1e8
