"""One run directory, one owner and one model: a lock, config.yaml written only after every check, a clean
metrics.jsonl, and a finished run left as it is. Every fault is injected through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from tests.e2e.conftest import QUIET, ROOT, TRAIN, cli, metrics, torchrun

ARGS = (*TRAIN, "train.precision=fp32", "train.eval_interval=0")


def test_rerun_torn_log_and_another_model(tiny_data, tmp_path):
    run = tmp_path / "run"
    base = (*ARGS, f"data.path={tiny_data}", f"run.dir={run}")
    first = cli("launcher.train", *base, "train.steps=2", "train.sample_tokens=4")
    assert first.returncode == 0, first.stderr
    summary, config = (run / "summary.json").read_bytes(), (run / "config.yaml").read_bytes()

    # a finished run rerun: says so, rewrites nothing, prints no sample as if it trained
    again = cli("launcher.train", *base, "train.steps=2", "train.sample_tokens=4")
    assert again.returncode == 0, again.stderr
    assert "is finished" in again.stderr and "step_00000002 is at step 2 of train.steps=2" in again.stderr
    assert "--- sample ---" not in again.stdout
    assert (run / "summary.json").read_bytes() == summary and (run / "config.yaml").read_bytes() == config

    # another model: refused naming the key that differs, config.yaml untouched
    other = cli("launcher.train", *base, "train.steps=3", "model.d_model=128")
    assert other.returncode == 2
    assert "model.d_model: 64 -> 128" in other.stderr and "model.n_layers" not in other.stderr
    assert (run / "config.yaml").read_bytes() == config

    # a config.yaml written before model.vocab_multiple existed, and a torn last metrics row (disk full)
    (run / "config.yaml").write_text("".join(line + "\n" for line in config.decode().splitlines()
                                             if "vocab_multiple" not in line))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 6.2')
    resumed = cli("launcher.train", *base, "train.steps=3")
    assert resumed.returncode == 0, resumed.stderr
    assert "dropping its torn last line" in resumed.stderr
    assert [row["step"] for row in metrics(run)] == [1, 2, 3]

    # two ranks resuming on another layout: rank 0 alone says so (it was one line per rank)
    relayout = cli("launcher.train", *base, "train.steps=4", "parallel.tp=2", launcher=torchrun(2))
    assert relayout.returncode == 0, relayout.stderr
    assert relayout.stderr.count("loading its portable copy") == 1, relayout.stderr


def _holder(run) -> subprocess.Popen:
    """Another process holding run.dir's lock, taken with the trainer's own function."""
    code = ("import sys, time; from pathlib import Path; from megatrain.engine.run_dir import lock_run_dir; "
            f"lock_run_dir(Path({str(run)!r})); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**QUIET, "SLURM_JOB_ID": "4242"},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_lock_is_refused_a_dead_one_taken_over(tiny_data, tmp_path):
    run = tmp_path / "run"
    base = (*ARGS, f"data.path={tiny_data}", f"run.dir={run}", "train.steps=2")
    holder = _holder(run)
    try:
        refused = cli("launcher.train", *base)
        assert refused.returncode == 2, refused.stderr
        assert f"run.dir={run} is in use by another run (pid {holder.pid} on " in refused.stderr
        assert "SLURM job 4242" in refused.stderr
        assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # rows left by a run killed before its first checkpoint: a run from step 0 starts a clean log
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    taken = cli("launcher.train", *base)
    assert taken.returncode == 0, taken.stderr
    assert f"taking over the lock left by pid {holder.pid}" in taken.stderr
    assert [row["step"] for row in metrics(run)] == [1, 2] and 9.0 not in [r["loss"] for r in metrics(run)]
    # a clean exit leaves a lock that names nobody: the next run takes it silently
    assert json.loads((run / "run.lock").read_text() or "{}") == {}
