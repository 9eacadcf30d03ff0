"""Pipeline parallelism (DeepSpeed 1F1B) computes what one process computes, alone and with TP / DP."""

import pytest

from megatrain.config import ConfigError, validate
from megatrain.parallel.stages import bubble_fraction, stage_boundaries
from tests.distributed.harness import run_ranks
from tests.distributed.test_parallel_equivalence import GPT2_STYLE
from tests.distributed.workloads import TINY, assert_same_curve, engine_losses, make_config


def _cfg(model=TINY, checkpointing="none", document_mask=False, **parallel):
    return make_config(model, train=dict(precision="fp32", micro_batch_size=2, global_batch_size=8, seq_len=32,
                                         grad_clip=0.05,  # clipping on: a double-counted norm changes updates
                                         activation_checkpointing=checkpointing), parallel=parallel,
                       data=dict(document_mask=document_mask))


def test_balanced_split_gives_the_lm_head_stage_fewer_blocks():
    cfg = make_config(dict(TINY, n_layers=8, vocab_size=32768), parallel=dict(pp=2))
    bounds = stage_boundaries(cfg.model, cfg.parallel.pp, cfg.train.seq_len)
    assert bounds[0] == 0 and bounds[-1] == 8
    assert bounds[1] - bounds[0] > bounds[2] - bounds[1]  # the head costs several blocks
    assert stage_boundaries(cfg.model, cfg.parallel.pp, cfg.train.seq_len, split=[3, 5]) == [0, 3, 8]


@pytest.mark.parametrize("parallel, message", [
    (dict(pp=2, zero_stage=3), "DeepSpeed's pipeline engine supports ZeRO-0/1 only; choose parallel.zero_stage=1"),
    (dict(pp=2, pp_split=[1, 2]), "parallel.pp_split=[1, 2] must list parallel.pp=2 block counts"),
    (dict(pp=4), "parallel.pp=4 exceeds model.n_layers=2"),
])
def test_invalid_pipeline_layouts_fail_at_config_time(parallel, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(_cfg(**parallel), world_size=4)


def test_bubble_fraction_of_1f1b():
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(2, 32) == pytest.approx(1 / 33)


@pytest.fixture(scope="module")
def reference():
    # The GPT-2 style runs mask attention across documents: the stages pass doc_ids along with the activations.
    return {name: run_ranks(1, engine_losses, _cfg(model, zero_stage=0, document_mask=name == "gpt2"), 3)[0]
            for name, model in (("llama", TINY), ("gpt2", GPT2_STYLE))}


@pytest.mark.parametrize("model, name", [(TINY, "llama"), (GPT2_STYLE, "gpt2")],
                         ids=["llama", "gpt2-tied-document-mask"])
def test_pp2_with_checkpointing_matches_single_process(reference, model, name):
    losses = run_ranks(2, engine_losses, _cfg(model, checkpointing="full", document_mask=name == "gpt2", pp=2,
                                              zero_stage=1), 3)
    assert losses[0] == losses[1]
    assert_same_curve(losses[0], reference[name])


@pytest.mark.parametrize("parallel", [dict(pp=2, tp=2), dict(pp=2, tp=2, sequence_parallel=True),
                                      dict(pp=2, zero_stage=1)], ids=["tp2xpp2", "tp2xpp2-sp", "pp2xdp2"])
def test_four_rank_3d_layouts_match_single_process(reference, parallel):
    losses = run_ranks(4, engine_losses, _cfg(**parallel), 3)
    assert all(rank_losses == losses[0] for rank_losses in losses)
    assert_same_curve(losses[0], reference["llama"])


def built_blocks(rank: int, cfg) -> int:
    """The transformer blocks this rank's pipeline stage holds, as the trainer builds it."""
    import torch

    from megatrain.engine.build import build_model, init_distributed
    from megatrain.engine.deepspeed_config import deepspeed_config
    from megatrain.model.pipeline import PipeBlock
    from megatrain.parallel.mesh import Mesh

    layout = validate(cfg, 2)
    init_distributed(torch.device("cpu"))
    model = build_model(cfg, Mesh.build(layout), deepspeed_config(cfg, layout))
    return sum(isinstance(module, PipeBlock) for module in model.modules())


def test_each_stage_builds_the_blocks_the_planner_reports():
    from megatrain.plan import plan

    cfg = make_config(dict(TINY, n_layers=8, vocab_size=32768), parallel=dict(pp=2), train=dict(seq_len=32))
    built = tuple(run_ranks(2, built_blocks, cfg))
    assert built == plan(cfg, 2).stage_blocks
    assert built[0] > built[1]  # the head's stage holds fewer blocks
