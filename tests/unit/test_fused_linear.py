"""q/k/v (gate/up) as one GEMM: the separate linears' outputs and gradients, the separate parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatrain.parallel.layers import ColumnParallelLinear, fused_column_linear
from megatrain.parallel.mesh import Mesh


@pytest.mark.parametrize("bias", [False, True])
def test_fused_projection_equals_separate_linears_and_saves_no_fused_weight(bias):
    torch.manual_seed(0)
    linears = [ColumnParallelLinear(16, out, Mesh.single(), bias=bias) for out in (16, 8, 8)]
    for lin in linears:
        with torch.no_grad():
            lin.weight.normal_()
            if bias:
                lin.bias.normal_()
    params = [p for lin in linears for p in lin.parameters()]
    x = torch.randn(2, 5, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused = fused_column_linear(x, linears)
    separate = [F.linear(x, lin.weight, lin.bias) for lin in linears]
    grads = [torch.randn_like(y) for y in separate]
    got = torch.autograd.grad(fused, [x, *params], grads)
    want = torch.autograd.grad(separate, [x, *params], grads)
    for a, b in zip([*fused, *got], [*separate, *want]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    assert {t.untyped_storage().data_ptr() for t in saved} == \
        {t.untyped_storage().data_ptr() for t in [x, *(lin.weight for lin in linears)]}
