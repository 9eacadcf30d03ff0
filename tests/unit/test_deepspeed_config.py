"""The DeepSpeed config megatrain writes (run.dir/deepspeed.json): overlap, buckets, ZeRO-3 prefetch, pinned."""

from __future__ import annotations

import pytest

from megatrain.config import validate
from megatrain.engine.deepspeed_config import deepspeed_config
from megatrain.scaling.flops import param_counts
from tests.unit.test_plan import preset

D = 4096  # llama-7b


def zero_section(stage: int, *overrides: str) -> dict:
    cfg = preset("llama-7b", "train.seq_len=4096", "plan.num_gpus=16", f"parallel.zero_stage={stage}",
                 "train.grad_reduce_dtype=bf16", *overrides)
    return deepspeed_config(cfg, validate(cfg, 16))["zero_optimization"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradients_are_reduced_in_d2_buckets_while_backward_runs(stage):
    zero = zero_section(stage)
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert zero["reduce_bucket_size"] == D * D
    if stage < 3:
        assert zero["allgather_bucket_size"] == D * D and zero["reduce_scatter"] is True
    assert zero_section(stage, "parallel.reduce_bucket_size=1000")["reduce_bucket_size"] == 1000


def test_zero3_prefetches_under_a_two_block_bound_per_tp_rank():
    for tp in (1, 2):
        zero = zero_section(3, f"parallel.tp={tp}")
        block = param_counts(preset("llama-7b").model).non_embedding // (32 * tp)
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * D * D)
        assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 2 * block
        assert zero["stage3_param_persistence_threshold"] == 10 * D


def test_zero3_gather_model_prefetches_and_holds_the_whole_model_for_its_backward():
    zero = zero_section(3, "parallel.zero3_gather=model")
    whole = param_counts(preset("llama-7b").model).total
    assert zero["stage3_prefetch_bucket_size"] == zero["stage3_max_live_parameters"] == whole
    assert zero["stage3_max_reuse_distance"] == 2 * whole  # a forward and a backward of parameters in between
    assert zero["stage3_param_persistence_threshold"] == 10 * D


def test_zero0_has_no_zero_keys_and_deepspeed_reads_every_key_we_write():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    assert zero_section(0) == {"stage": 0}
    for stage, overrides in ((1, ()), (2, ()), (3, ()), (3, ("parallel.zero3_gather=model",))):
        zero = zero_section(stage, *overrides)
        parsed = DeepSpeedZeroConfig(**zero)  # pydantic: a misspelt key fails here
        assert parsed.overlap_comm is True and parsed.reduce_bucket_size == zero["reduce_bucket_size"]
        if stage == 3:
            assert parsed.prefetch_bucket_size == zero["stage3_prefetch_bucket_size"]
            assert parsed.max_live_parameters == zero["stage3_max_live_parameters"]
