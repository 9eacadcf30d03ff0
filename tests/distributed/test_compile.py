"""`train.compile=true` computes what eager computes under TP2 + SP and under ZeRO-3 (fp32, 2 gloo ranks,
3 AdamW steps through DeepSpeed): the same losses and gradient norms step by step."""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_ranks
from tests.distributed.workloads import assert_same_curve, engine_losses, make_config


def _cfg(compile: bool, **parallel):
    return make_config(train=dict(precision="fp32", micro_batch_size=2, global_batch_size=4, seq_len=32,
                                  compile=compile), parallel=parallel)


@pytest.mark.parametrize("parallel", [dict(tp=2, sequence_parallel=True, zero_stage=1), dict(zero_stage=3)],
                         ids=["tp2-sp-zero1", "dp2-zero3"])
def test_compiled_blocks_and_head_match_eager(parallel):
    eager = run_ranks(2, engine_losses, _cfg(False, **parallel), 3)
    compiled = run_ranks(2, engine_losses, _cfg(True, **parallel), 3)
    worst = max(abs(c - e) / abs(e) for key in ("loss", "grad_norm")
                for c, e in zip(compiled[0][key], eager[0][key]))
    print(f"{parallel}: eager {eager[0]}, compiled {compiled[0]}, max relative difference {worst:.1e}")
    assert_same_curve(compiled[0], eager[0], rel=1e-5)
    assert_same_curve(compiled[1], eager[1], rel=1e-5)
