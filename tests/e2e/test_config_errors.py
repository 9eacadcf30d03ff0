"""Bad configs fail in seconds, before any process group, naming the key and what is allowed."""

import pytest

from tests.e2e.conftest import TRAIN, cli


@pytest.mark.parametrize("override, message", [
    ("train.stepz=5", "train.stepz"),
    ("train.steps=many", "train.steps"),
    ("train.global_batch_size=7", "train.global_batch_size=7 is not a multiple of train.micro_batch_size"),
    ("parallel.tp=3", "model.n_heads=4 is not divisible by parallel.tp=3"),
    ("train.precision=fp16", "train.precision='fp16' is not allowed; choose one of bf16, fp32"),
])
def test_bad_config_exits_before_training_and_names_the_key(tmp_path, override, message):
    result = cli("launcher.train", *TRAIN, f"run.dir={tmp_path / 'run'}", f"data.path={tmp_path}", override)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "run").exists()
