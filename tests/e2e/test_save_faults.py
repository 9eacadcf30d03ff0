"""Faults around a save, injected for real: a full filesystem (a small tmpfs) and signals after the save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import QUIET, ROOT, TRAIN, cli

ARGS = (*TRAIN, "train.precision=fp32", "train.eval_interval=0")
EXIT_DISK_FULL, EXIT_PREEMPTED = 74, 75


@pytest.fixture
def small_disk(tmp_path):
    """A 7 MiB tmpfs: one checkpoint of the tiny model (4.5 MB) fits, a second does not. Needs mount (root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()}): run as root to inject a full disk")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_during_a_save_names_the_path_and_keeps_the_previous_checkpoint(tiny_data, small_disk):
    run = small_disk / "run"
    base = (*ARGS, f"data.path={tiny_data}", f"run.dir={run}", "train.steps=3", "train.save_interval=1")
    full = cli("launcher.train", *base)
    assert full.returncode == EXIT_DISK_FULL, full.stderr
    assert f"error: no space left on {run / 'checkpoints'} while saving step 2" in full.stderr
    assert f"the previous checkpoint {run / 'checkpoints' / 'step_00000001'} is kept" in full.stderr
    assert "Traceback" not in full.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001"]
    assert not list((run / "checkpoints").glob(".partial-*"))  # the failed part is removed: its space is back

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # the user frees space
    resumed = cli("launcher.train", *base)
    assert resumed.returncode == 0, resumed.stderr
    assert "step_00000001 at step 1" in resumed.stderr


def test_after_the_save_on_a_signal_the_exit_is_75_whatever_arrives(tiny_data, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "launcher.train", *ARGS, f"data.path={tiny_data}", f"run.dir={run}",
               "train.steps=1000"]
    proc = subprocess.Popen(command, cwd=ROOT, env=QUIET, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().count("\n") >= 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    while not (run / "checkpoints" / "latest").exists():  # published: from here on the exit code is settled
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not save"
        time.sleep(0.005)
    while proc.poll() is None:  # SIGTERM after SIGTERM through the teardown (was: killed, 143)
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.02)
    assert proc.wait() == EXIT_PREEMPTED, proc.stderr.read()


