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


def test_a_model_too_large_for_this_host_is_refused_with_the_shortfall_before_anything_is_built(tiny_data, tmp_path):
    # llama-7b in fp32 in one CPU process: ~16 bytes per parameter, far beyond this host's memory
    args = [a for a in TRAIN if not a.startswith("model=")]
    result = cli("launcher.train", *args, "model=llama-7b", "train.precision=fp32", f"data.path={tiny_data}",
                 f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train.memory_check: the planner puts the peak per rank at" in result.stderr
    assert "short by" in result.stderr and "train.memory_check=warn starts anyway" in result.stderr
    assert not (tmp_path / "run").exists()
