"""Channel-sparse format, ops and layers against the dense masked reference (float64), on CPU and, when there is a
device, on CUDA (those cases skip cleanly without one)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pysparse import ops
from pysparse.formats import ChannelSparseWeight
from pysparse.nn import ChannelSparseConv2d, ChannelSparseLinear

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
HAS_CUDA = ops.available_backends()["cuda"]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA,
                                                                                   reason="needs a CUDA device")])]


def rel_err(y, ref):
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def random_index(n, keep, gen):
    return torch.randperm(n, generator=gen)[:keep].sort().values


def poison_cache(shape, dtype, device):
    """On CUDA, free a NaN tensor of the output's size so the op's output reuses that memory."""
    if device == "cuda":
        torch.full(shape, float("nan"), dtype=dtype, device=device)  # freed at once, its memory stays cached


# ---- format --------------------------------------------------------------------------------------------------
def test_from_dense_round_trip_and_index_forms():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(13, 7, 3, 3, generator=gen)
    out_idx, in_idx = [1, 4, 12], torch.tensor([0, 6])
    csw = ChannelSparseWeight.from_dense(w, out_idx, in_idx)
    assert csw.values.shape == (3, 2, 3, 3) and csw.out_index.dtype == torch.int32
    mask = torch.zeros_like(w)
    mask[torch.tensor(out_idx)[:, None], in_idx[None, :]] = 1
    torch.testing.assert_close(csw.to_dense(), w * mask, rtol=0, atol=0)
    keep_out = torch.zeros(13, dtype=torch.bool)
    keep_out[out_idx] = True
    same = ChannelSparseWeight.from_dense(w, keep_out, in_idx.to(torch.int32))
    assert torch.equal(same.values, csw.values) and abs(csw.density - 6 / 91) < 1e-12
    # None keeps the rows / columns that hold a nonzero
    auto = ChannelSparseWeight.from_dense(w * mask)
    assert auto.out_index.tolist() == out_idx and auto.in_index.tolist() == [0, 6]


@pytest.mark.parametrize("kwargs,err,match", [
    ({"out_index": [3, 1]}, ValueError, "strictly increasing"),
    ({"out_index": [0, 0]}, ValueError, "strictly increasing"),
    ({"in_index": [0, 9]}, ValueError, r"\[0, 5\)"),
    ({"in_index": [-1]}, ValueError, r"\[0, 5\)"),
    ({"in_index": torch.tensor([0.0])}, TypeError, "int32, int64 or bool"),
    ({"out_index": torch.ones(3, dtype=torch.bool)}, ValueError, "6 entries"),
    ({"out_index": [[0]]}, TypeError, "list of ints"),
])
def test_from_dense_rejects_bad_indices(kwargs, err, match):
    with pytest.raises(err, match=match):
        ChannelSparseWeight.from_dense(torch.randn(6, 5), **kwargs)


def test_constructor_validates():
    csw = ChannelSparseWeight.from_dense(torch.randn(6, 5), [0, 2], [1, 3, 4])
    with pytest.raises(ValueError, match="values must have shape"):
        ChannelSparseWeight(csw.values[:, :2], csw.out_index, csw.in_index, (6, 5))
    with pytest.raises(TypeError, match="out_index"):
        ChannelSparseWeight(csw.values, csw.out_index.long(), csw.in_index, (6, 5))
    with pytest.raises(ValueError, match="strictly increasing"):
        ChannelSparseWeight(csw.values, csw.out_index.flip(0), csw.in_index, (6, 5))


# ---- ops -----------------------------------------------------------------------------------------------------
LINEAR_CASES = [
    # (M, N, K, kept_out, kept_in)
    (1, 33, 17, 16, 9), (7, 64, 48, 32, 24), (130, 96, 200, 37, 101), (5, 10, 10, 10, 10), (3, 12, 9, 0, 4),
    (4, 12, 9, 5, 0), (0, 8, 8, 4, 4), (65, 257, 129, 128, 64),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=[f"M{c[0]}_N{c[1]}_K{c[2]}_o{c[3]}_i{c[4]}" for c in LINEAR_CASES])
def test_linear_matches_masked_dense(case, dtype, device):
    m, n, k, ko, ki = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    w = torch.randn(n, k, generator=gen)
    csw = ChannelSparseWeight.from_dense(w, random_index(n, ko, gen), random_index(k, ki, gen))
    x = torch.randn(m, k, generator=gen)
    for bias in (None, torch.randn(n, generator=gen)):
        ref = F.linear(x.double(), csw.to_dense().double(), None if bias is None else bias.double())
        poison_cache((m, n), dtype, device)
        y = ops.channel_sparse_linear(x.to(device, dtype), csw.values.to(device, dtype), csw.out_index.to(device),
                                      csw.in_index.to(device), None if bias is None else bias.to(device, dtype), n)
        assert y.shape == (m, n) and y.dtype == dtype and y.device.type == device
        assert torch.isfinite(y).all()
        if m:
            assert rel_err(y, ref) < TOL[dtype], rel_err(y, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_batched_and_strided_input(device):
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(40, 30, generator=gen), torch.randn(40, generator=gen)
    csw = ChannelSparseWeight.from_dense(w, random_index(40, 20, gen), random_index(30, 11, gen))
    x = torch.randn(2, 5, 60, generator=gen)[..., ::2]  # non-contiguous last dim
    y = ops.channel_sparse_linear(x.to(device), csw.values.to(device), csw.out_index.to(device),
                                  csw.in_index.to(device), b.to(device), 40)
    ref = F.linear(x.double(), csw.to_dense().double(), b.double())
    assert y.shape == (2, 5, 40) and rel_err(y, ref) < 1e-5
    ref_fn = ops.channel_sparse_linear_reference(x, csw.values, csw.out_index, csw.in_index, b, 40)
    assert rel_err(ref_fn, ref) < 1e-6


CONV_CASES = [
    # (B, C, H, W, N, kernel, stride, padding, dilation, kept_out, kept_in)
    (1, 16, 9, 9, 24, 3, 1, 1, 1, 12, 8), (2, 7, 11, 6, 5, 1, 1, 0, 1, 3, 4), (2, 32, 10, 10, 48, 3, 2, 1, 1, 24, 16),
    (1, 9, 13, 13, 10, 5, 2, 2, 2, 4, 9), (3, 8, 6, 6, 8, 3, 1, 0, 1, 0, 3), (1, 12, 7, 7, 6, 3, 1, 1, 1, 6, 0),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CONV_CASES, ids=[f"c{i}" for i in range(len(CONV_CASES))])
def test_conv2d_matches_masked_dense(case, dtype, device):
    b_, c, h, w_, n, k, s, p, d, ko, ki = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    w = torch.randn(n, c, k, k, generator=gen)
    csw = ChannelSparseWeight.from_dense(w, random_index(n, ko, gen), random_index(c, ki, gen))
    x = torch.randn(b_, c, h, w_, generator=gen)
    for bias in (None, torch.randn(n, generator=gen)):
        ref = F.conv2d(x.double(), csw.to_dense().double(), None if bias is None else bias.double(), s, p, d)
        y = ops.channel_sparse_conv2d(x.to(device, dtype), csw.values.to(device, dtype), csw.out_index.to(device),
                                      csw.in_index.to(device), None if bias is None else bias.to(device, dtype), n,
                                      s, p, d)
        assert y.shape == ref.shape and y.dtype == dtype and torch.isfinite(y).all()
        assert rel_err(y, ref) < TOL[dtype], rel_err(y, ref)


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    csw = ChannelSparseWeight.from_dense(torch.randn(20, 12, generator=gen), random_index(20, 9, gen),
                                         random_index(12, 5, gen))
    torch.library.opcheck(torch.ops.pysparse.channel_sparse_linear,
                          (torch.randn(3, 12, generator=gen), csw.values, csw.out_index, csw.in_index,
                           torch.randn(20, generator=gen), 20))
    conv = ChannelSparseWeight.from_dense(torch.randn(6, 4, 3, 3, generator=gen), [1, 4], [0, 2, 3])
    torch.library.opcheck(torch.ops.pysparse.channel_sparse_conv2d,
                          (torch.randn(2, 4, 7, 7, generator=gen), conv.values, conv.out_index, conv.in_index, None,
                           6, [1, 1], [1, 1], [1, 1]))


def test_op_rejects_bad_arguments():
    csw = ChannelSparseWeight.from_dense(torch.randn(8, 6), [0, 3], [1, 2, 5])
    x = torch.randn(2, 6)
    args = (csw.values, csw.out_index, csw.in_index, None, 8)
    with pytest.raises(ValueError, match="out_index"):
        ops.channel_sparse_linear(x, csw.values, torch.tensor([0, 8]), csw.in_index, None, 8)
    with pytest.raises(ValueError, match="strictly increasing"):
        ops.channel_sparse_linear(x, csw.values, csw.out_index, torch.tensor([2, 1, 5]), None, 8)
    with pytest.raises(TypeError, match="int32 or int64"):
        ops.channel_sparse_linear(x, csw.values, csw.out_index.float(), csw.in_index, None, 8)
    with pytest.raises(TypeError, match="input must be float32, bfloat16 or float16, got Double"):
        ops.channel_sparse_linear(x.double(), *args)
    with pytest.raises(TypeError, match="values must have the input's dtype"):
        ops.channel_sparse_linear(x, csw.values.half(), *args[1:])
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.channel_sparse_linear(x, csw.values, csw.out_index, csw.in_index, torch.randn(2), 8)
    with pytest.raises(ValueError, match="values must have shape"):
        ops.channel_sparse_linear(x, csw.values[:, :2], csw.out_index, csw.in_index, None, 8)
    # the C++ kernel re-checks what the wrapper was told to skip: no out-of-bounds read, a clear error
    with pytest.raises(ValueError, match="in_index"):
        ops.channel_sparse_linear(x, csw.values, csw.out_index, torch.tensor([1, 2, 60]), None, 8,
                                  check_indices=False)
    with pytest.raises(ValueError, match="out_index"):
        ops.channel_sparse_conv2d(torch.randn(1, 6, 5, 5), torch.randn(2, 3, 3, 3), torch.tensor([3, 1]),
                                  torch.tensor([1, 2, 5]), None, 8, check_indices=False)


# ---- layers --------------------------------------------------------------------------------------------------
def _masked_linear(lin, out_idx, in_idx):
    ref = nn.Linear(lin.in_features, lin.out_features)
    with torch.no_grad():
        mask = torch.zeros_like(lin.weight)
        mask[torch.as_tensor(out_idx)[:, None], torch.as_tensor(in_idx)[None, :]] = 1
        ref.weight.copy_(lin.weight * mask)
        ref.bias.copy_(lin.bias)
    return ref


def test_linear_layer_equals_masked_dense_and_round_trips():
    torch.manual_seed(3)
    lin = nn.Linear(50, 70)
    out_idx, in_idx = sorted(torch.randperm(70)[:35].tolist()), sorted(torch.randperm(50)[:25].tolist())
    layer = ChannelSparseLinear.from_dense(lin, out_idx, in_idx)
    ref = _masked_linear(lin, out_idx, in_idx)
    x = torch.randn(4, 9, 50)
    assert rel_err(layer(x), ref(x)) < 1e-5
    assert rel_err(layer.to_linear()(x), ref(x)) < 1e-6
    # state_dict of another kept set loads into a layer of the same dense shape
    other = ChannelSparseLinear.from_dense(nn.Linear(50, 70), [0, 1, 2], [5])
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), layer(x))
    half = layer.to(torch.bfloat16)
    assert half.values.dtype == torch.bfloat16 and half.out_index.dtype == torch.int32
    assert rel_err(half(x.bfloat16()), ref(x)) < 1e-2
    bad = layer.state_dict()
    bad["out_index"] = torch.tensor([5, 3] + list(range(6, 39)), dtype=torch.int32)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        ChannelSparseLinear.from_dense(nn.Linear(50, 70), out_idx, in_idx).load_state_dict(bad)


def test_conv_layer_equals_masked_dense():
    torch.manual_seed(4)
    conv = nn.Conv2d(24, 40, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight[::2] = 0          # zeroed output channels (as channel pruning leaves them)
        conv.weight[:, 1::3] = 0      # zeroed input channels
    layer = ChannelSparseConv2d.from_dense(conv)
    assert layer.out_index.numel() == 20 and layer.in_index.numel() == 16
    x = torch.randn(2, 24, 15, 15)
    assert rel_err(layer(x), conv(x)) < 1e-5
    assert rel_err(layer.to_conv2d()(x), conv(x)) < 1e-6
    with pytest.raises(ValueError, match="groups=1"):
        ChannelSparseConv2d.from_dense(nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(ValueError, match="explicit padding"):
        ChannelSparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding="same"))


@pytest.mark.slow
def test_layers_under_torch_compile():
    torch.manual_seed(5)
    lin = ChannelSparseLinear.from_dense(nn.Linear(32, 48), list(range(0, 48, 2)), list(range(0, 32, 3)))
    conv = ChannelSparseConv2d.from_dense(nn.Conv2d(8, 12, 3, padding=1), [0, 5, 7], [1, 2])
    x, xc = torch.randn(3, 32), torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(torch.compile(lin, fullgraph=True)(x), lin(x))
    torch.testing.assert_close(torch.compile(conv, fullgraph=True)(xc), conv(xc))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_masked_dense(device):
    gen = torch.Generator().manual_seed(6)
    # linear
    w, b = torch.randn(30, 20, generator=gen), torch.randn(30, generator=gen)
    csw = ChannelSparseWeight.from_dense(w, random_index(30, 13, gen), random_index(20, 9, gen))
    x = torch.randn(2, 5, 20, generator=gen)
    mask = (csw.to_dense() != 0).double()
    wd = (csw.to_dense().double() * mask).requires_grad_()
    xd, bd = x.double().requires_grad_(), b.double().requires_grad_()
    gout = torch.randn(2, 5, 30, generator=gen)
    (F.linear(xd, wd * mask, bd) * gout.double()).sum().backward()
    xs = x.to(device).requires_grad_()
    vs = csw.values.to(device).requires_grad_()
    bs = b.to(device).requires_grad_()
    y = ops.channel_sparse_linear(xs, vs, csw.out_index.to(device), csw.in_index.to(device), bs, 30)
    (y * gout.to(device)).sum().backward()
    assert rel_err(xs.grad, xd.grad) < 1e-5 and rel_err(bs.grad, bd.grad) < 1e-5
    kept = wd.grad.index_select(0, csw.out_index.long()).index_select(1, csw.in_index.long())
    assert rel_err(vs.grad, kept) < 1e-5
    # conv
    w, b = torch.randn(12, 8, 3, 3, generator=gen), torch.randn(12, generator=gen)
    csw = ChannelSparseWeight.from_dense(w, random_index(12, 5, gen), random_index(8, 3, gen))
    x = torch.randn(2, 8, 7, 7, generator=gen)
    mask = (csw.to_dense() != 0).double()
    wd = csw.to_dense().double().requires_grad_()
    xd, bd = x.double().requires_grad_(), b.double().requires_grad_()
    gout = torch.randn(2, 12, 4, 4, generator=gen)
    (F.conv2d(xd, wd * mask, bd, 2, 1) * gout.double()).sum().backward()
    xs, vs, bs = (t.to(device).requires_grad_() for t in (x, csw.values, b))
    y = ops.channel_sparse_conv2d(xs, vs, csw.out_index.to(device), csw.in_index.to(device), bs, 12, 2, 1)
    (y * gout.to(device)).sum().backward()
    assert rel_err(xs.grad, xd.grad) < 1e-5 and rel_err(bs.grad, bd.grad) < 1e-5
    kept = wd.grad.index_select(0, csw.out_index.long()).index_select(1, csw.in_index.long())
    assert rel_err(vs.grad, kept) < 1e-5
