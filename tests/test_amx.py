"""The AMX path ("avx512amx": bfloat16 blocks on tdpbf16ps tiles) against the dense masked reference: the block
shapes it takes (bh, bw multiples of 16) and those it hands back to the AVX-512 kernels, ragged token counts (the
32-token groups' zero-padded tail), N past the last block row (NaN padding that must not leak), empty rows, all-zero
and dense weights, strided inputs, bias, residual and every activation, NaN-poisoned outputs, several thread counts
and concurrent callers. Skipped where the CPU (or the OS) has no AMX."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import concurrent_call_failures
from pysparse import ops
from pysparse.ops import ACTIVATIONS, bsr_linear, bsr_linear_reference

pytestmark = pytest.mark.skipif("avx512amx" not in ops.cpu_paths(), reason="no AMX on this CPU")


def _bsr(n, k, bh, bw, density, gen, empty_rows=True):
    """bfloat16 BSR parts of a random weight; NaN in the padding rows past n (never to reach y)."""
    n_br, n_bc = -(-n // bh), -(-k // bw)
    keep = torch.rand(n_br, n_bc, generator=gen) < density
    if empty_rows and 0.0 < density < 1.0:
        keep[1::3] = False
    crow = torch.zeros(n_br + 1, dtype=torch.int32)
    crow[1:] = keep.sum(1).cumsum(0)
    col = keep.nonzero()[:, 1].to(torch.int32)
    values = torch.randn(int(keep.sum()), bh, bw, generator=gen)
    rows = torch.repeat_interleave(torch.arange(n_br), keep.sum(1))
    values[(rows[:, None] * bh + torch.arange(bh)) >= n] = float("nan")
    return values.to(torch.bfloat16), crow, col


def _run(x, values, crow, col, bias, n, activation=None, residual=None):
    poison = torch.full((*x.shape[:-1], n), float("nan"), dtype=x.dtype)  # memory the op's output may reuse
    del poison
    with torch.no_grad():
        return bsr_linear(x, values, crow, col, bias, n, activation=activation, residual=residual)


def _check(y, ref, what):
    assert torch.isfinite(y).all(), f"{what}: non-finite output"
    err = (y.double() - ref).abs().max().item() if y.numel() else 0.0
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1e-30)
    assert err / scale < 1e-2, f"{what}: relative error {err / scale:.3g}"


BLOCKS = [(16, 16), (32, 32), (16, 32), (32, 16), (48, 64), (64, 32), (16, 48)]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("m", [8, 17, 32, 33, 47, 64, 100, 257])
def test_matches_reference(block, m):
    bh, bw = block
    gen = torch.Generator().manual_seed(m * 100 + bh + bw)
    k, n = 3 * bw + (bw if m % 2 else 0), 4 * bh + (5 if m % 3 else 0)  # N past the last block row on 2 of 3
    for density in (0.0, 0.3, 1.0):
        values, crow, col = _bsr(n, k, bh, bw, density, gen)
        strided = m % 2 == 1
        x = torch.randn(m, k + 3 if strided else k, generator=gen).to(torch.bfloat16)
        x = x[:, 1:k + 1] if strided else x
        bias = torch.randn(n, generator=gen).to(torch.bfloat16) if density != 0.3 or m % 2 else None
        ref = bsr_linear_reference(x.double(), values.double(), crow, col, None if bias is None else bias.double(), n)
        with ops.force_cpu_path("avx512amx"):
            y = _run(x, values, crow, col, bias, n)
        _check(y, ref, f"{bh}x{bw} M={m} K={k} N={n} density={density} strided={strided}")


@pytest.mark.parametrize("activation", [None, "relu", "relu6", "gelu"])
def test_epilogue_matches_reference(activation):
    gen = torch.Generator().manual_seed(7)
    m, k, n = 77, 192, 150
    values, crow, col = _bsr(n, k, 32, 32, 0.5, gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    residual = torch.randn(m, n, generator=gen).to(torch.bfloat16)
    ref = bsr_linear_reference(x.double(), values.double(), crow, col, bias.double(), n) + residual.double()
    ref = ref if activation is None else ACTIVATIONS[activation](ref)
    with ops.force_cpu_path("avx512amx"):
        y = _run(x, values, crow, col, bias, n, activation=activation, residual=residual)
    _check(y, ref, f"activation={activation} with residual")


def test_agrees_with_the_avx512_path_and_falls_back_where_it_does_not_apply():
    """Blocks AMX does not take (bw not dividing K, narrow blocks) and few tokens run the AVX-512 kernels; every
    case agrees with the AVX-512 path within bfloat16 rounding of float32 sums."""
    gen = torch.Generator().manual_seed(3)
    for (m, k, n, bh, bw) in [(64, 100, 96, 32, 32), (64, 96, 64, 8, 8), (64, 96, 64, 16, 1), (5, 96, 64, 32, 32),
                              (7, 96, 64, 32, 32), (31, 96, 64, 32, 32), (512, 384, 1536, 32, 32)]:
        values, crow, col = _bsr(n, k, bh, bw, 0.4, gen)
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        ref = bsr_linear_reference(x.double(), values.double(), crow, col, None, n)
        outs = {}
        for path in ("avx512", "avx512amx"):
            with ops.force_cpu_path(path):
                outs[path] = _run(x, values, crow, col, None, n)
            _check(outs[path], ref, f"{path} M={m} {bh}x{bw} K={k}")
        scale = ref.abs().max().item()
        assert (outs["avx512"].double() - outs["avx512amx"].double()).abs().max().item() <= 2e-2 * scale


def test_thread_counts_and_concurrent_callers():
    gen = torch.Generator().manual_seed(5)
    values, crow, col = _bsr(256, 192, 32, 32, 0.5, gen)
    inputs = [torch.randn(m, 192, generator=gen).to(torch.bfloat16) for m in (32, 40, 77, 130, 300)]
    refs = [bsr_linear_reference(x.double(), values.double(), crow, col, None, 256) for x in inputs]
    previous = torch.get_num_threads()
    try:
        with ops.force_cpu_path("avx512amx"):
            for threads in (1, 3):
                torch.set_num_threads(threads)
                for x, ref in zip(inputs, refs):
                    _check(_run(x, values, crow, col, None, 256), ref, f"threads={threads} M={x.shape[0]}")
            torch.set_num_threads(previous)

            def call(x):
                with torch.no_grad():
                    return bsr_linear(x, values, crow, col, None, 256)

            errors = concurrent_call_failures(call, inputs, refs, 1e-2)
            assert not errors, f"concurrent callers disagreed with the reference: inputs {errors}"
    finally:
        torch.set_num_threads(previous)


def test_sparse_linear_in_bfloat16_trains_and_infers_on_amx():
    """A bfloat16 SparseLinear on the AMX path: forward equals the masked dense layer, and its gradients (the float32
    backward kernels) match the masked dense layer's."""
    from pysparse.nn import SparseLinear

    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 96).to(torch.bfloat16)
    with torch.no_grad():
        keep = (torch.rand(3, 4) < 0.5).repeat_interleave(32, 0).repeat_interleave(32, 1)
        dense.weight.mul_(keep)
    with ops.force_cpu_path("avx512amx"):
        layer = SparseLinear.from_dense(dense, (32, 32), trainable=True)
        x = torch.randn(64, 128, dtype=torch.bfloat16, requires_grad=True)
        y = layer(x)
        ref = F.linear(x.double(), dense.weight.double(), dense.bias.double())
        _check(y.detach(), ref.detach(), "SparseLinear forward")
        y.float().square().sum().backward()
    x_ref = x.detach().double().requires_grad_()
    F.linear(x_ref, dense.weight.double(), dense.bias.double()).square().sum().backward()
    assert (x.grad.double() - x_ref.grad).abs().max() <= 3e-2 * x_ref.grad.abs().max()


