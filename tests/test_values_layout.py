"""SparseLinear stores ``values`` block-transposed (each block column-major) where the CPU kernels read blocks that way
at every batch size (AVX2 path, bh a multiple of 16, every dtype; AVX-512, float32, bh a multiple of 32), row-major
elsewhere. The op reads that memory in place, so no re-layout happens per call and no second copy can go stale.
These tests change the weight every way a user can (in place, through ``.data``, through numpy, with fused and
foreach optimizers, by loading, by moving between dtypes) and check each next call, at large and small batch,
against the dense reference; and the raw op against every layout a caller can pass."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pysparse
from pysparse import ops
from pysparse.nn import SparseConv2d, SparseLinear

TRANSPOSED_HERE = ops.cpu_reads_transposed(32, 16)  # False on the generic path: every layout is row-major there


def _linear(n=200, k=150, block=(32, 16), seed=0, trainable=False) -> tuple[SparseLinear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Linear(k, n)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(n, k, generator=gen))
    bh, bw = block
    keep = torch.rand(-(-n // bh), -(-k // bw), generator=gen) < 0.4
    mask = keep.repeat_interleave(bh, 0)[:n].repeat_interleave(bw, 1)[:, :k]
    return SparseLinear.from_dense(dense, block, mask=mask, trainable=trainable), torch.randn(96, k, generator=gen)


def _check(layer: SparseLinear, x: torch.Tensor, what: str) -> None:
    with torch.no_grad():
        dense = layer.weight.to_dense().double()
        for rows in (x, x[:1], x[:7]):  # the large-M path and the small-M paths
            want = F.linear(rows.double(), dense, layer.bias.double()).float()
            torch.testing.assert_close(layer(rows), want, rtol=1e-5, atol=1e-4, msg=what)


def test_layout_follows_the_kernel():
    layer, x = _linear()
    assert ops.is_block_transposed(layer.values) == TRANSPOSED_HERE
    assert layer.values.shape == (layer.values.shape[0], 32, 16)
    _check(layer, x, "as built")
    # Blocks whose height is not a multiple of 16 stay row-major (the kernel reads them so at small M).
    narrow, x8 = _linear(block=(8, 8), seed=1)
    assert narrow.values.is_contiguous()
    _check(narrow, x8, "8x8 blocks")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layout_follows_dtype_and_back(dtype):
    layer, x = _linear(seed=2)
    half = copy.deepcopy(layer).to(dtype)
    # On AVX2 the 16-bit kernels read the same layout as float32 (the broadcast kernel widens the weights as it loads
    # them); on AVX-512 they read row-major blocks: the layout follows the dtype.
    transposed_16 = ops.cpu_reads_transposed(32, 16, dtype)
    assert transposed_16 == (TRANSPOSED_HERE and ops.available_backends()["cpu"] == "avx2")
    assert ops.is_block_transposed(half.values) == transposed_16
    assert torch.equal(half.values, layer.values.to(dtype))
    with torch.no_grad():
        for rows in (x, x[:1], x[:7]):  # the large-M path and the small-M paths
            want = F.linear(rows.to(dtype).double(), half.weight.to_dense().double(), half.bias.double())
            torch.testing.assert_close(half(rows.to(dtype)).double(), want, rtol=2e-2, atol=2e-1)
    back = half.float()
    assert ops.is_block_transposed(back.values) == TRANSPOSED_HERE
    _check(back, x, f"{dtype} and back")


def test_reads_transposed_rejects_other_dtypes():
    with pytest.raises(TypeError, match="dtype must be torch.float32, torch.bfloat16 or torch.float16, got"):
        ops.cpu_reads_transposed(32, 32, torch.int8)


def test_every_kind_of_write_is_seen():
    layer, x = _linear(seed=3)
    with torch.no_grad():
        layer.values.mul_(-2.0)
    _check(layer, x, "in place")
    layer.values.data.mul_(0.5)  # .data has its own version counter: a cached copy would miss this one
    _check(layer, x, "through .data")
    layer.values.numpy()[0] = 0.25  # no torch op at all
    _check(layer, x, "through numpy")
    with torch.no_grad():
        layer.values[1].zero_()
    _check(layer, x, "through a view")


def test_load_state_dict_and_checkpoints_keep_the_layout(tmp_path):
    layer, x = _linear(seed=4)
    other, _ = _linear(seed=5)  # another pattern: other buffer sizes
    layer.load_state_dict(other.state_dict())
    assert ops.is_block_transposed(layer.values) == TRANSPOSED_HERE
    _check(layer, x, "after load_state_dict")
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh, _ = _linear(seed=6)
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh.values, layer.values, rtol=0, atol=0)
    model = nn.Sequential(nn.Linear(150, 150), nn.ReLU(), nn.Linear(150, 200))
    sparse = pysparse.sparsify(model, block_size=(32, 16), min_sparsity=0.0)
    pysparse.save(sparse, tmp_path / "m.safetensors")  # safetensors stores contiguous tensors
    restored = pysparse.load(nn.Sequential(nn.Linear(150, 150), nn.ReLU(), nn.Linear(150, 200)),
                             tmp_path / "m.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(restored(x), sparse(x), rtol=0, atol=0)


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.1),
                                      lambda p: torch.optim.Adam(p, lr=0.1, foreach=True),
                                      lambda p: torch.optim.AdamW(p, lr=0.1, fused=True)],
                         ids=["sgd", "adam_foreach", "adamw_fused"])
def test_training_matches_row_major_training(make_opt):
    # Fused AdamW on the CPU writes the weights without bumping their version counter. With the layout, the kernel
    # reads what it wrote; and the steps must equal those of a row-major twin (grads follow the weight's strides).
    layer, x = _linear(seed=7, trainable=True)
    twin = copy.deepcopy(layer)
    twin.values.data = twin.values.data.contiguous()
    opts = [make_opt(m.parameters()) for m in (layer, twin)]
    for step in range(3):
        for m, opt in zip((layer, twin), opts):
            m.train()
            loss = m(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.testing.assert_close(layer.values, twin.values, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        layer.eval()
        _check(layer, x, f"eval after step {step}")
    assert ops.is_block_transposed(layer.values) == TRANSPOSED_HERE


@pytest.mark.parametrize("m", [1, 3, 7, 64, 100])
def test_raw_op_takes_every_layout(m):
    layer, x = _linear(seed=8)
    row_major = layer.values.contiguous()
    want = F.linear(x[:m].double(), layer.weight.to_dense().double(), layer.bias.double()).float()
    nan = torch.full_like(row_major, float("nan"))  # between the kept numbers: read by mistake, it shows
    layouts = {
        "row-major": row_major,
        "block-transposed": row_major.transpose(1, 2).contiguous().transpose(1, 2),
        "stride 2 along bw": torch.stack([row_major, nan], 3).reshape(-1, 32, 32)[:, :, ::2],
        "every other block": torch.stack([row_major, nan], 1).reshape(-1, 32, 16)[::2],
        "every other block, block-transposed": torch.stack([row_major, nan], 1).transpose(2, 3).contiguous()
        .reshape(-1, 16, 32)[::2].transpose(1, 2),
    }
    for name, values in layouts.items():
        torch.testing.assert_close(values, row_major, rtol=0, atol=0)
        y = ops.bsr_linear(x[:m], values, layer.crow_indices, layer.col_indices, layer.bias, layer.out_features)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4, msg=name)


def test_implicit_conv_reads_the_layout_and_sees_writes():
    gen = torch.Generator().manual_seed(9)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    sparse = SparseConv2d.from_dense(conv, (16, 16)).eval()
    assert ops.is_block_transposed(sparse.linear.values) == ops.cpu_reads_transposed(16, 16)
    x = torch.randn(2, 16, 9, 7, generator=gen)
    for what in ("as built", "after a write through .data"):
        with torch.no_grad():
            dense_w = sparse.weight.to_dense().reshape(32, 3, 3, 16).permute(0, 3, 1, 2)
            torch.testing.assert_close(sparse(x), F.conv2d(x, dense_w, sparse.bias, padding=1), rtol=1e-4,
                                       atol=1e-4, msg=what)
        sparse.linear.values.data.mul_(-0.5)
