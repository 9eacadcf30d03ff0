"""Crashes, kills and signals cost only the steps since the last save; resume is bit for bit.

MEGATRAIN_TEST_SAVE_PAUSE holds each save open (files written, not yet published) so a test can
kill or signal a process mid-save deterministically, without racing a fast save.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatrain.engine.checkpoint import verify
from tests.e2e.conftest import QUIET, ROOT, TRAIN, cli, losses, torchrun

EXIT_PREEMPTED = 75
# A constant LR after one warmup step: the schedule does not depend on train.steps, so a run
# stopped anywhere and resumed to N matches a straight run to N.
ARGS = (*TRAIN, "train.precision=fp32", "train.eval_interval=0", "optim.schedule=constant", "optim.warmup_steps=1")
STRAIGHT_STEPS = 12


def _start(*overrides: str, pause: float = 0.0, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    command = [*(launcher or (sys.executable,)), "-m", "launcher.train", *ARGS, *overrides]
    env = {**QUIET, "MEGATRAIN_TEST_SAVE_PAUSE": str(pause)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: kill the run, not pytest


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}:\n{proc.communicate()[1]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _logged_steps(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _saving(run: Path, tag: str = "*") -> bool:
    """A save is open: its files are written (rank 0's trainer state is the last), not yet published."""
    return any((run / "checkpoints").glob(f".partial-{tag}/trainer/rank_00000.json"))


def _latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text()


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory) -> dict[int, float]:
    run = tmp_path_factory.mktemp("straight") / "run"
    result = cli("launcher.train", *ARGS, f"data.path={tiny_data}", f"run.dir={run}", f"train.steps={STRAIGHT_STEPS}")
    assert result.returncode == 0, result.stderr
    return losses(run)


def test_signal_saves_exits_75_and_a_second_signal_during_the_save_does_no_harm(straight, tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = _start(f"data.path={tiny_data}", f"run.dir={run}", "train.steps=1000", pause=2.0)
    _wait_for(lambda: _logged_steps(run) >= 2, proc, "two logged steps")
    proc.send_signal(signal.SIGUSR1)  # what SLURM sends ahead of a time limit
    _wait_for(lambda: _saving(run), proc, "the save to start")
    proc.send_signal(signal.SIGTERM)  # a second signal while the save is open
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr
    checkpoint = _latest(run)
    assert verify(checkpoint) is None
    stopped = int(checkpoint.name.split("_")[1])
    assert 2 <= stopped <= STRAIGHT_STEPS - 2
    assert not list((run / "checkpoints").glob(".partial-*"))

    result = cli("launcher.train", *ARGS, f"data.path={tiny_data}", f"run.dir={run}", f"train.steps={stopped + 2}")
    assert result.returncode == 0, result.stderr
    assert losses(run) == {step: loss for step, loss in straight.items() if step <= stopped + 2}


def test_kill_during_a_save_keeps_the_previous_checkpoint_and_resume_skips_damaged_ones(straight, tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = _start(f"data.path={tiny_data}", f"run.dir={run}", "train.steps=1000", "train.save_interval=1",
                  "train.keep_last=2", pause=1.0)
    _wait_for(lambda: _saving(run, "step_00000004"), proc, "the step-4 save to be written")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    checkpoints = run / "checkpoints"
    # keep_last=2 pruned step 1; the save killed mid-way left only its .partial directory
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == [".partial-step_00000004", "step_00000002",
                                                                           "step_00000003"]
    assert _latest(run).name == "step_00000003" and verify(_latest(run)) is None
    # damage the newest complete checkpoint: resume must fall back to step 2 and say why
    shard = next((checkpoints / "step_00000003" / "portable").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])

    result = cli("launcher.train", *ARGS, f"data.path={tiny_data}", f"run.dir={run}", "train.steps=6")
    assert result.returncode == 0, result.stderr
    assert f"skipping checkpoint {checkpoints / 'step_00000003'}" in result.stderr
    assert f"ignoring {checkpoints / '.partial-step_00000004'}" in result.stderr
    assert "resumed from" in result.stderr and "step_00000002 at step 2" in result.stderr
    assert losses(run) == {step: loss for step, loss in straight.items() if step <= 6}
    assert not list(checkpoints.glob(".partial-*"))


def test_kill_9_of_one_rank_then_auto_resume_continues_the_loss_curve(straight, tiny_data, tmp_path):
    run = tmp_path / "run"
    args = (f"data.path={tiny_data}", f"run.dir={run}", "parallel.tp=2", "train.save_interval=2")
    proc = _start(*args, "train.steps=1000", launcher=torchrun(2))
    _wait_for(lambda: (run / "checkpoints" / "step_00000004").is_dir(), proc, "the step-4 checkpoint")
    workers = psutil.Process(proc.pid).children(recursive=True)
    victim = next(p for p in workers if "launcher.train" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1")
    victim.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode not in (0, EXIT_PREEMPTED), stderr
    saved = int(_latest(run).name.split("_")[1])
    assert saved >= 4

    result = cli("launcher.train", *ARGS, *args, f"train.steps={saved + 2}", launcher=torchrun(2))
    assert result.returncode == 0, result.stderr
    resumed = losses(run)
    assert resumed.keys() == {step for step in straight if step <= saved + 2}
    for step, loss in resumed.items():  # TP2 against one process: fp32 rounding only
        assert loss == pytest.approx(straight[step], rel=1e-5), step