def _dense(values, crow, col, n, k):
    return bsr_linear_reference(torch.eye(k, dtype=torch.float64), values.double(), crow, col, None, n).t()


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("m", [0, 1, 31, 32, 77])
@pytest.mark.parametrize("layout", ["row_major", "block_transposed"])
def test_backward_matches_reference(block, m, layout):
    """grad_input and grad_values on AMX tiles (blocks dividing the layer), against float64 autograd of the dense
    masked layer on the same bfloat16 operands."""
    bh, bw = block
    gen = torch.Generator().manual_seed(m * 10 + bh + bw)
    k, n = 3 * bw, 4 * bh
    values, crow, col = _bsr(n, k, bh, bw, 0.5, gen)
    if layout == "block_transposed":
        values = values.transpose(1, 2).contiguous().transpose(1, 2)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).requires_grad_()
    vals = values.clone().requires_grad_()
    grad_y = torch.randn(m, n, generator=gen).to(torch.bfloat16)
    with ops.force_cpu_path("avx512amx"):
        bsr_linear(x, vals, crow, col, None, n).backward(grad_y)
    assert vals.grad.dtype == torch.bfloat16 and vals.grad.stride() == vals.stride()
    weight = _dense(values, crow, col, n, k)
    ref_gx = grad_y.double() @ weight
    dense_gw = grad_y.double().t() @ x.detach().double()
    rows = torch.repeat_interleave(torch.arange(len(crow) - 1), (crow[1:] - crow[:-1]).long())
    ref_gv = torch.stack([dense_gw[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] for r, c in zip(rows.tolist(),
                                                                                             col.tolist())])
    what = f"{bh}x{bw} M={m} {layout}"
    if m:
        _check(x.grad, ref_gx, f"{what} grad_input")
        _check(vals.grad, ref_gv, f"{what} grad_values")
    else:
        assert x.grad.shape == (0, k) and not vals.grad.any(), what


