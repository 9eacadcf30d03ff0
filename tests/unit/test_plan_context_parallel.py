"""The planner under context parallelism: activations per rank / cp, ZeRO over DP x CP, ring traffic, search."""

from dataclasses import replace

from megatrain.config import Config, ModelConfig
from megatrain.plan import context_parallel_bytes, plan, search

MODEL = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=8192)


def _cfg(seq_len: int = 8192, **parallel) -> Config:
    cfg = Config(model=MODEL)
    return replace(cfg, parallel=replace(cfg.parallel, zero_stage=3, **parallel),
                   train=replace(cfg.train, seq_len=seq_len, micro_batch_size=1, precision="bf16"))


def test_a_cp_rank_holds_the_activations_of_seq_over_cp_and_zero_partitions_over_dp_x_cp():
    cp2 = plan(_cfg(cp=2), 2)
    assert cp2.memory.activations == plan(_cfg(seq_len=4096), 1).memory.activations
    dp2 = plan(_cfg(), 2)  # the same two ranks as data parallel: the same model-state shards
    assert (cp2.memory.weights, cp2.memory.gradients, cp2.memory.optimizer) == \
        (dp2.memory.weights, dp2.memory.gradients, dp2.memory.optimizer)


def test_ring_traffic_per_step_counts_the_forward_and_backward_hops():
    cfg = _cfg(cp=4)
    layout = plan(cfg, 4).layout
    kv_block = 2 * (8192 // 4) * MODEL.kv_heads * MODEL.head_dim * 4  # K and V of one rank, fp32
    assert context_parallel_bytes(cfg, layout) == (3 + 3 + 4) * kv_block * MODEL.n_layers
    assert context_parallel_bytes(_cfg(), plan(_cfg(), 1).layout) == 0


def test_search_considers_cp_for_long_sequences_only():
    long_layouts = {p.layout.cp for p in search(_cfg(seq_len=8192), 4)}
    assert long_layouts >= {1, 2}  # 4096 tokens per rank at cp=2; cp=4 would leave 2048
    assert 4 not in long_layouts
    assert {p.layout.cp for p in search(_cfg(seq_len=4096), 4)} == {1}
