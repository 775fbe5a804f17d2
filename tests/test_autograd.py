"""Backward of pysparse::bsr_linear (pysparse/ops/bsr_linear_op.py).

Which precision checks what:
* float64 gradcheck: the kernels have no float64, so the *same* setup_context/backward formulas are registered on
  a test-only custom op whose forward (and W^T product) is ``bsr_linear_reference``; gradcheck runs on it in float64.
* float32 gradcheck on the real op ``torch.ops.pysparse.bsr_linear``: the op is linear in each input taken alone,
  so central differences are exact up to rounding and a large step (eps=0.1) keeps the rounding error ~1e-6.
* Gradients of the real op against autograd through the dense masked ``F.linear``: float32 rel. err < 1e-5,
  bf16 / fp16 < 1e-2.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

import pysparse  # noqa: F401  (registers the op and its backward)
from pysparse.formats import BlockSparseWeight
from pysparse.nn import SparseLinear
from pysparse.ops import bsr_linear_op, bsr_linear_reference

# (out_features, in_features, block_size, leading dims of the input, density)
CASES = [
    (29, 37, (8, 16), (2, 3), 0.5),     # neither dimension divisible by the block size
    (48, 40, (16, 8), (5,), 0.3),
    (17, 9, (4, 4), (), 0.6),           # 1-D input
    (40, 24, (8, 8), (3,), 0.0),        # no blocks kept at all
]


def _block_sparse(n, k, block_size, density, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    bh, bw = block_size
    keep = torch.rand(-(-n // bh), -(-k // bw), generator=g) < density
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]
    w = torch.randn(n, k, generator=g) * mask
    return BlockSparseWeight.from_dense(w.to(dtype), block_size=block_size, mask=mask)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# Small cases for gradcheck (it perturbs every input entry): ragged edges, 1-D input, no kept block.
GRADCHECK_CASES = [
    (11, 13, (4, 8), (2,), 0.5),
    (9, 12, (4, 4), (), 0.6),
    (12, 8, (4, 4), (3,), 0.0),
]

_setup_ref, _backward_ref = bsr_linear_op.bsr_linear_autograd(bsr_linear_reference)


@torch.library.custom_op("pysparse_test::bsr_linear_ref", mutates_args=())
def _ref_op(input: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
            bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return bsr_linear_reference(input, values, crow_indices, col_indices, bias, out_features)


torch.library.register_autograd("pysparse_test::bsr_linear_ref", _backward_ref, setup_context=_setup_ref)


@pytest.mark.parametrize("n,k,block_size,lead,density", GRADCHECK_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_float64_formulas(n, k, block_size, lead, density, with_bias):
    w = _block_sparse(n, k, block_size, density, torch.float64)
    x = torch.randn(*lead, k, dtype=torch.float64, requires_grad=True)
    values = w.values.clone().requires_grad_()
    bias = torch.randn(n, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = (x, values, w.crow_indices, w.col_indices, bias, n)
    assert torch.autograd.gradcheck(_ref_op, inputs, fast_mode=True)


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")
@pytest.mark.parametrize("n,k,block_size,lead,density", GRADCHECK_CASES)
def test_gradcheck_float32_real_op(n, k, block_size, lead, density):
    w = _block_sparse(n, k, block_size, density)
    x = torch.randn(*lead, k, requires_grad=True)
    values = w.values.clone().requires_grad_()
    bias = torch.randn(n, requires_grad=True)
    inputs = (x, values, w.crow_indices, w.col_indices, bias, n)
    assert torch.autograd.gradcheck(torch.ops.pysparse.bsr_linear, inputs, eps=0.1, atol=1e-4, rtol=1e-3,
                                    fast_mode=True)


def _dense_grads(w: BlockSparseWeight, x, bias, grad_out):
    """Gradients through the masked dense F.linear: input, dense weight, bias."""
    wd = w.to_dense().detach().requires_grad_()
    xd = x.detach().requires_grad_()
    bd = bias.detach().requires_grad_()
    F.linear(xd, wd, bd).backward(grad_out)
    return xd.grad, wd.grad, bd.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("n,k,block_size,lead,density", CASES[:3])
def test_grads_match_masked_dense(n, k, block_size, lead, density, dtype, tol, device):
    w = _block_sparse(n, k, block_size, density, dtype).to(device)
    x = torch.randn(*lead, 3, k).to(device, dtype).requires_grad_()
    values = w.values.clone().requires_grad_()
    bias = torch.randn(n).to(device, dtype).requires_grad_()
    y = torch.ops.pysparse.bsr_linear(x, values, w.crow_indices, w.col_indices, bias, n)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    # Reference in float64 from the same (rounded) inputs.
    w64 = BlockSparseWeight(w.values.double(), w.crow_indices, w.col_indices, w.shape)
    gx, gw, gb = _dense_grads(w64, x.double(), bias.double(), grad_out.double())
    assert _rel(x.grad, gx) < tol
    assert _rel(bias.grad, gb) < tol
    # Gradient of every kept block = the dense weight gradient on that block; entries of a block that overhang
    # the matrix get 0.
    bh, bw = block_size
    rows = torch.repeat_interleave(torch.arange(len(w.crow_indices) - 1, device=device),
                                   torch.diff(w.crow_indices.long()))
    padded = gw.new_zeros(-(-n // bh) * bh, -(-k // bw) * bw)
    padded[:n, :k] = gw
    blocks = padded.reshape(-(-n // bh), bh, -1, bw).permute(0, 2, 1, 3)[rows, w.col_indices.long()]
    assert values.grad.shape == w.values.shape
    assert _rel(values.grad, blocks) < tol


def test_values_grad_chunks(monkeypatch):
    """The kept-block gradient is built in chunks when the gathered slices exceed the budget: same result."""
    w = _block_sparse(64, 96, (16, 16), 0.6)
    x = torch.randn(7, 96)
    g = torch.randn(7, 64)
    args = (g, x, w.crow_indices, w.col_indices, w.block_size, w.nnz_blocks)
    whole = bsr_linear_op._values_grad(*args)
    monkeypatch.setattr(bsr_linear_op, "_GATHER_BYTES", 7 * 32 * 4 * 3)  # 3 blocks per chunk
    chunked = bsr_linear_op._values_grad(*args)
    assert torch.equal(whole, chunked)


def test_transpose_bsr_is_the_transpose():
    w = _block_sparse(29, 37, (8, 16), 0.5)
    values_t, crow_t, col_t = bsr_linear_op.transpose_bsr(w.values, w.crow_indices, w.col_indices, w.n_block_cols)
    wt = BlockSparseWeight(values_t, crow_t, col_t, (37, 29))   # validates the indices
    assert torch.equal(wt.to_dense(), w.to_dense().t())


def test_only_requested_grads():
    w = _block_sparse(32, 48, (16, 16), 0.5)
    x = torch.randn(4, 48, requires_grad=True)
    y = torch.ops.pysparse.bsr_linear(x, w.values, w.crow_indices, w.col_indices, None, 32)
    y.sum().backward()
    assert x.grad is not None and w.values.grad is None
    values = w.values.clone().requires_grad_()
    x2 = torch.randn(4, 48)
    torch.ops.pysparse.bsr_linear(x2, values, w.crow_indices, w.col_indices, None, 32).sum().backward()
    assert values.grad is not None and x2.grad is None


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_only_bias_wants_grad(activation, with_residual):
    """An inference call without no_grad on a frozen layer (only its bias Parameter wants a gradient): the kernel
    computes the product and torch adds the bias. Same float32 numbers as under no_grad, bias.grad right, and no
    gradient reaches what does not ask for one."""
    w = _block_sparse(29, 37, (16, 16), 0.5)
    layer = SparseLinear(w, torch.randn(29), activation=activation)   # values: a buffer
    x = torch.randn(2, 3, 37)
    residual = torch.randn(2, 3, 29) if with_residual else None
    with torch.no_grad():
        want = layer(x, residual)
    y = layer(x, residual)
    assert y.requires_grad
    # The graph holds torch's add (and epilogue), not the op's Python autograd node: that is the point of the path.
    assert "bsr_linear" not in type(y.grad_fn).__name__
    assert torch.equal(y, want) if activation != "gelu" else _rel(y, want) < 1e-6  # eager GELU vs the kernel's
    grad = torch.randn_like(y)
    y.backward(grad)
    bias = layer.bias.detach().clone().requires_grad_()
    out = F.linear(x, w.to_dense(), bias) + (0 if residual is None else residual)
    out = {None: out, "relu": F.relu(out), "gelu": F.gelu(out)}[activation]
    out.backward(grad)
    assert _rel(layer.bias.grad, bias.grad) < 1e-5
    assert layer.values.grad is None and x.grad is None


def _autograd_kernel_entries(fn) -> int:
    """Calls of torch's Python autograd kernel (torch/_library/autograd.py, what register_autograd installs) while
    fn() runs."""
    seen = []

    def profile(frame, event, _arg):
        if event == "call" and frame.f_code.co_filename.endswith(os.path.join("_library", "autograd.py")):
            seen.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return len(seen)


def test_inference_calls_stay_below_the_autograd_layer():
    """Without gradients the layers and pysparse.ops.gelu call their op below the autograd key: torch's Python
    autograd kernel (~20 us a call, as long as the kernel at batch 1) is not entered. Calling an _act op directly
    under no_grad does enter it: the count can fail."""
    w = _block_sparse(29, 37, (16, 16), 0.5)
    x = torch.randn(3, 37)
    blocks = SparseLinear(w, torch.randn(29), activation="relu")
    dense = torch.randn(24, 37) * (torch.rand(24, 37) < 0.4)
    unstructured = SparseLinear.from_dense(torch.nn.Linear(37, 24), block_size=(1, 1))
    residual = torch.randn(3, 24)
    with torch.no_grad():
        assert _autograd_kernel_entries(lambda: blocks(x)) == 0
        assert _autograd_kernel_entries(lambda: blocks(x, torch.randn(3, 29))) == 0
        assert _autograd_kernel_entries(lambda: unstructured(x, residual)) == 0
        assert _autograd_kernel_entries(lambda: pysparse.ops.gelu.gelu(dense)) == 0
        assert _autograd_kernel_entries(lambda: torch.ops.pysparse.bsr_linear_act.default(
            x, w.values, w.crow_indices, w.col_indices, None, 29, None, None)) > 0
    # A frozen layer called without no_grad (only the bias wants a gradient) takes the same path.
    assert _autograd_kernel_entries(lambda: blocks(x)) == 0


def test_sparse_linear_finetune_step_matches_masked_dense():
    """One SGD step through a trainable SparseLinear = the masked dense step restricted to the kept blocks."""
    torch.manual_seed(0)
    w = _block_sparse(40, 56, (8, 8), 0.4)
    bias = torch.randn(40)
    layer = SparseLinear(w, bias, trainable=True)
    assert isinstance(layer.values, torch.nn.Parameter)
    assert {n for n, _ in layer.named_parameters()} == {"values", "bias"}
    dense = torch.nn.Linear(56, 40)
    with torch.no_grad():
        dense.weight.copy_(w.to_dense())
        dense.bias.copy_(bias)
    x, target = torch.randn(6, 56), torch.randn(6, 40)
    for module in (layer, dense):
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        F.mse_loss(module(x), target).backward()
        opt.step()
    mask = w.to_dense() != 0
    expected = torch.where(mask, dense.weight.detach(), 0.0)
    assert _rel(layer.weight.to_dense(), expected) < 1e-5
    assert _rel(layer.bias.detach(), dense.bias.detach()) < 1e-5
    assert torch.equal(layer.crow_indices, w.crow_indices) and torch.equal(layer.col_indices, w.col_indices)


def test_trainable_state_dict_keeps_parameter():
    w = _block_sparse(32, 32, (8, 8), 0.5)
    layer = SparseLinear(w, trainable=True)
    param = layer.values
    other = SparseLinear(_block_sparse(32, 32, (8, 8), 0.5, seed=1))   # same nnz is not required
    layer.load_state_dict(other.state_dict())
    assert isinstance(layer.values, torch.nn.Parameter)
    assert torch.equal(layer.weight.to_dense(), other.weight.to_dense())
    if other.values.shape == w.values.shape:
        assert layer.values is param   # optimizers keep training the loaded values
