"""The attention core's kernels: document masks without an [s, s] tensor, exact against the dense mask; the
start-up decision that CUDA never runs SDPA's math kernel unless model.attention_backend=math."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from megatrain.config import ConfigError, ModelConfig, validate_model
from megatrain.engine.run_dir import model_changes
from megatrain.model.attention import (
    DocumentMask,
    attend,
    attention_plan,
    check_attention,
    document_block_mask,
    document_kernel,
    math_fallback_reason,
    probe_sdpa,
)
from megatrain.model.init import canonical_parameters, init_parameter
from megatrain.model.transformer import Transformer
from megatrain.parallel.mesh import Mesh

TINY = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)


def doc_ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    """Rows of packed documents: one-token documents, long ones, one that fills a whole row."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.cumsum((torch.rand(s, generator=gen) < p).int(), 0) for p in (0.3, 0.03)][:b]
    rows += [torch.zeros(s, dtype=torch.int64)] * (b - len(rows))
    return torch.stack(rows).int()


def test_kernel_choice_per_backend_and_device():
    assert [document_kernel("auto", d) for d in ("cuda", "cpu")] == ["flex", "segments"]
    assert {document_kernel("math", d) for d in ("cuda", "cpu")} == {"dense"}
    assert DocumentMask.build(doc_ids(1, 16), "auto").dense is None  # no [s, s] tensor on the CPU path


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_per_document_attention_is_exact_against_the_dense_mask(kv_heads):
    torch.manual_seed(0)
    b, s, d = 3, 96, 16
    q = torch.randn(b, 4, s, d, requires_grad=True)
    k, v = (torch.randn(b, kv_heads, s, d, requires_grad=True) for _ in range(2))
    ids = doc_ids(b, s)
    dense, segments = (attend(q, k, v, DocumentMask.build(ids, backend)) for backend in ("math", "auto"))
    grad = torch.randn_like(dense)
    torch.testing.assert_close(segments, dense, rtol=1e-5, atol=1e-5)
    for a, r in zip(torch.autograd.grad(segments, (q, k, v), grad), torch.autograd.grad(dense, (q, k, v), grad)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [32, 128])
def test_flex_block_mask_from_doc_ids_matches_create_block_mask_and_the_dense_mask(block):
    """The CUDA path's block mask, built in O((s/block)^2); FlexAttention's forward runs eagerly on the CPU
    (it has no CPU backward), enough to show the mask means the same as the dense one."""
    torch.manual_seed(1)
    b, s = 2, 200  # not a multiple of the block: the tail tile is partial
    ids = doc_ids(b, s)
    mine = document_block_mask(ids, block)
    reference = create_block_mask(lambda n, h, q, kv: (q >= kv) & (ids[n, q] == ids[n, kv]), b, None, s, s,
                                  device="cpu", BLOCK_SIZE=block)
    assert torch.equal(mine.to_dense(), reference.to_dense())
    assert torch.equal(mine.full_kv_num_blocks, reference.full_kv_num_blocks)  # fully visible tiles skip the mask
    q, k, v = torch.randn(b, 4, s, 16), torch.randn(b, 2, s, 16), torch.randn(b, 2, s, 16)
    dense = attend(q, k, v, DocumentMask.build(ids, "math"))
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=mine, enable_gqa=True), dense, rtol=1e-5, atol=1e-5)


def build(backend: str, checkpointing: str) -> Transformer:
    model = Transformer(ModelConfig(**TINY, attention_backend=backend), checkpointing=checkpointing)
    for name, p in canonical_parameters(model):
        init_parameter(p, name, seed=3, mesh=Mesh.single())
    return model


@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_model_loss_and_gradients_match_the_dense_mask_under_checkpointing(checkpointing):
    ids = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(0))
    masks = doc_ids(2, 64)
    results = []
    for backend in ("math", "auto"):
        model = build(backend, checkpointing)
        loss = model(ids[:, :-1], ids[:, 1:], doc_ids=masks)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (dense_loss, dense_grads), (loss, grads) = results
    torch.testing.assert_close(loss, dense_loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dense_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_start_up_plan_allows_only_fast_sdpa_kernels_on_cuda():
    cfg = ModelConfig(**TINY)
    assert attention_plan(cfg, torch.bfloat16, "cuda", False).sdpa_backends == ("flash", "cudnn")
    assert attention_plan(cfg, torch.float32, "cuda", False).sdpa_backends == ("efficient",)
    assert attention_plan(cfg, torch.bfloat16, "cpu", False).sdpa_backends is None  # nothing to assert on a CPU
    assert attention_plan(cfg, torch.bfloat16, "cuda", True).sdpa_backends is None  # FlexAttention, not SDPA
    math = dataclasses.replace(cfg, attention_backend="math", dropout=0.1)
    assert attention_plan(math, torch.float32, "cuda", True) == attention_plan(math, torch.float32, "cuda", False)
    assert attention_plan(math, torch.float32, "cuda", True).sdpa_backends is None
    dropout = dataclasses.replace(cfg, dropout=0.1)
    assert "model.dropout=0" in attention_plan(dropout, torch.bfloat16, "cuda", True).error
    with pytest.raises(ConfigError, match="no dropout"):  # raised before anything touches a GPU
        check_attention(dropout, torch.bfloat16, torch.device("cuda"), document_mask=True)


def test_probe_says_why_no_fast_kernel_runs():
    """The probe itself runs on the CPU: its SDPA has flash but no memory-efficient kernel."""
    cfg = ModelConfig(**TINY)
    assert probe_sdpa(cfg, torch.float32, torch.device("cpu"), ("flash",)) is None
    reason = probe_sdpa(cfg, torch.float32, torch.device("cpu"), ("efficient",))
    assert "fp32 runs only the memory-efficient kernel" in reason and "GQA" in reason
    assert math_fallback_reason(torch.bfloat16, 320, False, []) == "head_dim 320 > 256"
    assert "not a multiple of 8" in math_fallback_reason(torch.bfloat16, 36, False, [])
    assert math_fallback_reason(torch.bfloat16, 128, False, ["Flash attention\n needs sm80"]).endswith(
        "torch: Flash attention needs sm80")


def test_a_resume_may_switch_the_attention_backend_but_not_the_model():
    saved = dataclasses.asdict(ModelConfig(**TINY))
    assert model_changes(saved, {**saved, "attention_backend": "math"}) == []
    assert model_changes(saved, {**saved, "attention_backend": "math", "d_model": 128}) == ["model.d_model: 64 -> 128"]


def test_unknown_attention_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="model.attention_backend"):
        validate_model(ModelConfig(**TINY, attention_backend="flash"))
