"""A diverged run never publishes its weights: it stops naming the step and the last good checkpoint
(exit 65), or rolls back to that checkpoint past the batches of the diverged span (train.on_divergence)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from megatrain.export.portable_format import PortableCheckpoint
from tests.e2e.conftest import QUIET, ROOT, TRAIN, cli, losses, torchrun

ARGS = (*TRAIN, "train.precision=fp32", "train.eval_interval=0", "train.global_batch_size=4", "optim.warmup_steps=1")


def _train(tiny_data: Path, run: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    if env is None:
        return cli("launcher.train", *ARGS, f"data.path={tiny_data}", f"run.dir={run}", *overrides)
    return subprocess.run([sys.executable, "-m", "launcher.train", *ARGS, f"data.path={tiny_data}", f"run.dir={run}",
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300, env={**QUIET, **env})


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


def test_an_lr_that_breaks_the_weights_publishes_nothing_and_exits_65_naming_the_step(tiny_data, tmp_path):
    """optim.lr=1e39 is a finite double but inf in fp32: step 1's update makes the weights non-finite while its
    loss (computed before the update) is finite; the save at step 1 is refused."""
    run = tmp_path / "run"
    result = _train(tiny_data, run, "train.steps=3", "train.save_interval=1", "optim.lr=1e39")
    assert result.returncode == 65, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "diverged at step 1: 21 parameter tensors (of 21 on a rank) hold NaN or inf" \
        in error[0] and "no checkpoint before it is known good" in error[0], result.stderr
    assert _checkpoints(run) == []


def test_on_two_ranks_the_weight_check_is_agreed_and_nothing_is_published(tiny_data, tmp_path):
    """TP2 over gloo: each rank checks its own slices, the verdict is all-reduced, one error is printed."""
    run = tmp_path / "run"
    result = cli("launcher.train", *ARGS, f"data.path={tiny_data}", f"run.dir={run}", "train.steps=2",
                 "train.save_interval=1", "optim.lr=1e39", "parallel.tp=2", launcher=torchrun(2))
    assert result.returncode != 0, result.stderr
    assert result.stderr.count("error: training diverged at step 1:") == 1, result.stderr
    assert "failed (exitcode: 65)" in result.stderr, result.stderr  # torchrun's report of the first rank out
    assert _checkpoints(run) == []


def test_a_finite_loss_spike_stops_the_run_naming_the_unchecked_checkpoint(tiny_data, tmp_path):
    """optim.lr=30: step 2's loss is about 20,000 (3,000x step 1's), finite; train.spike_factor=10 stops it.
    Step 1's checkpoint (its update is what broke the model) is named as not known good."""
    run = tmp_path / "run"
    result = _train(tiny_data, run, "train.steps=3", "train.save_interval=1", "optim.lr=30")
    assert result.returncode == 65, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "diverged at step 2: loss" in error[0], result.stderr
    assert "is over train.spike_factor=10 x the mean 6.2" in error[0] and "no checkpoint before it is known good (" \
        f"{run / 'checkpoints' / 'step_00000001'} was saved after the last loss checked" in error[0]
    assert _checkpoints(run) == ["step_00000001"]


def test_a_diverged_resume_names_the_last_good_checkpoint_and_a_sane_rerun_resumes_from_it(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert _train(tiny_data, run, "train.steps=2", "train.save_interval=1", "optim.lr=3e-3").returncode == 0
    # rollback once: the same lr breaks the weights again, and the run stops at train.max_rollbacks=1
    result = _train(tiny_data, run, "train.steps=4", "train.save_interval=1", "optim.lr=1e39",
                    "optim.resume_schedule=stretch", "train.on_divergence=rollback", "train.max_rollbacks=1")
    assert result.returncode == 65, result.stderr
    good = run / "checkpoints" / "step_00000002"
    assert "rollback 1 of train.max_rollbacks=1" in result.stderr and f"reloaded {good} (step 2)" in result.stderr
    assert "diverged at step 3" in result.stderr and f"the last good checkpoint is {good}" in result.stderr
    assert _checkpoints(run) == ["step_00000001", "step_00000002"]
    result = _train(tiny_data, run, "train.steps=4", "train.save_interval=1", "optim.lr=3e-3")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr and all(math.isfinite(v) for v in losses(run).values())


def test_rollback_skips_the_diverged_batches_and_finishes_finite(tiny_data, tmp_path):
    """MEGATRAIN_TEST_POISON_STEP=3 turns a weight NaN after step 3's update (a stand-in for a batch that breaks
    the model): step 4's loss is NaN; the run reloads step 2, skips the batches of steps 3-4, and finishes."""
    run = tmp_path / "run"
    result = _train(tiny_data, run, "train.steps=5", "train.save_interval=2", "optim.lr=3e-3",
                    "train.on_divergence=rollback", env={"MEGATRAIN_TEST_POISON_STEP": "3"})
    assert result.returncode == 0, result.stderr
    assert "rollback 1 of train.max_rollbacks=3: loss is not finite at step 4" in result.stderr, result.stderr
    assert "(step 2), skipped the batches of 2 steps" in result.stderr
    assert _checkpoints(run) == ["step_00000002", "step_00000004", "step_00000005"]
    data = json.loads((run / "checkpoints" / "step_00000005" / "trainer" / "data.json").read_text())
    assert data["samples"] == 7 * 4  # 5 steps trained + 2 skipped, 4 samples a step
    weights = PortableCheckpoint(run / "checkpoints" / "step_00000005" / "portable").weights()
    assert all(torch.isfinite(w).all() for w in weights.values())
    final = losses(run)
    assert sorted(final) == [1, 2, 3, 4, 5] and all(math.isfinite(v) for v in final.values()), final
