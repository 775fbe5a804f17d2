"""Padding rows in the backward of the sparse layers (pysparse/ops/gradient_rows.py): ``pysparse::nonzero_rows``
finds the rows of grad_output the backward must compute, and the bsr and unstructured backward kernels run on those
rows only (grad_input's other rows written as zeros). Checked: the op on every dtype it takes (+-0, NaN, inf,
denormals, rows that are not a multiple of its 64-element blocks, strided input, rows of x and values holding inf or
NaN); gradients with zero rows equal to float64 autograd through the dense masked layer, with the skip really taken;
NaN / inf in a zero-gradient row of x or in the weight propagate as in the dense product.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import generator_for
from pysparse.nn import SparseLinear
from pysparse.ops import gradient_rows

OP = torch.ops.pysparse.nonzero_rows.default


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_nonzero_rows(dtype):
    gen = generator_for(f"nonzero-rows-{dtype}")
    t = torch.randn(12, 130, generator=gen).to(dtype)
    t[1] = 0
    t[2] = -0.0
    t[3] = 0
    t[3, 129] = float("nan")            # in the last, partial block
    t[4] = 0
    t[4, 64] = float("-inf")
    t[5] = 0
    t[5, 0] = torch.finfo(dtype).tiny   # the smallest normal: not zero
    t[6, :] = 0
    t[6, 1::2] = -0.0
    want = torch.tensor([True, False, False, True, True, True, False] + [True] * 5)
    assert torch.equal(OP(t), want)
    assert torch.equal(OP(t[:, :70]), torch.tensor([True, False, False, False, True, True, False] + [True] * 5))
    assert torch.equal(OP(t.t().contiguous().t()), want)   # not contiguous: copied
    assert OP(torch.empty(0, 5, dtype=dtype)).shape == (0,)
    assert torch.equal(OP(torch.empty(3, 0, dtype=dtype)), torch.zeros(3, dtype=torch.bool))
    # A zero row is kept where its row of input holds inf / NaN; every row where values do.
    x = torch.randn(12, 9, generator=gen).to(dtype)
    x[1, 8] = float("inf")
    x[2, 0] = float("nan")
    x[6, 4] = 3.0
    with_x = want.clone()
    with_x[1] = with_x[2] = True
    assert torch.equal(OP(t, x), with_x)
    w = torch.randn(5, 2, 3, generator=gen).to(dtype)
    assert torch.equal(OP(t, x, w), with_x)
    w[4, 1, 2] = float("-inf")
    assert bool(OP(t, None, w).all())


def test_nonzero_rows_bad_input():
    with pytest.raises(ValueError, match="grad must be 2-D, got 1-D"):
        OP(torch.zeros(5))
    with pytest.raises(TypeError, match="grad must be float32, float64, bfloat16 or float16, got Int"):
        OP(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"input must be 2-D with grad's 2 rows, got shape \[3, 4\]"):
        OP(torch.zeros(2, 3), torch.zeros(3, 4))
    with pytest.raises(TypeError, match="values must have grad's dtype Float, got Double"):
        OP(torch.zeros(2, 3), None, torch.zeros(4, dtype=torch.float64))


def _linear(n, k, seed):
    torch.manual_seed(seed)
    return nn.Linear(k, n)


def _mask(n, k, block_size, gen):
    bh, bw = block_size
    keep = torch.rand(-(-n // bh), -(-k // bw), generator=gen) < 0.4
    return keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]


@pytest.fixture
def skips(monkeypatch):
    """Records, per backward, whether rows were skipped."""
    taken = []
    real = gradient_rows.rows_with_gradient

    def recording(*args):
        rows = real(*args)
        taken.append(rows is not None)
        return rows

    monkeypatch.setattr(gradient_rows, "rows_with_gradient", recording)  # what gather_gradient_rows calls
    return taken


def _dense_reference(layer, linear_mask, x, grad):
    wd = layer.weight.to_dense().detach().double().requires_grad_()
    xd = x.detach().double().requires_grad_()
    bd = layer.bias.detach().double().requires_grad_()
    F.linear(xd, wd, bd).backward(grad.double())
    return xd.grad, wd.grad * linear_mask, bd.grad


def _values_as_dense(layer):
    """The gradient of layer.values placed in the dense [N, K] matrix (through the weight's own to_dense)."""
    weight = layer.weight
    saved = layer.values.data
    try:
        layer.values.data = layer.values.grad
        return layer.weight.to_dense().double()
    finally:
        layer.values.data = saved
        del weight


@pytest.mark.parametrize("block_size", [(16, 1), (32, 32), (5, 3), (1, 1)], ids=str)
@pytest.mark.parametrize("lead", [(4, 37), (150,)], ids=str)
def test_zero_rows_are_skipped_and_gradients_exact(block_size, lead, skips):
    gen = generator_for(f"grad-rows-{block_size}-{lead}")
    n, k = 70, 45
    mask = _mask(n, k, block_size, gen)
    layer = SparseLinear.from_dense(_linear(n, k, 0), block_size=block_size, mask=mask, trainable=True)
    x = torch.randn(*lead, k, generator=gen, requires_grad=True)
    y = layer(x)
    grad = torch.randn(y.shape, generator=gen)
    flat = grad.view(-1, n)
    flat[flat.shape[0] // 3:] = 0        # padding: two thirds of the rows
    flat[1] = 0
    y.backward(grad)
    assert skips == [True]
    ref_x, ref_w, ref_b = _dense_reference(layer, mask, x, grad)
    assert x.grad.shape == x.shape
    torch.testing.assert_close(x.grad.double(), ref_x, rtol=1e-5, atol=1e-5)
    assert bool((x.grad.view(-1, k)[flat.shape[0] // 3:] == 0).all())
    torch.testing.assert_close(layer.bias.grad.double(), ref_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_values_as_dense(layer), ref_w, rtol=1e-5, atol=1e-5)


def test_few_zero_rows_run_every_row(skips):
    gen = generator_for("grad-rows-few")
    layer = SparseLinear.from_dense(_linear(40, 32, 1), block_size=(16, 1), mask=_mask(40, 32, (16, 1), gen),
                                    trainable=True)
    x = torch.randn(64, 32, generator=gen, requires_grad=True)
    grad = torch.randn(64, 40, generator=gen)
    grad[:7] = 0                          # under 1/8 of the rows
    layer(x).backward(grad)
    assert skips == [False]


@pytest.mark.parametrize("block_size", [(16, 1), (1, 1)], ids=str)
def test_non_finite_in_a_skipped_row_is_propagated(block_size, skips):
    """A NaN in x where grad_output is zero: that row is computed, and grad_values is NaN where the dense product's
    is; an inf in the weight: every row is computed, grad_input is NaN on the zero rows as the dense product's."""
    gen = generator_for(f"grad-rows-nan-{block_size}")
    n, k = 48, 40
    mask = _mask(n, k, block_size, gen)
    mask[:16, 3] = True                   # a kept block in column 3, where x gets its NaN
    layer = SparseLinear.from_dense(_linear(n, k, 2), block_size=block_size, mask=mask, trainable=True)
    x = torch.randn(60, k, generator=gen)
    x[50, 3] = float("nan")
    x.requires_grad_()
    grad = torch.randn(60, n, generator=gen)
    grad[30:] = 0
    layer(x).backward(grad)
    assert skips == [True]
    _, ref_w, _ = _dense_reference(layer, mask, x, grad)
    got = _values_as_dense(layer)
    assert torch.equal(torch.isnan(got), torch.isnan(ref_w) & mask)
    assert bool(torch.isnan(got[:, 3][mask[:, 3]]).all())
    with torch.no_grad():
        layer.values.view(-1)[0] = float("inf")
    x2 = x.detach().nan_to_num().requires_grad_()
    layer(x2).backward(grad)
    assert skips == [True, False]
    assert bool(torch.isnan(x2.grad[30:]).any())     # 0 x inf, as the dense product gives


def test_under_compile_every_row_runs():
    """torch.compile traces the backward with fake tensors: no data-dependent sizes, the full product."""
    gen = generator_for("grad-rows-compile")
    layer = SparseLinear.from_dense(_linear(40, 32, 3), block_size=(16, 1), mask=_mask(40, 32, (16, 1), gen),
                                    trainable=True)
    x = torch.randn(64, 32, generator=gen)
    grad = torch.randn(64, 40, generator=gen)
    grad[20:] = 0

    def step(x):
        return (layer(x) * grad).sum()

    xs = [x.clone().requires_grad_() for _ in range(2)]
    step(xs[0]).backward()
    grads_eager = (xs[0].grad, layer.values.grad.clone())
    layer.zero_grad()
    torch._dynamo.reset()
    torch.compile(step, fullgraph=True)(xs[1]).backward()
    torch.testing.assert_close(xs[1].grad, grads_eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.values.grad, grads_eager[1], rtol=1e-5, atol=1e-6)


def test_rows_to_full():
    gen = generator_for("rows-to-full")
    part = torch.randn(3, 5, generator=gen)
    rows = torch.tensor([0, 4, 6])
    out = torch.ops.pysparse.rows_to_full(part, rows, 8)
    want = torch.zeros(8, 5)
    want[rows] = part
    assert torch.equal(out, want)
    assert torch.ops.pysparse.rows_to_full(part[:0], rows[:0], 4).eq(0).all()
    for bad, match in ((torch.tensor([0, 4, 8]), r"rows must be increasing indices in \[0, 8\), got 8 at 2"),
                       (torch.tensor([0, 4, 4]), r"got 4 at 2"), (torch.tensor([-1, 4, 6]), r"got -1 at 0")):
        with pytest.raises(ValueError, match=match):
            torch.ops.pysparse.rows_to_full(part, bad, 8)
    with pytest.raises(TypeError, match="rows must be int64, got Int"):
        torch.ops.pysparse.rows_to_full(part, rows.int(), 8)
    with pytest.raises(ValueError, match="rows must be 1-D with part's 3 rows"):
        torch.ops.pysparse.rows_to_full(part, rows[:2], 8)
    with pytest.raises(ValueError, match="m must be at least part's rows 3, got 2"):
        torch.ops.pysparse.rows_to_full(part, rows, 2)
