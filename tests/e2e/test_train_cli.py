"""`python -m launcher.train` and `torchrun ... -m launcher.train` exactly as users type them."""

from __future__ import annotations

import json
import shutil

import yaml

from tests.e2e.conftest import TRAIN, cli, losses, metrics, torchrun


def test_train_writes_the_run_directory_contract_and_loss_falls(tiny_data, tmp_path):
    run = tmp_path / "run"
    result = cli("launcher.train", *TRAIN, f"data.path={tiny_data}", f"run.dir={run}", "train.steps=30",
                 "train.eval_interval=15", "optim.lr=3e-3", "optim.warmup_steps=3", "logging.wandb_mode=offline")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["steps"] == 30 and config["model"]["name"] == "tiny"
    rows = metrics(run)
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "tflops_per_device"):
        assert key in rows[0], key
    evals = [row for row in rows if "eval_loss" in row]
    assert [row["step"] for row in evals] == [15, 30]
    assert evals[-1]["eval_ppl"] > 1 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert rows[-1]["tokens"] == 30 * 2 * 64
    assert (run / "checkpoints" / "latest").read_text() == "step_00000030"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens"] == 30 * 2 * 64 and summary["final_eval_loss"] == evals[-1]["eval_loss"]
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run was written"


def test_resume_from_a_checkpoint_continues_with_identical_losses(tiny_data, tmp_path):
    args = (*TRAIN, f"data.path={tiny_data}", "train.steps=6", "train.save_interval=3", "train.precision=fp32",
            "train.eval_interval=0")
    straight = tmp_path / "straight"
    assert cli("launcher.train", *args, f"run.dir={straight}").returncode == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    result = cli("launcher.train", *args, f"run.dir={resumed}", "train.resume=auto")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr + result.stdout
    assert losses(resumed) == {step: loss for step, loss in losses(straight).items() if step > 3}


def test_torchrun_tp2_gives_the_same_losses_as_one_process(tiny_data, tmp_path):
    args = (*TRAIN, f"data.path={tiny_data}", "train.steps=4", "train.precision=fp32", "train.eval_interval=0")
    one = tmp_path / "tp1"
    assert cli("launcher.train", *args, f"run.dir={one}").returncode == 0
    two = tmp_path / "tp2"
    result = cli("launcher.train", *args, f"run.dir={two}", "parallel.tp=2", "parallel.sequence_parallel=true",
                 launcher=torchrun(2))
    assert result.returncode == 0, result.stderr
    reference = losses(one)
    assert losses(two).keys() == reference.keys()
    for step, loss in losses(two).items():
        assert abs(loss - reference[step]) <= 1e-5 * reference[step], (step, loss, reference[step])
