"""The pre-flight memory check: ranks per node, and a refusal that names the shortfall and layouts that fit."""

from __future__ import annotations

import torch

from megatrain.config import Config, ModelConfig
from megatrain.engine.memory_check import ranks_on_this_node, shortfall
from megatrain.plan import GB

CPU = torch.device("cpu")


def test_ranks_on_this_node_come_from_torchrun_or_srun():
    assert ranks_on_this_node({}) == 1
    assert ranks_on_this_node({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert ranks_on_this_node({"SLURM_STEP_ID": "0", "SLURM_TASKS_PER_NODE": "4(x2),3"}) == 4
    assert ranks_on_this_node({"SLURM_TASKS_PER_NODE": "8"}) == 1  # the batch shell: one process


def _cfg(zero: int) -> Config:
    cfg = Config(model=ModelConfig(vocab_size=32000, d_model=2048, n_layers=4, n_heads=16, n_kv_heads=4,
                                   max_seq_len=256))
    cfg.parallel.zero_stage = zero
    cfg.train.precision, cfg.train.seq_len, cfg.train.micro_batch_size = "fp32", 64, 1
    return cfg


def test_a_layout_that_does_not_fit_is_refused_naming_the_shortfall_and_layouts_that_fit():
    # 0.31B parameters in fp32 on 4 ranks: ZeRO-1 plans 2.84 GB per rank, ZeRO-3 less (d^2 reduce buckets)
    assert shortfall(_cfg(3), 4, CPU, int(2.6 * GB), "test") is None
    message = shortfall(_cfg(1), 4, CPU, int(2.6 * GB), "test")
    assert message is not None and "2.84 GB" in message and "2.60 GB is available per rank (test)" in message
    assert "short by 0.24 GB" in message
    assert "parallel.zero_stage=3" in message and "train.memory_check=warn" in message
    assert "no layout" in shortfall(_cfg(3), 4, CPU, int(0.1 * GB), "test")
