"""Fused residuals: bsr_linear / bsr_conv2d_nhwc(..., residual=) and SparseLinear / SparseConv2d(x, residual)
compute activation(layer(x) + residual) like the masked dense layer, on every kernel path, in inference and
training, and refuse residuals of the wrong shape, dtype or type."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SEED, assert_matches_reference, make_case, relative_error
from epilogue_cases import CONV_PATHS, ROWS, SPECS, sparse_conv
from pysparse.bench.sweep import block_mask
from pysparse.nn import SparseConv2d, SparseLinear
from pysparse.ops import ACTIVATIONS, bsr_conv2d_nhwc, bsr_conv2d_nhwc_reference, bsr_linear


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("rows", ROWS)   # dot product, outer product, broadcast kernels
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_fused_residual_matches_dense_reference(spec, rows, activation):
    case = make_case(spec, "cpu", salt=f"res{rows}")
    x = case.x
    if x.dim() == 2:
        x = torch.randn(rows, x.shape[-1], generator=torch.Generator().manual_seed(rows)).to(spec.dtype)
    g = torch.Generator().manual_seed(rows + 1)
    residual = torch.randn(*x.shape[:-1], case.out_features, generator=g).to(spec.dtype)
    if rows % 2:  # a non-contiguous residual is read through a contiguous copy
        residual = torch.randn(case.out_features, *x.shape[:-1], generator=g).to(spec.dtype).movedim(0, -1)
    p = case.packed
    with torch.no_grad():
        out = bsr_linear(x, p.values, p.crow_indices, p.col_indices, case.bias, case.out_features,
                         activation=activation, residual=residual)
    bias = None if case.bias is None else case.bias.double()
    ref = F.linear(x.double(), case.masked_weight.double(), bias) + residual.double()
    ref = ref if activation is None else ACTIVATIONS[activation](ref)
    assert_matches_reference(out, ref, spec.dtype, f"{spec.id} M={rows} residual {activation} (seed {SEED})")


def _layer(n_in=70, n_out=90, block=(16, 16), **kw) -> tuple[nn.Linear, SparseLinear]:
    torch.manual_seed(1)
    dense = nn.Linear(n_in, n_out)
    with torch.no_grad():
        dense.weight.mul_(block_mask(n_out, n_in, block, 0.5, torch.Generator().manual_seed(3)))
    return dense, SparseLinear.from_dense(dense, block, **kw)


def test_residual_is_added_as_torch_would():
    """A residual that broadcasts or promotes is added by torch after the op (the kernel adds only exact fits)."""
    dense, layer = _layer(activation="relu")
    x = torch.randn(5, 70)
    with torch.no_grad():
        for r in (torch.randn(90), torch.randn(1, 90), torch.randn(5, 90, dtype=torch.float64)):
            out = layer(x, r)
            ref = F.relu(dense(x) + r)
            assert out.shape == ref.shape and out.dtype == ref.dtype
            assert relative_error(out, ref.double()) < 1e-5
        with pytest.raises(ValueError, match="residual must broadcast with the output's shape"):
            layer(x, torch.randn(5, 89))
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        layer(x, [0.0] * 90)


def test_op_refuses_a_residual_that_does_not_fit():
    """The op itself adds only a residual of the output's shape and dtype (the layers route the rest to torch)."""
    _, layer = _layer()
    x = torch.randn(5, 70)
    p = layer.weight
    with pytest.raises(TypeError, match="residual must have the input's dtype"):
        torch.ops.pysparse.bsr_linear_act(x, p.values, p.crow_indices, p.col_indices, None, 90, None,
                                          torch.randn(5, 90, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"residual must have the output's shape \[5, 90\], got \[6, 90\]"):
        torch.ops.pysparse.bsr_linear_act(x, p.values, p.crow_indices, p.col_indices, None, 90, "relu",
                                          torch.randn(6, 90))
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        bsr_linear(x, p.values, p.crow_indices, p.col_indices, None, 90, residual=1.0)


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_sparse_linear_residual_trains_like_dense(activation):
    """With gradients the layer runs the op, then torch's add and activation: gradients reach the residual too."""
    dense, layer = _layer(trainable=True, activation=activation)
    act = (lambda t: t) if activation is None else ACTIVATIONS[activation]
    x = torch.randn(5, 70, requires_grad=True)
    r = torch.randn(5, 90, requires_grad=True)
    x_ref, r_ref = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    act(dense(x_ref) + r_ref).square().sum().backward()
    layer(x, r).square().sum().backward()
    assert relative_error(x.grad, x_ref.grad.double()) < 1e-5
    assert relative_error(r.grad, r_ref.grad.double()) < 1e-5
    assert relative_error(layer.bias.grad, dense.bias.grad.double()) < 1e-5
    with torch.no_grad():   # inference takes the fused kernel: same result
        assert relative_error(layer(x, r), act(dense(x) + r).double()) < 1e-5


def test_sparse_linear_residual_on_every_device(device):
    """CUDA has no fused epilogue: the layer adds the residual after the op; same result everywhere."""
    dense, layer = _layer(96, 130, (32, 32), activation="relu")
    layer = layer.to(device)
    x, r = torch.randn(70, 96), torch.randn(70, 130)
    with torch.no_grad():
        out = layer(x.to(device), r.to(device))
    assert out.device.type == device.type
    assert relative_error(out.cpu(), F.relu(dense(x) + r).double()) < 1e-5


def test_residual_layer_compiles_without_graph_break():
    _, layer = _layer(96, 64, (32, 32), activation="relu")
    x, r = torch.randn(70, 96), torch.randn(70, 64)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert relative_error(compiled(x, r), layer(x, r).double()) < 1e-6


# ---- convolutions ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("geometry, grad", CONV_PATHS)
@pytest.mark.parametrize("channels_last", [True, False])
def test_sparse_conv_residual_every_path(geometry, grad, activation, channels_last):
    g = dict(geometry)
    c_in, k = g.pop("c_in"), g.pop("k")
    dense = sparse_conv(c_in, 96, k, 6, **g)
    layer = SparseConv2d.from_dense(dense, (32, 32), activation=activation, trainable=grad)
    act = (lambda t: t) if activation is None else ACTIVATIONS[activation]
    x = torch.randn(2, c_in, 11, 13, requires_grad=grad)
    with torch.no_grad():
        shape = dense(x).shape
    r = torch.randn(shape)
    if channels_last:   # what a previous pysparse conv returns: NHWC in memory, read in place
        r = r.contiguous(memory_format=torch.channels_last)
    with torch.set_grad_enabled(grad):
        out = layer(x, r)
        ref = act(dense(x) + r)
    assert out.shape == ref.shape
    assert relative_error(out.detach(), ref.detach().double()) < 1e-5
    if grad:
        out.square().sum().backward()
        assert layer.linear.values.grad is not None and x.grad is not None
    with torch.no_grad():   # an unbatched input takes an unbatched residual
        assert relative_error(layer(x[0], r[0]), act(dense(x[:1]) + r[:1])[0].double()) < 1e-5


def test_sparse_conv_residual_is_added_as_torch_would():
    dense = sparse_conv(64, 96, 3, 7, padding=1)
    layer = SparseConv2d.from_dense(dense, (32, 32), activation="relu")
    x = torch.randn(2, 64, 11, 13)
    with torch.no_grad():
        for r in (torch.randn(1, 96, 1, 1), torch.randn(2, 96, 11, 13, dtype=torch.float64)):
            out, ref = layer(x, r), F.relu(dense(x) + r)
            assert out.shape == ref.shape and out.dtype == ref.dtype
            assert relative_error(out, ref.double()) < 1e-5
        with pytest.raises(ValueError, match="residual must broadcast with the output's shape"):
            layer(x, torch.randn(2, 96, 13, 11))
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        layer(x, 1.0)


def test_bsr_conv2d_op_residual_matches_reference():
    layer = SparseConv2d.from_dense(sparse_conv(64, 80, 3, 8), (16, 16))
    lin = layer.linear
    x = torch.randn(2, 9, 10, 64)
    r = torch.randn(2, 7, 8, 80)
    for act in (None, "relu", "gelu"):
        args = (x, lin.values, lin.crow_indices, lin.col_indices, lin.bias, 80, 3, 1, 1, act, r)
        with torch.no_grad():
            assert relative_error(bsr_conv2d_nhwc(*args), bsr_conv2d_nhwc_reference(*args).double()) < 1e-5
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        bsr_conv2d_nhwc(x, lin.values, lin.crow_indices, lin.col_indices, lin.bias, 80, 3, residual=r[:, :6])
