"""The backward of the fused epilogue (``bsr_linear_act`` / ``unstructured_linear_act``): training keeps ReLU, ReLU6
and the residual add inside the kernel's stores, and the gradients equal those of the dense masked layer.

* float64 gradcheck of the formulas (``epilogue_autograd`` over the reference linear's own pair, on a test op);
* the real ops against autograd through dense masked ``F.linear`` + torch's activation, every activation, with and
  without a residual, 16-bit included;
* opcheck of the ops with gradients, a compiled training step, the GELU refusal and the graph the layers build.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pysparse  # noqa: F401  (registers the ops and their backward)
from conftest import relative_error
from pysparse.bench.sweep import block_mask
from pysparse.formats import BlockSparseWeight, UnstructuredSparseWeight
from pysparse.nn import SparseLinear
from pysparse.ops import bsr_linear_op, bsr_linear_reference
from pysparse.ops.layer_support import epilogue_autograd, torch_epilogue

_setup_ref, _backward_ref = epilogue_autograd(*bsr_linear_op.bsr_linear_autograd(bsr_linear_reference))


@torch.library.custom_op("pysparse_test::bsr_linear_act_ref", mutates_args=())
def _act_ref_op(input: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                bias: torch.Tensor | None, out_features: int, activation: str | None,
                residual: torch.Tensor | None) -> torch.Tensor:
    y = bsr_linear_reference(input, values, crow_indices, col_indices, bias, out_features)
    return torch_epilogue(y, activation, residual).clone()


torch.library.register_autograd("pysparse_test::bsr_linear_act_ref", _backward_ref, setup_context=_setup_ref)


def _masked(n, k, block, density, seed, dtype=torch.float32):
    """A dense nn.Linear with the blocks of ``block_mask`` kept, and that mask."""
    torch.manual_seed(seed)
    dense = nn.Linear(k, n).to(dtype)
    mask = block_mask(n, k, block, density, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        dense.weight.mul_(mask.to(dtype))
    return dense, mask


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("with_residual", [True, False])
def test_gradcheck_float64_formulas(activation, with_residual):
    dense, mask = _masked(11, 13, (4, 8), 0.6, 1, torch.float64)
    w = BlockSparseWeight.from_dense(dense.weight.detach(), block_size=(4, 8), mask=mask)
    # Pre-activations spread over about [-9, 9]: some below 0 and some above 6 (both kinks' flat sides are run).
    x = (torch.randn(3, 13, dtype=torch.float64) * 3).requires_grad_()
    values = w.values.clone().requires_grad_()
    bias = dense.bias.detach().clone().requires_grad_()
    residual = (torch.randn(3, 11, dtype=torch.float64) * 3).requires_grad_() if with_residual else None
    inputs = (x, values, w.crow_indices, w.col_indices, bias, 11, activation, residual)
    assert torch.autograd.gradcheck(_act_ref_op, inputs, eps=1e-6, atol=1e-5)


def _pack_like(layer, dense_grad, mask):
    """``dense_grad`` at the entries the layer keeps, in the order of its ``values``."""
    if isinstance(layer.weight, UnstructuredSparseWeight):
        return UnstructuredSparseWeight.from_dense(dense_grad, mask=layer.weight.to_dense() != 0).values
    return BlockSparseWeight.from_dense(dense_grad, block_size=layer.block_size, mask=mask).values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "relu", "relu6", "gelu"])
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (16, 1), (1, 1)])
def test_training_matches_dense_masked(activation, block, dtype):
    dense, mask = _masked(90, 70, block, 0.5, 2)
    layer = SparseLinear.from_dense(dense, block, trainable=True, activation=activation).to(dtype)
    x = (torch.randn(2, 5, 70) * 2).to(dtype).requires_grad_()
    residual = (torch.randn(2, 5, 90) * 2).to(dtype).requires_grad_()
    g = torch.randn(2, 5, 90).to(dtype)
    out = layer(x, residual)
    out.backward(g)

    weight = dense.weight.detach().double().requires_grad_()
    x_ref, r_ref = x.detach().double().requires_grad_(), residual.detach().double().requires_grad_()
    bias = dense.bias.detach().to(dtype).double().requires_grad_()
    with torch.no_grad():
        weight.copy_(weight.to(dtype).double())
    pre = F.linear(x_ref, weight, bias) + r_ref
    if dtype != torch.float32:  # where the activation has a kink its side is decided on the rounded output
        pre = pre.to(dtype).double()
    ref = torch_epilogue(pre, activation, None)
    ref.backward(g.double())

    tol = 1e-5 if dtype == torch.float32 else 3e-2
    what = f"{block} {activation} {dtype}"
    assert relative_error(out, ref.detach()) < tol, what
    assert relative_error(x.grad, x_ref.grad) < tol, what
    assert relative_error(residual.grad, r_ref.grad) < tol, what
    assert relative_error(layer.bias.grad, bias.grad) < tol, what
    assert relative_error(layer.values.grad, _pack_like(layer, weight.grad, mask)) < tol, what
    # ReLU and ReLU6 (and the residual add) stay in the kernel's stores; GELU runs after the op, in pysparse's
    # pass for float32 (pysparse::gelu, its backward from the saved pre-activation). The unstructured kernel is
    # float32 only: other dtypes take the dense reference and torch's epilogue.
    fused = activation != "gelu" and (block != (1, 1) or dtype == torch.float32)
    assert ("linear_act" in out.grad_fn.name()) == fused, f"{what}: {out.grad_fn.name()}"
    assert ("pysparse_gelu" in out.grad_fn.name()) == (activation == "gelu" and dtype == torch.float32), what


def test_relu_gradient_is_zero_exactly_where_the_output_is():
    """At a pre-activation of exactly 0 torch's ReLU passes no gradient (and ReLU6 none at 0 or 6): the same."""
    eye = nn.Linear(32, 32)
    with torch.no_grad():
        eye.weight.copy_(torch.eye(32))
        eye.bias.zero_()
    for activation, fn in (("relu", F.relu), ("relu6", F.relu6)):
        layer = SparseLinear.from_dense(eye, (16, 16), trainable=True, activation=activation)
        x = torch.tensor([-2.0, 0.0, 1.0, 6.0, 7.0, 3.0, -0.0, 5.9] * 4).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        layer(x).sum().backward()
        fn(x_ref).sum().backward()
        assert torch.equal(x.grad, x_ref.grad), activation