def test_grad_values_over_several_token_chunks():
    """Many tokens on a wide layer: grad_values lays the tokens out in chunks (about 2 MiB of layouts each) and
    carries each block's float32 sums from chunk to chunk."""
    gen = torch.Generator().manual_seed(13)
    m, k, n = 700, 1024, 1536  # x transposed, grad_y paired: chunks of 384 tokens, 384 + 316
    values, crow, col = _bsr(n, k, 32, 32, 0.05, gen, empty_rows=False)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    grad_y = torch.randn(m, n, generator=gen).to(torch.bfloat16)
    vals = values.clone().requires_grad_()
    with ops.force_cpu_path("avx512amx"):
        bsr_linear(x, vals, crow, col, None, n).backward(grad_y)
    dense_gw = grad_y.double().t() @ x.double()
    rows = torch.repeat_interleave(torch.arange(len(crow) - 1), (crow[1:] - crow[:-1]).long())
    ref = torch.stack([dense_gw[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] for r, c in zip(rows.tolist(), col.tolist())])
    _check(vals.grad, ref, "grad_values over token chunks")


def test_backward_outside_the_tiles_widens_and_stays_right():
    """Blocks that overhang N (or narrow ones) take the float32 kernels on widened copies, on the AMX path too."""
    gen = torch.Generator().manual_seed(11)
    for (bh, bw, n, k) in [(32, 32, 70, 96), (8, 8, 64, 64)]:
        values, crow, col = _bsr(n, k, bh, bw, 0.5, gen)
        values = torch.nan_to_num(values)
        x = torch.randn(40, k, generator=gen).to(torch.bfloat16).requires_grad_()
        grad_y = torch.randn(40, n, generator=gen).to(torch.bfloat16)
        with ops.force_cpu_path("avx512amx"):
            bsr_linear(x, values, crow, col, None, n).backward(grad_y)
        _check(x.grad, grad_y.double() @ _dense(values, crow, col, n, k), f"{bh}x{bw} N={n} grad_input")
