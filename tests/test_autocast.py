"""torch.autocast over pysparse's layers: a model mixing dense and packed layers runs under mixed precision as the
same dense masked model does (outputs in the region's dtype, float32 parameter gradients), eager and compiled;
float32-only ops run in float32; outside autocast, mixed dtypes are still refused."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pysparse
from pysparse.bench.sweep import block_mask
from pysparse.nn import SparseLinear
from pysparse.ops.autocast import AUTOCAST_POLICY


def _masked_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 32))
    with torch.no_grad():
        for i, layer in ((2, model[2]), (4, model[4])):
            layer.weight.mul_(block_mask(*layer.weight.shape, (32, 32), 0.5, torch.Generator().manual_seed(i)))
    return model


@pytest.mark.parametrize("trainable", [False, True])
def test_mixed_dense_and_packed_layers_under_bfloat16_autocast(trainable):
    dense = _masked_mlp()
    sparse = nn.Sequential(dense[0], nn.ReLU(), SparseLinear.from_dense(dense[2], (32, 32), trainable=trainable),
                           nn.ReLU(), SparseLinear.from_dense(dense[4], (32, 32), trainable=trainable))
    x = torch.randn(40, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = dense(x)
        got = sparse(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    if trainable:
        got.float().square().sum().backward()
        want.float().square().sum().backward()
        for packed, layer in ((sparse[2], dense[2]), (sparse[4], dense[4])):
            assert packed.values.grad.dtype == torch.float32 and packed.bias.grad.dtype == torch.float32
            torch.testing.assert_close(packed.bias.grad, layer.bias.grad, rtol=5e-2, atol=5e-2)


def test_compiled_model_under_autocast_has_no_graph_break():
    torch._dynamo.reset()
    dense = _masked_mlp(1)
    sparse = pysparse.sparsify(dense, block_size=(32, 32), min_sparsity=0.3)
    x = torch.randn(8, 48)
    compiled = torch.compile(sparse, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        eager, traced = sparse(x), compiled(x)
    assert traced.dtype == torch.bfloat16
    torch.testing.assert_close(traced.float(), eager.float(), rtol=2e-2, atol=2e-2)


def test_float32_only_ops_run_in_float32_under_autocast():
    """The unstructured op's CPU kernel is float32: called with bfloat16 activations under autocast it casts them up
    (the float32-list behaviour) rather than refusing them."""
    torch.manual_seed(2)
    layer = pysparse.sparsify(nn.Sequential(nn.Linear(40, 24)), block_size=(1, 1), min_sparsity=0.0)[0]
    x = torch.randn(6, 40).to(torch.bfloat16)
    op = torch.ops.pysparse.unstructured_linear.default
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = op(x, layer.values, layer.columns, layer.segment_ptr, layer.bias, 24)
    assert y.dtype == torch.float32
    ref = pysparse.ops.unstructured_linear_reference(x.float(), layer.values, layer.columns, layer.segment_ptr,
                                                     layer.bias, 24)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert AUTOCAST_POLICY["unstructured_linear"] == "float32" and AUTOCAST_POLICY["bsr_linear"] == "lower"


def test_mixed_dtypes_outside_autocast_are_still_refused():
    lin = _masked_mlp()[2]
    layer = SparseLinear.from_dense(lin, (32, 32))
    with pytest.raises(TypeError, match="values must have the input's dtype BFloat16, got Float"):
        torch.ops.pysparse.bsr_linear(torch.randn(3, 96).to(torch.bfloat16), layer.values, layer.crow_indices,
                                      layer.col_indices, None, 128)
