"""SparseConv2d: forward equals the masked dense nn.Conv2d, for the 1x1 direct path and the kxk im2col path."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pysparse.nn.sparse_conv as sparse_conv
from pysparse.formats import BlockSparseWeight
from pysparse.nn import SparseConv2d, SparseLinear, conv_weight_from_matrix, conv_weight_matrix

CONFIGS = [
    dict(in_channels=40, out_channels=50, kernel_size=1),
    dict(in_channels=40, out_channels=50, kernel_size=1, stride=2, bias=False),
    dict(in_channels=40, out_channels=50, kernel_size=1, padding=1),
    dict(in_channels=24, out_channels=33, kernel_size=3, padding=1),
    dict(in_channels=24, out_channels=33, kernel_size=(3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 3)),
    dict(in_channels=24, out_channels=33, kernel_size=3, padding="same", dilation=2, padding_mode="reflect"),
    dict(in_channels=24, out_channels=33, kernel_size=3, padding=1, padding_mode="circular", bias=False),
    dict(in_channels=24, out_channels=33, kernel_size=3, padding="valid", padding_mode="replicate"),
    dict(in_channels=3, out_channels=20, kernel_size=7, stride=2, padding=3),
]


def _block_pruned_conv(cfg, block_size=(16, 8), density=0.4, seed=0, dtype=torch.float32):
    """A conv whose weight keeps a random subset of the (bh, bw) blocks of conv_weight_matrix(weight)."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(**cfg).to(dtype)
    o, i, kh, kw = conv.weight.shape
    bh, bw = block_size
    keep = torch.rand(-(-o // bh), -(-(kh * kw * i) // bw)) < density
    keep[0, 0] = True
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:o, :kh * kw * i]
    with torch.no_grad():
        conv.weight.mul_(conv_weight_from_matrix(mask, conv.weight.shape))
    return conv


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_forward_matches_dense(cfg, device):
    conv = _block_pruned_conv(cfg).to(device)
    sparse = SparseConv2d.from_dense(conv, block_size=(16, 8))
    x = torch.randn(2, cfg["in_channels"], 13, 10, device=device)
    expected = conv(x)
    out = sparse(x)
    assert out.shape == expected.shape
    assert _rel(out, expected) < 1e-5
    # Channels-last input and a non-contiguous view give the same values.
    assert _rel(sparse(x.contiguous(memory_format=torch.channels_last)), expected) < 1e-5
    wide = torch.randn(2, cfg["in_channels"], 13, 20, device=device)
    assert _rel(sparse(wide[..., ::2]), conv(wide[..., ::2])) < 1e-5
    # Unbatched [C, H, W] input, as nn.Conv2d accepts.
    assert _rel(sparse(x[1]), expected[1]) < 1e-5


@pytest.mark.parametrize("chunk_bytes", [2000, 60000])   # row bands of one image / several images per chunk
def test_im2col_chunks(monkeypatch, chunk_bytes):
    conv = _block_pruned_conv(dict(in_channels=8, out_channels=20, kernel_size=3, padding=1))
    sparse = SparseConv2d.from_dense(conv, block_size=(4, 8))
    x = torch.randn(5, 8, 11, 9)
    whole = sparse(x)
    monkeypatch.setattr(sparse_conv, "_IM2COL_CHUNK_BYTES", chunk_bytes)
    chunked = sparse(x)
    assert torch.equal(whole, chunked)
    assert _rel(chunked, conv(x)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype, device):
    cfg = dict(in_channels=24, out_channels=33, kernel_size=3, padding=1)
    conv = _block_pruned_conv(cfg).to(device)
    sparse = SparseConv2d.from_dense(conv, block_size=(16, 8)).to(dtype)
    x = torch.randn(2, 24, 9, 9, device=device).to(dtype)
    # Reference: float64 conv on the same rounded weights and inputs.
    ref_conv = sparse.to_conv2d().double()
    assert torch.equal(ref_conv.weight, conv.weight.to(dtype).double())
    out = sparse(x)
    assert out.dtype == dtype
    assert _rel(out, ref_conv(x.double())) < 1e-2


def test_mask_argument():
    conv = nn.Conv2d(16, 32, 3, padding=1)
    mask = torch.rand(conv.weight.shape) < 0.3
    sparse = SparseConv2d.from_dense(conv, block_size=(8, 8), mask=mask)
    masked = nn.Conv2d(16, 32, 3, padding=1)
    with torch.no_grad():
        masked.weight.copy_(conv.weight * mask)
        masked.bias.copy_(conv.bias)
    x = torch.randn(2, 16, 7, 7)
    assert _rel(sparse(x), masked(x)) < 1e-5


def test_weight_matrix_round_trip():
    w = torch.randn(5, 3, 2, 4)
    mat = conv_weight_matrix(w)
    assert mat.shape == (5, 2 * 4 * 3)
    assert torch.equal(mat[:, (1 * 4 + 2) * 3 + 1], w[:, 1, 1, 2])   # column (i, j, c) = tap (i, j), channel c
    assert torch.equal(conv_weight_from_matrix(mat, w.shape), w)


def test_tap_major_blocks():
    """A block is bh output channels x bw input channels of one kernel tap (when bw divides in_channels)."""
    conv = nn.Conv2d(32, 32, 3, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:16, 16:, 1, 2] = 1.0   # one (16 x 16) channel block at tap (1, 2)
    sparse = SparseConv2d.from_dense(conv, block_size=(16, 16))
    assert sparse.weight.nnz_blocks == 1
    assert torch.equal(conv_weight_matrix(conv.weight), sparse.weight.to_dense())


def test_to_conv2d_and_repr():
    cfg = dict(in_channels=24, out_channels=33, kernel_size=(3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 3))
    conv = _block_pruned_conv(cfg)
    sparse = SparseConv2d.from_dense(conv, block_size=(16, 8))
    dense = sparse.to_conv2d()
    assert torch.equal(dense.weight, conv.weight) and torch.equal(dense.bias, conv.bias)
    for attr in ("stride", "padding", "dilation", "kernel_size", "padding_mode"):
        assert getattr(dense, attr) == getattr(conv, attr)
    text = repr(sparse)
    assert "kernel_size=(3, 2)" in text and "dilation=(2, 3)" in text and "block_size=(16, 8)" in text
    assert 0 < sparse.density < 1


def test_state_dict_round_trip_other_pattern():
    cfg = dict(in_channels=24, out_channels=33, kernel_size=3, padding=1)
    a = SparseConv2d.from_dense(_block_pruned_conv(cfg, seed=1), block_size=(16, 8))
    b = SparseConv2d.from_dense(_block_pruned_conv(cfg, seed=2, density=0.7), block_size=(16, 8))
    assert set(a.state_dict()) == {"linear.values", "linear.crow_indices", "linear.col_indices", "linear.bias"}
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 24, 6, 6)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one_chunk", "image_per_chunk"])
def test_grads_match_masked_dense_conv(device, chunk_bytes, monkeypatch):
    if chunk_bytes is not None:  # im2col in chunks of one image each: the batch split off x, gradients joined
        monkeypatch.setattr(sparse_conv, "_IM2COL_CHUNK_BYTES", chunk_bytes)
    cfg = dict(in_channels=24, out_channels=33, kernel_size=3, stride=2, padding=1)
    conv = _block_pruned_conv(cfg).to(device)
    sparse = SparseConv2d.from_dense(conv, block_size=(16, 8), trainable=True)
    x = torch.randn(3, 24, 9, 9, device=device, requires_grad=True)
    xd = x.detach().clone().requires_grad_()
    g = torch.randn(3, 33, 5, 5, device=device)
    sparse(x).backward(g)
    conv(xd).backward(g)
    assert _rel(x.grad, xd.grad) < 1e-5
    assert _rel(sparse.bias.grad, conv.bias.grad) < 1e-5
    grad_w = BlockSparseWeight.from_dense(conv_weight_matrix(conv.weight.grad), block_size=(16, 8),
                                          mask=sparse.weight.to_dense() != 0)
    assert _rel(sparse.linear.values.grad, grad_w.values) < 1e-5