def test_fused_gelu_with_gradients_is_refused_clearly():
    """The raw op cannot differentiate GELU from its output; the wrappers never ask it to."""
    dense, _ = _masked(32, 32, (16, 16), 0.5, 3)
    layer = SparseLinear.from_dense(dense, (16, 16))
    x = torch.randn(4, 32, requires_grad=True)
    y = torch.ops.pysparse.bsr_linear_act(x, layer.values, layer.crow_indices, layer.col_indices, layer.bias, 32,
                                          "gelu", None)   # the forward runs (tracing sets contexts up, too)
    with pytest.raises(NotImplementedError, match="needs the pre-activation"):
        y.sum().backward()


@pytest.mark.parametrize("block", [(16, 16), (1, 1)])
def test_opcheck_with_gradients(block):
    dense, _ = _masked(45, 37, block, 0.5, 4)
    layer = SparseLinear.from_dense(dense, block, trainable=True)
    x = torch.randn(3, 37, requires_grad=True)
    r = torch.randn(3, 45, requires_grad=True)
    if block == (1, 1):
        op = torch.ops.pysparse.unstructured_linear_act.default
        parts = (layer.values, layer.columns, layer.segment_ptr)
    else:
        op = torch.ops.pysparse.bsr_linear_act.default
        parts = (layer.values, layer.crow_indices, layer.col_indices)
    for activation, residual in (("relu", r), ("relu6", None), (None, r)):
        torch.library.opcheck(op, (x, *parts, layer.bias, 45, activation, residual))


@pytest.mark.parametrize("block", [(32, 32), (1, 1)])
def test_compiled_training_step_has_no_graph_break(block):
    torch._dynamo.reset()
    dense, _ = _masked(64, 96, block, 0.5, 5)
    layer = SparseLinear.from_dense(dense, block, trainable=True, activation="relu")
    x = torch.randn(3, 7, 96, requires_grad=True)
    r = torch.randn(3, 7, 64, requires_grad=True)

    def step(m, inp, res):
        return (m(inp, res) ** 2).sum()

    step(layer, x, r).backward()
    leaves = (x, r, layer.values, layer.bias)
    eager = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    torch.compile(step, backend="aot_eager", fullgraph=True)(layer, x, r).backward()
    for got, want in zip((t.grad for t in leaves), eager):
        assert relative_error(got, want.double()) < 1e-6


def test_output_written_in_place_before_backward_is_detected():
    """The backward reads the saved output: writing it in place is caught by autograd, not silently wrong."""
    dense, _ = _masked(32, 32, (16, 16), 0.5, 6)
    layer = SparseLinear.from_dense(dense, (16, 16), trainable=True, activation="relu")
    y = layer(torch.randn(4, 32, requires_grad=True))
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
