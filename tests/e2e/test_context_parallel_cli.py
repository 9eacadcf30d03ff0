"""A context-parallel layout that cannot run fails from the CLI before any process group: exit 2, one line."""

from tests.e2e.conftest import TRAIN, cli
from tests.e2e.test_config_errors import _one_line_error


def test_bad_context_parallel_shapes_exit_2_before_training(tmp_path):
    result = cli("launcher.train", *TRAIN, f"run.dir={tmp_path / 'run'}", f"data.path={tmp_path}",
                 "parallel.cp=2", "train.seq_len=30")
    _one_line_error(result, "train.seq_len=30 must be divisible by 2 x parallel.cp = 4")
    assert not (tmp_path / "run").exists()
    result = cli("launcher.plan", "model=tiny", "model.vocab_size=512", "parallel.cp=4", "parallel.cp_mode=ulysses")
    _one_line_error(result, "model.n_kv_heads=2 / parallel.tp=1", "not divisible by parallel.cp=4", "cp_mode=ring")