@pytest.mark.skipif(not sparse_conv.ops.implicit_conv2d_available(),
                    reason="no implicit-im2col conv kernel on this CPU")
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_frozen_conv_without_no_grad_runs_the_implicit_op(monkeypatch, activation, with_residual):
    """A frozen layer called without no_grad (only its bias Parameter wants a gradient) still runs the
    implicit-im2col op, torch adding the bias: the no_grad numbers, and the dense conv's bias gradient."""
    conv = _block_pruned_conv(dict(in_channels=24, out_channels=33, kernel_size=3, padding=1))
    sparse = SparseConv2d.from_dense(conv, block_size=(16, 8), activation=activation)
    x = torch.randn(2, 24, 9, 7)
    residual = torch.randn(2, 33, 9, 7) if with_residual else None
    with torch.no_grad():
        want = sparse(x, residual)
    calls = []
    op = sparse_conv.ops.bsr_conv2d_nhwc
    monkeypatch.setattr(sparse_conv.ops, "bsr_conv2d_nhwc", lambda *a: calls.append(a[4]) or op(*a))
    y = sparse(x, residual)
    assert len(calls) == 1 and calls[0] is None  # the op ran, without the bias
    assert torch.equal(y, want)
    g = torch.randn_like(y)
    y.backward(g)
    out = conv(x) + (0 if residual is None else residual)
    (out if activation is None else torch.relu(out)).backward(g)
    assert _rel(sparse.bias.grad, conv.bias.grad) < 1e-5
    assert sparse.linear.values.grad is None


