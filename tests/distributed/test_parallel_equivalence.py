"""TP, SP, DP and ZeRO layouts compute what a single process computes (fp32, real gloo groups)."""

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.workloads import TINY, assert_same_curve, engine_losses, make_config, model_gradients

GPT2_STYLE = dict(TINY, norm="layernorm", position="learned", activation="gelu", bias=True, tie_embeddings=True)


def _assert_close_grads(reference: dict, other: dict, rtol: float = 1e-5) -> None:
    assert other["grads"].keys() == reference["grads"].keys()
    for name, ref in reference["grads"].items():
        # atol: some gradients are zero in exact arithmetic (a key bias under softmax), only noise here
        err = (other["grads"][name] - ref).abs().max()
        assert err <= rtol * ref.abs().max() + 1e-7, f"gradient of {name} differs by {err:.2e}"
    assert other["loss"] == pytest.approx(reference["loss"], rel=1e-6)


@pytest.mark.parametrize("model", [TINY, GPT2_STYLE], ids=["llama", "gpt2"])
def test_tp2_and_sequence_parallel_gradients_match_single_process(model):
    reference = run_ranks(1, model_gradients, model, 1, False)[0]
    _assert_close_grads(reference, run_ranks(2, model_gradients, model, 2, False)[0])
    _assert_close_grads(reference, run_ranks(2, model_gradients, model, 2, True)[0])


def test_activation_checkpointing_gives_identical_gradients_under_tp_and_sp():
    full = run_ranks(2, model_gradients, TINY, 2, True, "full")[0]
    selective = run_ranks(2, model_gradients, TINY, 2, True, "selective")[0]
    plain = run_ranks(2, model_gradients, TINY, 2, True, "none")[0]
    for other in (full, selective):
        assert other["loss"] == plain["loss"]
        for name, grad in plain["grads"].items():
            torch.testing.assert_close(other["grads"][name], grad, rtol=0, atol=1e-7)


def test_document_mask_under_tp2_and_sequence_parallel_matches_the_dense_mask():
    """The per-document kernel, heads split over TP and the sequence gathered under SP, against one process
    with the dense [b, 1, s, s] mask (model.attention_backend=math)."""
    reference = run_ranks(1, model_gradients, dict(TINY, attention_backend="math"), 1, False, "none", True)[0]
    _assert_close_grads(reference, run_ranks(2, model_gradients, TINY, 2, True, "selective", True)[0])
    plain = run_ranks(1, model_gradients, TINY, 1, False)[0]
    assert plain["loss"] != pytest.approx(reference["loss"], rel=1e-4)  # the mask changes the result


def _cfg(**parallel):
    checkpointing = parallel.pop("checkpointing", "none")
    return make_config(train=dict(precision="fp32", micro_batch_size=2, global_batch_size=8, seq_len=32,
                                  grad_clip=0.05,  # clipping on: a double-counted norm changes updates
                                  activation_checkpointing=checkpointing), parallel=parallel)


@pytest.fixture(scope="module")
def single_process_losses():
    return run_ranks(1, engine_losses, _cfg(zero_stage=0), 4)[0]


@pytest.mark.parametrize("zero", [dict(zero_stage=1), dict(zero_stage=3), dict(zero_stage=3, zero3_gather="model")],
                         ids=["zero1", "zero3", "zero3-gather-model"])
def test_dp2_loss_curve_matches_single_process(single_process_losses, zero):
    losses = run_ranks(2, engine_losses, _cfg(**zero), 4)
    assert losses[0] == losses[1]
    assert_same_curve(losses[0], single_process_losses)


def test_tp2_with_sequence_parallel_and_checkpointing_matches_single_process(single_process_losses):
    losses = run_ranks(2, engine_losses, _cfg(tp=2, zero_stage=1, sequence_parallel=True,
                                              checkpointing="selective"), 4)
    assert_same_curve(losses[0], single_process_losses)


def test_tp2_dp2_zero3_matches_single_process(single_process_losses):
    """ZeRO-3 must partition over the DP group only; partitioning over the world mixes TP shards."""
    losses = run_ranks(4, engine_losses, _cfg(tp=2, zero_stage=3, checkpointing="full"), 4)
    assert all(rank_losses == losses[0] for rank_losses in losses)
    assert_same_curve(losses[0], single_process_losses)
