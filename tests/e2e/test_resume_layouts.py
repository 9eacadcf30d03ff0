"""A resume on another layout continues the exact sample sequence (the data position is global).

DeepSpeed's pipeline feeds only the first and last stage, so a middle stage's loader never moves; a run
resumed on another layout must still read the samples the uninterrupted run read next. fp32 losses of
the resumed steps equal the straight run's: a different sample would change them.
"""

from __future__ import annotations

import shutil

import pytest

from tests.e2e.conftest import TRAIN, cli, losses, torchrun

ARGS = (*TRAIN, "model.n_layers=3", "train.precision=fp32", "train.eval_interval=0", "train.save_interval=1",
        "train.micro_batch_size=1", "optim.warmup_steps=1", "optim.lr=3e-3")


def _resume(source, step: int, run, *args: str, nproc: int):
    shutil.copytree(source / "checkpoints" / f"step_{step:08d}", run / "checkpoints" / f"step_{step:08d}")
    result = cli("launcher.train", *args, f"run.dir={run}", launcher=torchrun(nproc))
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(run)


def _assert_continues(resumed: dict[int, float], straight: dict[int, float], after: int) -> None:
    assert list(resumed) == [s for s in straight if s > after]
    for step, loss in resumed.items():
        assert loss == pytest.approx(straight[step], rel=1e-5), step


def test_pp3_resumes_on_pp1_dp3_and_back_on_pp3_with_the_same_samples(tiny_data, tmp_path):
    args = (*ARGS, f"data.path={tiny_data}", "train.steps=3", "train.global_batch_size=3")
    straight = tmp_path / "pp3"
    result = cli("launcher.train", *args, "parallel.pp=3", f"run.dir={straight}", launcher=torchrun(3))
    assert result.returncode == 0, result.stderr[-3000:]
    reference = losses(straight)
    # ranks 1 and 2 of the DP3 run were the middle and last stage of the PP3 run
    flat = _resume(straight, 1, tmp_path / "pp1", *args, "parallel.pp=1", nproc=3)
    _assert_continues(flat, reference, 1)
    back = _resume(tmp_path / "pp1", 2, tmp_path / "pp3-again", *args, "parallel.pp=3", nproc=3)
    _assert_continues(back, reference, 2)


def test_dp2_resumes_on_dp4_with_the_same_samples(tiny_data, tmp_path):
    args = (*ARGS, f"data.path={tiny_data}", "train.steps=2", "train.global_batch_size=4")
    straight = tmp_path / "dp2"
    result = cli("launcher.train", *args, f"run.dir={straight}", launcher=torchrun(2))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = _resume(straight, 1, tmp_path / "dp4", *args, nproc=4)
    _assert_continues(resumed, losses(straight), 1)


def test_a_run_that_prefetched_batches_resumes_at_the_batches_it_consumed(tiny_data, tmp_path):
    """data.prefetch=2 keeps batches built ahead at every save; the checkpoint must not count them."""
    args = (*ARGS, f"data.path={tiny_data}", "train.steps=4", "train.global_batch_size=2")
    straight = tmp_path / "ahead"
    result = cli("launcher.train", *args, "data.prefetch=2", f"run.dir={straight}")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = _resume(straight, 2, tmp_path / "in_step", *args, "data.prefetch=0", nproc=1)
    _assert_continues(resumed, losses(straight), after=2)