def test_compile_matches_eager():
    torch._dynamo.reset()
    conv = _block_pruned_conv(dict(in_channels=24, out_channels=33, kernel_size=3, stride=2, padding=1))
    sparse = SparseConv2d.from_dense(conv, block_size=(16, 8))
    x = torch.randn(2, 24, 9, 9)
    compiled = torch.compile(sparse, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), sparse(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="groups"):
        SparseConv2d.from_dense(nn.Conv2d(32, 32, 3, groups=2))
    with pytest.raises(ValueError, match="groups"):
        SparseConv2d.from_dense(nn.Conv2d(32, 32, 3, groups=32))
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        SparseConv2d.from_dense(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="mask"):
        SparseConv2d.from_dense(nn.Conv2d(8, 8, 3), mask=torch.ones(8, 72, dtype=torch.bool))
    sparse = SparseConv2d.from_dense(nn.Conv2d(8, 16, 3), block_size=(8, 8))
    with pytest.raises(ValueError, match="in_channels=8"):
        sparse(torch.randn(1, 7, 5, 5))
    with pytest.raises(ValueError, match="in_channels=8"):
        sparse(torch.randn(8, 5))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        sparse(torch.randn(1, 8, 2, 5))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        sparse([1.0])
    weight = BlockSparseWeight.from_dense(torch.randn(16, 72), block_size=(8, 8))
    with pytest.raises(ValueError, match="in_channels \\* kh \\* kw = 45"):
        SparseConv2d(weight, in_channels=5, kernel_size=3)
    with pytest.raises(ValueError, match="padding"):
        SparseConv2d(weight, in_channels=8, kernel_size=3, padding=-1)
    with pytest.raises(ValueError, match="padding_mode"):
        SparseConv2d(weight, in_channels=8, kernel_size=3, padding_mode="mirror")
    with pytest.raises(ValueError, match="stride"):
        SparseConv2d(weight, in_channels=8, kernel_size=3, padding="same", stride=2)
    with pytest.raises(TypeError, match="weight must be a BlockSparseWeight"):
        SparseConv2d(torch.randn(16, 72), in_channels=8, kernel_size=3)


def test_inner_linear_is_sparse_linear():
    sparse = SparseConv2d.from_dense(nn.Conv2d(8, 16, 1), block_size=(8, 8))
    assert isinstance(sparse.linear, SparseLinear)
    x = torch.randn(3, 8, 4, 4)
    # The 1x1 path is the linear layer on the NHWC view, no im2col.
    expected = sparse.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.equal(sparse(x), expected)
