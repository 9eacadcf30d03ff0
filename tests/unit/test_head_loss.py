"""The fused, chunked LM head + loss equals logits made whole then cross entropy (one process)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatrain.parallel.cross_entropy import chunked_head_cross_entropy, vocab_parallel_cross_entropy


def _inputs(dtype: torch.dtype, n: int = 37, d: int = 16, vocab: int = 96):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(vocab, d, generator=gen) * 0.5).to(dtype).requires_grad_()
    return h, w, torch.randint(0, vocab, (n,), generator=gen)


def _grads(loss_fn, h, w, targets):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = loss_fn(h, w, targets)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _unfused(h, w, targets):  # what the head did before: all logits, then the loss
    return vocab_parallel_cross_entropy(F.linear(h, w), targets, 0, None).mean()


@pytest.mark.parametrize("chunk", [1, 8, 36, 37, 1000, None])
def test_chunked_loss_and_gradients_equal_the_unfused_head_in_fp32(chunk):
    h, w, targets = _inputs(torch.float32)
    ref = _grads(_unfused, h, w, targets)
    torch_ref = _grads(lambda h, w, t: F.cross_entropy(F.linear(h, w), t), h, w, targets)
    got = _grads(lambda h, w, t: chunked_head_cross_entropy(h, w, t, 0, None, chunk), h, w, targets)
    for name, a, b, c in zip(("loss", "grad h", "grad w"), ref, torch_ref, got):
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_head_in_bf16_is_within_bf16_tolerance_of_the_unfused_head():
    h, w, targets = _inputs(torch.bfloat16, n=64)
    ref = _grads(_unfused, h, w, targets)
    got = _grads(lambda h, w, t: chunked_head_cross_entropy(h, w, t, 0, None, 16), h, w, targets)
    for name, a, b in zip(("loss", "grad h", "grad w"), ref, got):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-3, msg=name)


def test_upstream_gradient_scales_the_saved_gradients():
    h, w, targets = _inputs(torch.float32)
    ref = _grads(lambda h, w, t: 3.0 * _unfused(h, w, t), h, w, targets)
    got = _grads(lambda h, w, t: 3.0 * chunked_head_cross_entropy(h, w, t, 0, None, 8), h, w, targets)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_without_grad_no_gradient_is_computed_and_the_loss_is_the_same():
    h, w, targets = _inputs(torch.float32)
    with torch.no_grad():
        loss = chunked_head_cross_entropy(h, w, targets, 0, None, 8)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(h, w), targets).detach())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_model_gradients_equal_those_through_full_logits(tied):
    from megatrain.config import ModelConfig
    from megatrain.model.init import canonical_parameters, init_parameter
    from megatrain.model.transformer import Transformer
    from megatrain.parallel.mesh import Mesh

    model = Transformer(ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, max_seq_len=32,
                                    tie_embeddings=tied, loss_chunk_tokens=5))
    for name, p in canonical_parameters(model):
        init_parameter(p, name, seed=3, mesh=Mesh.single())
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    fused = model(ids[:, :-1], ids[:, 1:])
    fused.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    full.backward()
    torch.testing.assert_close(fused, full, rtol=1e-6, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
