"""Damaged or hostile checkpoint files: a same-size byte flip is caught by the digest and resume falls back to
the previous checkpoint, bit for bit; a planted pickle payload is refused, naming the file, and never runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatrain.engine.checkpoint import META, file_record
from tests.e2e.conftest import TRAIN, cli, losses, torchrun

# ZeRO-1 in one process: DeepSpeed writes a model file and a separate optimizer-state file.
ARGS = (*TRAIN, "train.precision=fp32", "train.eval_interval=0", "optim.schedule=constant", "optim.warmup_steps=1",
        "parallel.zero_stage=1", "train.save_interval=1", "train.keep_last=0")
MODEL, OPTIMIZER = "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def saved(tiny_data, tmp_path_factory) -> Path:
    """Three steps, a checkpoint after each."""
    run = tmp_path_factory.mktemp("saved") / "run"
    result = cli("launcher.train", *ARGS, f"data.path={tiny_data}", f"run.dir={run}", "train.steps=3")
    assert result.returncode == 0, result.stderr
    return run


def _copy(saved: Path, tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    return run, run / "checkpoints" / "step_00000003"


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_same_size_byte_flip_falls_back_to_the_previous_checkpoint_naming_the_file(saved, tiny_data, tmp_path):
    run, newest = _copy(saved, tmp_path)
    middle = run / "checkpoints" / "step_00000002"
    _flip_a_byte(newest / OPTIMIZER)  # Adam moments: loaded silently before digests
    _flip_a_byte(middle / MODEL)  # the zip: an unnamed error before digests, never a fallback

    result = cli("launcher.train", *ARGS, f"data.path={tiny_data}", f"run.dir={run}", "train.steps=3")
    assert result.returncode == 0, result.stderr
    for checkpoint, name in ((newest, OPTIMIZER), (middle, MODEL)):
        assert (f"skipping checkpoint {checkpoint}: {checkpoint / name} is damaged: its xxh3_128 digest is"
                in result.stderr)
    assert "step_00000001 at step 1" in result.stderr
    assert losses(run) == losses(saved)  # steps 2 and 3 redone from step 1 give the same losses, bit for bit


def test_two_ranks_share_the_verification_and_agree_on_the_fallback(tiny_data, tmp_path):
    """Rank 1 alone reads the damaged file (every second file in name order): both ranks skip the checkpoint."""
    run = tmp_path / "run"
    args = (*ARGS, f"data.path={tiny_data}", f"run.dir={run}", "train.steps=2", "parallel.tp=2")
    first = cli("launcher.train", *args, launcher=torchrun(2))
    assert first.returncode == 0, first.stderr
    reference = losses(run)
    newest = run / "checkpoints" / "step_00000002"
    damaged = newest / sorted(json.loads((newest / META).read_text())["files"])[1]
    _flip_a_byte(damaged)
    result = cli("launcher.train", *args, launcher=torchrun(2))
    assert result.returncode == 0, result.stderr
    assert f"skipping checkpoint {newest}: {damaged} is damaged" in result.stderr
    assert "step_00000001 at step 1" in result.stderr
    assert losses(run) == reference


class Payload:
    """Unpickling it creates `marker`: what a hostile checkpoint file would do, as the training user."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant(checkpoint: Path, name: str, marker: Path) -> Path:
    """Replace `name` with a payload and record it in meta.json as if saved so: only the unpickler stands guard."""
    path = checkpoint / name
    torch.save({"module": Payload(marker)}, path)
    meta = json.loads((checkpoint / META).read_text())
    meta["files"][name] = file_record(path)
    (checkpoint / META).write_text(json.dumps(meta))
    return path


def test_a_planted_pickle_payload_in_a_deepspeed_file_is_refused_naming_it_and_never_runs(saved, tiny_data,
                                                                                          tmp_path):
    run, newest = _copy(saved, tmp_path)
    marker = tmp_path / "PWNED"
    planted = _plant(newest, OPTIMIZER, marker)  # read after the model file, which loads with the allow-list
    result = cli("launcher.train", *ARGS, f"data.path={tiny_data}", f"run.dir={run}", "train.steps=4")
    assert result.returncode == 2, result.stderr
    assert f"{planted} holds an object other than tensors" in result.stderr and "it asks for io.open" in result.stderr
    assert not marker.exists()


def test_a_pickled_trainer_state_is_refused_naming_it_and_never_runs(saved, tiny_data, tmp_path):
    run, newest = _copy(saved, tmp_path)
    marker = tmp_path / "PWNED"
    (newest / "trainer" / "rank_00000.json").unlink()
    meta = json.loads((newest / META).read_text())
    del meta["files"]["trainer/rank_00000.json"]
    (newest / META).write_text(json.dumps(meta))
    planted = _plant(newest, "trainer/rank_00000.pt", marker)
    result = cli("launcher.train", *ARGS, f"data.path={tiny_data}", f"run.dir={run}", "train.resume=" + str(newest),
                 "train.steps=4")
    assert result.returncode == 2, result.stderr
    assert f"holds its trainer state as a pickle ({planted}" in result.stderr
    assert not marker.exists()
