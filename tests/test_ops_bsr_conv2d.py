"""pysparse::bsr_conv2d_nhwc (implicit im2col on the CPU) and SparseConv2d's use of it.

Every case is checked against F.conv2d with the densified weight on fresh random inputs: odd spatial sizes, block
rows that overhang out_channels (padding rows filled with NaN must not leak), strides, dilations, empty and dense
weights. The op allocates its output, so the layer tests poison nothing; the op's own result is compared whole.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pysparse import ops
from pysparse.bench.sweep import block_mask
from pysparse.formats import BlockSparseWeight
from pysparse.nn import SparseConv2d, conv_weight_from_matrix, conv_weight_matrix

from conftest import generator_for

pytestmark = pytest.mark.skipif(not ops.implicit_conv2d_available(),
                                reason="the implicit conv needs the AVX2 kernel path")

# (batch, H, W, C, O, kernel, stride, dilation, pad, block, density)
CASES = [
    (2, 9, 11, 16, 40, 3, 1, 1, 1, (16, 16), 0.5),
    (1, 13, 7, 48, 24, 3, 2, 1, 1, (8, 24), 0.4),
    (3, 8, 8, 32, 64, 1, 2, 1, 0, (32, 32), 0.6),
    (2, 12, 10, 64, 72, 3, 1, 2, 2, (32, 32), 0.3),
    (1, 10, 9, 32, 32, (3, 1), (1, 2), 1, (1, 0), (16, 32), 1.0),
    (2, 7, 7, 16, 16, 5, 1, 1, 2, (16, 8), 0.0),
    (1, 6, 6, 128, 256, 3, 1, 1, 1, (64, 64), 0.2),
]


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _case(idx):
    b, h, w, c, o, k, s, d, p, block, density = CASES[idx]
    g = generator_for(f"bsr_conv2d-{idx}")
    kh, kw = _pair(k)
    ph, pw = _pair(p)
    weight = torch.randn(o, c, kh, kw, generator=g)
    matrix = conv_weight_matrix(weight)
    mask = block_mask(o, matrix.shape[1], block, 1 - density, g)
    packed = BlockSparseWeight.from_dense(matrix * mask, block, mask=mask)
    values = packed.values.clone()
    # Rows past out_channels are padding: poison them, the kernel must never store them.
    rows = torch.arange(values.shape[1]).view(1, -1, 1)
    row_block = torch.repeat_interleave(torch.arange(packed.n_block_rows), packed.crow_indices.diff()).view(-1, 1, 1)
    values = torch.where(row_block * block[0] + rows >= o, torch.tensor(float("nan")), values)
    x = torch.randn(b, h + 2 * ph, w + 2 * pw, c, generator=g)
    bias = torch.randn(o, generator=g)
    return x, values, packed, bias, (kh, kw), _pair(s), _pair(d), weight * conv_weight_from_matrix(mask, weight.shape)


@pytest.mark.parametrize("idx", range(len(CASES)))
def test_matches_dense_conv(idx):
    x, values, packed, bias, k, s, d, dense_w = _case(idx)
    y = ops.bsr_conv2d_nhwc(x, values, packed.crow_indices, packed.col_indices, bias, dense_w.shape[0], k, s, d)
    ref = F.conv2d(x.permute(0, 3, 1, 2), dense_w, bias, s, 0, d).permute(0, 2, 3, 1)
    assert y.shape == ref.shape
    assert torch.isfinite(y).all()
    err = (y - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, f"case {CASES[idx]}: rel err {err:.2e}"
    ref2 = ops.bsr_conv2d_nhwc_reference(x, packed.values, packed.crow_indices, packed.col_indices, bias,
                                         dense_w.shape[0], k, s, d)
    assert ((ref2 - ref).abs().max() / ref.abs().max()) < 1e-5


def test_opcheck():
    x, values, packed, bias, k, s, d, dense_w = _case(0)
    torch.library.opcheck(torch.ops.pysparse.bsr_conv2d_nhwc.default,
                          (x, packed.values, packed.crow_indices, packed.col_indices, bias, dense_w.shape[0],
                           list(k), list(s), list(d)))


def _layer(idx):
    b, h, w, c, o, k, s, d, p, block, density = CASES[idx]
    g = generator_for(f"bsr_conv2d-layer-{idx}")
    conv = torch.nn.Conv2d(c, o, k, stride=s, padding=p, dilation=d)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        mask = block_mask(o, conv_weight_matrix(conv.weight).shape[1], block, 1 - density, g)
        conv.weight.mul_(conv_weight_from_matrix(mask, conv.weight.shape))
    x = torch.randn(b, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    return conv, SparseConv2d.from_dense(conv, block), x


@pytest.mark.parametrize("idx", [0, 1, 2, 3])
def test_layer_takes_implicit_path_in_inference(idx, monkeypatch):
    conv, sparse, x = _layer(idx)

    def no_im2col(*args):
        raise AssertionError("inference on the CPU must not copy patches")

    monkeypatch.setattr(sparse, "_im2col_gemm", no_im2col)
    with torch.no_grad():
        y, ref = sparse(x), conv(x)
    assert ((y - ref).abs().max() / ref.abs().max()) < 1e-5


def test_layer_with_grad_uses_bsr_linear_and_backprops():
    conv, sparse, x = _layer(0)
    x.requires_grad_(True)
    y = sparse(x)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    conv(x2).square().sum().backward()
    assert ((x.grad - x2.grad).abs().max() / x2.grad.abs().max()) < 1e-4


def test_compiled_layer_matches_eager():
    conv, sparse, x = _layer(1)
    compiled = torch.compile(sparse, fullgraph=True)
    with torch.no_grad():
        assert ((compiled(x) - sparse(x)).abs().max() / sparse(x).abs().max()) < 1e-6


@pytest.mark.parametrize("bad, match", [
    (dict(x_dtype=torch.float64), "float32"),
    (dict(block=(16, 20)), "divide the input channels"),
    (dict(block=(12, 16)), "multiple of 8"),
    (dict(kernel=9), "smaller than the dilated kernel"),
    (dict(crow_shift=1), "crow_indices"),
    (dict(stride=0), "stride"),
])
def test_bad_input(bad, match):
    g = generator_for("bsr_conv2d-bad")
    block = bad.get("block", (16, 16))
    k = bad.get("kernel", 3)
    c, o = 48, 32
    matrix = torch.randn(o, 9 * c, generator=g)
    packed = BlockSparseWeight.from_dense(matrix, block)
    x = torch.randn(1, 8, 8, c, generator=g).to(bad.get("x_dtype", torch.float32))
    crow = packed.crow_indices + bad.get("crow_shift", 0)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.bsr_conv2d_nhwc(x, packed.values, crow, packed.col_indices, None, o, k, bad.get("stride", 1), 1)
