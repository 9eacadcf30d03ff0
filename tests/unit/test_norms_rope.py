"""Lean norms and RoPE: the same numbers as the fp32-copy formulas they replace, less kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatrain.model.norms import Norm
from megatrain.model.rope import apply_rope, rope_tables
from megatrain.parallel.mesh import Mesh

TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def _old_norm(x, weight, bias, kind, eps):  # what Norm computed before: fp32 copies throughout
    h = x.float()
    if kind == "layernorm":
        h = F.layer_norm(h, h.shape[-1:], weight.float(), None if bias is None else bias.float(), eps)
    else:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return h.to(x.dtype)


def _old_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _saved(fn, *args) -> list[tuple[tuple[int, ...], torch.dtype]]:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t,
                                                  lambda t: t):
        fn(*args)
    return saved


def _compare(new, old, inputs, dtype):
    grad = torch.randn_like(new(*inputs))
    outs = []
    for fn in (new, old):
        y = fn(*inputs)
        outs.append((y, *torch.autograd.grad(y, [t for t in inputs if t.requires_grad], grad)))
    for a, b in zip(*outs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_norm_matches_the_fp32_formula_and_keeps_only_its_input(kind, dtype):
    torch.manual_seed(0)
    norm = Norm(64, kind, 1e-5, True, Mesh.single(), False)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64))
        if norm.bias is not None:
            norm.bias.normal_()
    x = (3 * torch.randn(2, 8, 64)).to(dtype).requires_grad_()
    _compare(norm, lambda x: _old_norm(x, norm.weight, norm.bias, kind, 1e-5), [x], dtype)
    activations = [s for s in _saved(norm, x) if s[0] != (64,)]  # parameters aside
    assert activations[0] == ((2, 8, 64), dtype)  # the input, in its own dtype
    assert all(shape == (2, 8, 1) and dt == torch.float32 for shape, dt in activations[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_the_fp32_formula_and_keeps_only_the_tables(dtype):
    torch.manual_seed(0)
    cos, sin = rope_tables(16, 8, 10000.0, torch.device("cpu"))
    x = torch.randn(2, 16, 3, 8).to(dtype).transpose(1, 2).requires_grad_()  # [b, heads, s, d] as q is
    _compare(lambda x: apply_rope(x, cos, sin), lambda x: _old_rope(x, cos, sin), [x], dtype)
    assert apply_rope(x, cos, sin).stride() == x.stride()
    # the tables rounded to x's dtype (as HF Llama does): bf16 x with fp32 tables runs 6x slower kernels
    assert {s for s in _saved(apply_rope, x, cos, sin)} == {((16, 8), dtype)}
