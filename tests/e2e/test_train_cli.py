"""`python -m launcher.train` and `torchrun ... -m launcher.train` exactly as users type them."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import yaml

from tests.e2e.conftest import TRAIN, cli, losses, metrics, torchrun


def test_train_writes_the_run_directory_contract_and_loss_falls(tiny_data, tmp_path):
    run = tmp_path / "run"
    result = cli("launcher.train", *TRAIN, f"data.path={tiny_data}", f"run.dir={run}", "train.steps=30",
                 "train.eval_interval=15", "optim.lr=3e-3", "optim.warmup_steps=3", "logging.wandb_mode=offline")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["steps"] == 30 and config["model"]["name"] == "tiny"
    deepspeed = json.loads((run / "deepspeed.json").read_text())  # exactly what DeepSpeed was given
    assert deepspeed["gradient_accumulation_steps"] == 1 and deepspeed["data_types"] == {"grad_accum_dtype": "fp32"}
    rows = metrics(run)
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tflops_per_device"):
        assert key in rows[0], key
    assert "mfu" not in rows[0]  # a CPU has no datasheet peak, and observe.peak_tflops is not set
    evals = [row for row in rows if "eval_loss" in row]
    assert [row["step"] for row in evals] == [15, 30]
    assert evals[-1]["eval_ppl"] > 1 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert rows[-1]["tokens"] == 30 * 2 * 64
    assert (run / "checkpoints" / "latest").read_text() == "step_00000030"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens"] == 30 * 2 * 64 and summary["final_eval_loss"] == evals[-1]["eval_loss"]
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run was written"


def test_bf16_zero0_with_bf16_gradients_saves_a_portable_copy_that_zero1_resumes(tiny_data, tmp_path):
    # ZeRO-0 + bf16 gradients is DeepSpeed's FP16_UnfusedOptimizer: its fp32 masters are not linked to the
    # parameters, so the portable copy must read (and a load write) them through the optimizer's own groups.
    args = (*TRAIN, f"data.path={tiny_data}", "train.precision=bf16", "train.grad_reduce_dtype=bf16",
            "train.eval_interval=0", "train.save_interval=2", f"run.dir={tmp_path / 'run'}")
    first = cli("launcher.train", *args, "train.steps=2", "parallel.zero_stage=0")
    assert first.returncode == 0, first.stderr
    resumed = cli("launcher.train", *args, "train.steps=3", "parallel.zero_stage=1", "train.resume=auto",
                  "train.memory_check=off")
    assert resumed.returncode == 0, resumed.stderr
    assert "loading its portable copy" in resumed.stderr + resumed.stdout
    assert math.isfinite(losses(tmp_path / "run")[3])


LAYOUT_ARGS = (*TRAIN, "train.steps=4", "train.precision=fp32", "train.eval_interval=2", "train.save_interval=2")


@pytest.fixture(scope="module")
def one_process_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("layouts") / "one"
    result = cli("launcher.train", *LAYOUT_ARGS, f"data.path={tiny_data}", f"run.dir={run}")
    assert result.returncode == 0, result.stderr
    return run


@pytest.fixture(scope="module")
def pp2_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("layouts") / "pp2"
    result = cli("launcher.train", *LAYOUT_ARGS, f"data.path={tiny_data}", f"run.dir={run}", "parallel.pp=2",
                 launcher=torchrun(2))
    assert result.returncode == 0, result.stderr
    return run


def test_resume_from_a_checkpoint_continues_with_identical_losses(tiny_data, tmp_path, one_process_run):
    resumed = tmp_path / "resumed"
    shutil.copytree(one_process_run / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    result = cli("launcher.train", *LAYOUT_ARGS, f"data.path={tiny_data}", f"run.dir={resumed}", "train.resume=auto")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr + result.stdout
    assert losses(resumed) == {step: loss for step, loss in losses(one_process_run).items() if step > 2}


def _assert_same_curve(run, reference):
    expected = {row["step"]: row for row in metrics(reference)}
    rows = metrics(run)
    assert [row["step"] for row in rows] == list(expected)
    for row in rows:
        for key in ("loss", "eval_loss"):
            if key in expected[row["step"]]:
                assert row[key] == pytest.approx(expected[row["step"]][key], rel=1e-5), (row["step"], key)


def test_torchrun_tp2_with_sequence_parallel_gives_the_loss_curve_of_one_process(tiny_data, tmp_path,
                                                                                   one_process_run):
    run = tmp_path / "run"
    result = cli("launcher.train", *LAYOUT_ARGS, f"data.path={tiny_data}", f"run.dir={run}", "parallel.tp=2",
                 "parallel.sequence_parallel=true", launcher=torchrun(2))
    assert result.returncode == 0, result.stderr
    _assert_same_curve(run, one_process_run)


def test_torchrun_pp2_gives_the_loss_curve_of_one_process(pp2_run, one_process_run):
    _assert_same_curve(pp2_run, one_process_run)


def test_pipeline_run_resumes_from_its_checkpoint_with_identical_losses(tiny_data, tmp_path, pp2_run):
    resumed = tmp_path / "resumed"
    shutil.copytree(pp2_run / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    result = cli("launcher.train", *LAYOUT_ARGS, f"data.path={tiny_data}", f"run.dir={resumed}", "parallel.pp=2",
                 launcher=torchrun(2))
    assert result.returncode == 0, result.stderr
    assert losses(resumed) == {step: loss for step, loss in losses(pp2_run).items() if step > 2}
