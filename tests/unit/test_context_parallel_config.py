"""parallel.cp / parallel.cp_mode: what context parallelism cannot run is refused by validate(), with the key."""

import re

import pytest

from megatrain.config import Config, ConfigError, ModelConfig, validate


def _cfg(**changes) -> Config:
    cfg = Config(model=ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   max_seq_len=64))
    cfg.train.seq_len = 32
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def test_cp_is_a_mesh_dimension_of_the_layout():
    layout = validate(_cfg(parallel__cp=2, parallel__tp=2, parallel__cp_mode="ulysses", model__n_kv_heads=4), 8)
    assert (layout.tp, layout.cp, layout.dp, layout.cp_mode, layout.world) == (2, 2, 2, "ulysses", 8)


@pytest.mark.parametrize("changes, world, message", [
    (dict(parallel__cp=2, train__seq_len=30), 2, "train.seq_len=30 must be divisible by 2 x parallel.cp = 4"),
    (dict(parallel__cp=2, parallel__cp_mode="ulysses", parallel__tp=2), 4,
     "model.n_kv_heads=2 / parallel.tp=2 is not divisible by parallel.cp=2"),
    (dict(parallel__cp=4, parallel__cp_mode="ulysses"), 4, "model.n_kv_heads=2 / parallel.tp=1 is not divisible"),
    (dict(parallel__cp=2, parallel__cp_mode="zigzag"), 2, "parallel.cp_mode='zigzag' is not allowed"),
    (dict(parallel__cp=2, parallel__pp=2), 4, "parallel.cp=2 with parallel.pp=2 is not supported"),
    (dict(parallel__cp=2, data__document_mask=True), 2, "with data.document_mask=true is not supported"),
    (dict(parallel__cp=2, model__dropout=0.1), 2, "with model.dropout=0.1 is not supported"),
    (dict(parallel__cp=2, parallel__tp=4, model__n_kv_heads=4, parallel__sequence_parallel=True, train__seq_len=36),
     8, "train.seq_len / parallel.cp = 18 must be divisible by parallel.tp=4"),
    (dict(parallel__cp=2), 3, "world size 3 is not divisible by parallel.tp x parallel.pp x parallel.cp"),
])
def test_what_cp_cannot_run_is_a_config_error(changes, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(_cfg(**changes), world)
