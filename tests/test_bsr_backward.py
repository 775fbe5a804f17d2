"""The CPU backward kernels of bsr_linear (``pysparse::bsr_linear_grad_input``, ``bsr_linear_grad_values``,
``bsr_column_index``; pysparse/ops/bsr_linear_grad.py) and the autograd that calls them on the CPU (float32; 16-bit
through widened copies).

Gradients of trainable SparseLinear layers (both layouts of ``values``) against autograd through the masked dense
``F.linear`` in float64; ``opcheck`` on the ops; bad input; the column-index cache; torch.compile of a step.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pysparse
from pysparse.formats import BlockSparseWeight
from pysparse.nn import SparseLinear
from pysparse.ops import bsr_linear_grad, bsr_linear_op, is_block_transposed

# (out_features, in_features, block_size, leading dims of the input, density)
CASES = [
    (45, 37, (8, 8), (2, 3), 0.5),        # ragged on both edges
    (41, 67, (32, 32), (29,), 0.6),       # blocks overhanging both edges, a token tail
    (50, 70, (16, 16), (33,), 0.5),
    (23, 50, (3, 5), (7,), 0.7),          # odd blocks: masked vectors only
    (64, 64, (32, 32), (4, 5), 1.0),      # dense
    (40, 48, (16, 16), (6,), 0.0),        # no block kept
    (96, 80, (32, 32), (300,), 0.5),      # more tokens than one chunk
    (40, 100, (8, 48), (), 0.6),          # 1-D input, wide blocks
    (50, 40, (16, 1), (3, 15), 0.3),      # column vectors (their own kernels), ragged last block row
    (70, 23, (32, 1), (300,), 0.5),       # column vectors of two vectors' rows, more tokens than one chunk
]
# grad_x over 4 MiB: written with streaming stores where the path has them (rows of 1003 floats: aligned and unaligned
# vectors alike; 1024: all aligned).
LARGE_CASES = [
    (70, 1003, (32, 32), (1100,), 0.5),
    (48, 1024, (16, 16), (1030,), 0.5),
]


def _layer(n, k, block_size, density, seed=0) -> SparseLinear:
    g = torch.Generator().manual_seed(seed)
    bh, bw = block_size
    keep = torch.rand(-(-n // bh), -(-k // bw), generator=g) < density
    if density < 1.0:
        keep[1::3] = False       # empty block rows
        keep[:, 2::4] = False    # empty block columns
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]
    linear = nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g))
    return SparseLinear.from_dense(linear, block_size=block_size, mask=mask, trainable=True)


def _set_layout(layer: SparseLinear, transposed: bool) -> None:
    v = layer.values.detach()
    layer.values.data = v.transpose(1, 2).contiguous().transpose(1, 2) if transposed else v.contiguous()
    assert is_block_transposed(layer.values) == (transposed and v.shape[0] > 0 and min(v.shape[1:]) > 1)


def _rel(a, b):
    assert a.shape == b.shape
    if a.numel() == 0:
        return 0.0
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _kept_blocks(dense_grad: torch.Tensor, weight: BlockSparseWeight) -> torch.Tensor:
    """[nnz, bh, bw]: the dense weight gradient on each kept block, 0 over the padding."""
    n, k = weight.shape
    bh, bw = weight.block_size
    rows = torch.repeat_interleave(torch.arange(len(weight.crow_indices) - 1),
                                   torch.diff(weight.crow_indices.long()))
    padded = dense_grad.new_zeros(-(-n // bh) * bh, -(-k // bw) * bw)
    padded[:n, :k] = dense_grad
    return padded.reshape(-(-n // bh), bh, -1, bw).permute(0, 2, 1, 3)[rows, weight.col_indices.long()]


@pytest.fixture
def no_torch_glue(monkeypatch):
    """CPU gradients must run on the kernels: the torch-glue backward raises if it is reached."""
    def refuse(*args, **kwargs):
        raise AssertionError("the torch-glue backward ran where the CPU kernels apply")
    monkeypatch.setattr(bsr_linear_op, "transpose_bsr", refuse)
    monkeypatch.setattr(bsr_linear_op, "_values_grad", refuse)


@pytest.mark.parametrize("transposed", [False, True], ids=["row_major", "block_transposed"])
@pytest.mark.parametrize("n,k,block_size,lead,density", CASES)
def test_grads_match_masked_dense_float64(n, k, block_size, lead, density, transposed, no_torch_glue):
    layer = _layer(n, k, block_size, density)
    _set_layout(layer, transposed)
    x = torch.randn(*lead, k, requires_grad=True)
    y = layer(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)

    weight = layer.weight
    wd = weight.to_dense().detach().double().requires_grad_()
    xd = x.detach().double().requires_grad_()
    bd = layer.bias.detach().double().requires_grad_()
    F.linear(xd, wd, bd).backward(grad_out.double())
    assert _rel(x.grad, xd.grad) < 1e-5
    assert _rel(layer.bias.grad, bd.grad) < 1e-5
    assert layer.values.grad.shape == layer.values.shape
    # Written in the values' own layout: AccumulateGrad keeps it, the optimizer reads matching strides.
    assert layer.values.grad.stride() == layer.values.stride()
    want = _kept_blocks(wd.grad, weight)
    assert _rel(layer.values.grad, want) < 1e-5


@pytest.mark.parametrize("n,k,block_size,lead,density", LARGE_CASES)
def test_large_grad_input_on_every_path(n, k, block_size, lead, density, no_torch_glue):
    layer = _layer(n, k, block_size, density)
    x = torch.randn(*lead, k)
    grad_out = torch.randn(*lead, n)
    want = (grad_out.double() @ layer.weight.to_dense().double())
    for isa in pysparse.ops.cpu_paths():
        with pysparse.ops.force_cpu_path(isa):
            for transposed in (False, True):
                _set_layout(layer, transposed)
                xg = x.clone().requires_grad_()
                layer(xg).backward(grad_out)
                assert _rel(xg.grad, want) < 1e-5, (isa, transposed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True], ids=["row_major", "block_transposed"])
@pytest.mark.parametrize("n,k,block_size,lead,density", [CASES[i] for i in (0, 1, 6, 8)])
def test_16bit_grads_run_the_kernels_widened(n, k, block_size, lead, density, transposed, dtype, no_torch_glue):
    """bfloat16 / float16 gradients come from the float32 kernels on widened copies, rounded back once: in the
    parameter's dtype and layout, within 16-bit rounding of float64."""
    layer = _layer(n, k, block_size, density).to(dtype)
    _set_layout(layer, transposed)
    x = torch.randn(*lead, k).to(dtype).requires_grad_()
    y = layer(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    wd = layer.weight.to_dense().detach().double().requires_grad_()
    xd = x.detach().double().requires_grad_()
    bd = layer.bias.detach().double().requires_grad_()
    F.linear(xd, wd, bd).backward(grad_out.double())
    assert x.grad.dtype == dtype and layer.values.grad.dtype == dtype
    assert layer.values.grad.stride() == layer.values.stride()
    assert _rel(x.grad, xd.grad) < 1e-2
    assert _rel(layer.bias.grad, bd.grad) < 1e-2
    assert _rel(layer.values.grad, _kept_blocks(wd.grad, layer.weight)) < 1e-2


def test_padding_gradient_is_zero_and_finite():
    """Entries of blocks over the ragged edges get gradient exactly 0, and non-finite padding never reaches x.grad."""
    layer = _layer(41, 67, (32, 32), 1.0)
    padding = _kept_blocks(torch.ones(41, 67), layer.weight) == 0
    assert padding.any()
    with torch.no_grad():
        layer.values[padding] = float("nan")
    x = torch.randn(5, 67, requires_grad=True)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.all(layer.values.grad[padding] == 0)


def test_empty_input():
    layer = _layer(40, 48, (16, 16), 0.5)
    x = torch.randn(0, 48, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == (0, 48)
    assert torch.equal(layer.values.grad, torch.zeros_like(layer.values))


def _op_args(transposed: bool, seed: int = 0):
    layer = _layer(45, 37, (8, 8), 0.5, seed)
    _set_layout(layer, transposed)
    values = layer.values.detach()
    crow, col = layer.crow_indices, layer.col_indices
    col_ptr, entries = torch.ops.pysparse.bsr_column_index(crow, col, -(-37 // 8))
    grad = torch.randn(3, 45)
    x = torch.randn(3, 37)
    return values, crow, col, col_ptr, entries, grad, x


@pytest.mark.parametrize("transposed", [False, True], ids=["row_major", "block_transposed"])
def test_opcheck(transposed):
    values, crow, col, col_ptr, entries, grad, x = _op_args(transposed)
    torch.library.opcheck(torch.ops.pysparse.bsr_column_index.default, (crow, col, 5))
    torch.library.opcheck(torch.ops.pysparse.bsr_linear_grad_input.default, (grad, values, col_ptr, entries, 37))
    torch.library.opcheck(torch.ops.pysparse.bsr_linear_grad_values.default, (grad, x, values, crow, col))
    torch.library.opcheck(torch.ops.pysparse.bsr_linear_grad_values_bias.default, (grad, x, values, crow, col))


# (out_features, in_features, block_size, tokens, density, rows kept): block rows without blocks inside and at the end
# (their bias gradient is read apart from the slabs), a ragged last block row, no block at all, more tokens than a
# chunk, column vectors.
BIAS_CASES = [
    (45, 37, (8, 8), 70, 0.6, slice(0, 3)),
    (100, 64, (32, 32), 300, 0.5, slice(1, 2)),
    (40, 48, (16, 16), 5, 0.0, slice(0, 0)),
    (70, 23, (16, 1), 130, 0.5, slice(0, 3)),
    (50, 33, (16, 16), 0, 0.5, slice(0, 4)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,block_size,m,density,rows", BIAS_CASES)
def test_grad_values_bias_on_every_path(n, k, block_size, m, density, rows, dtype):
    """The fused bias gradient equals grad's column sums, and grad_values the unfused op's, on every CPU path."""
    layer = _layer(n, k, block_size, density)
    g = torch.Generator().manual_seed(5)
    keep = torch.zeros(-(-n // block_size[0]), dtype=torch.bool)
    keep[rows] = True
    weight = BlockSparseWeight.from_dense(layer.weight.to_dense() * keep.repeat_interleave(block_size[0])[:n, None],
                                          block_size)
    values = weight.values.to(dtype)
    grad = torch.randn(m, n, generator=g).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    for isa in pysparse.ops.cpu_paths():
        with pysparse.ops.force_cpu_path(isa):
            gv, gb = torch.ops.pysparse.bsr_linear_grad_values_bias(grad, x, values, weight.crow_indices,
                                                                   weight.col_indices)
            want_gv = torch.ops.pysparse.bsr_linear_grad_values(grad, x, values, weight.crow_indices,
                                                               weight.col_indices)
        assert gb.dtype == dtype and gb.shape == (n,)
        assert _rel(gb, grad.double().sum(0)) < (1e-6 if dtype == torch.float32 else 1e-2), isa
        assert torch.equal(gv, want_gv), isa


def test_column_index_lists_blocks_by_column():
    values, crow, col, col_ptr, entries, _, _ = _op_args(False)
    rows = torch.repeat_interleave(torch.arange(len(crow) - 1), torch.diff(crow.long()))
    for c in range(len(col_ptr) - 1):
        part = entries[col_ptr[c]:col_ptr[c + 1]].long()
        assert torch.all(col[part[:, 1]] == c)
        assert torch.equal(rows[part[:, 1]], part[:, 0])
        assert torch.all(part[1:, 0] > part[:-1, 0])
    assert col_ptr[-1] == values.shape[0]


def test_column_index_is_cached_per_layout():
    layer = _layer(64, 64, (16, 16), 0.5)
    first = bsr_linear_grad.column_index(layer.crow_indices, layer.col_indices, 4)
    assert bsr_linear_grad.column_index(layer.crow_indices, layer.col_indices, 4) is first
    # A new pattern loaded in place (same tensors, new version) rebuilds it.
    other = _layer(64, 64, (16, 16), 0.5, seed=3)
    if other.col_indices.shape == layer.col_indices.shape:
        layer.col_indices.copy_(other.col_indices)
        layer.crow_indices.copy_(other.crow_indices)
        again = bsr_linear_grad.column_index(layer.crow_indices, layer.col_indices, 4)
        assert again is not first
        want = torch.ops.pysparse.bsr_column_index(other.crow_indices, other.col_indices, 4)
        assert all(torch.equal(a, b) for a, b in zip(again, want))


def test_bad_input_raises_clear_errors():
    values, crow, col, col_ptr, entries, grad, x = _op_args(False)
    with pytest.raises(TypeError, match="grad_output must be float32"):
        torch.ops.pysparse.bsr_linear_grad_input(grad.double(), values, col_ptr, entries, 37)
    with pytest.raises(ValueError, match="col_ptr must have"):
        torch.ops.pysparse.bsr_linear_grad_input(grad, values, col_ptr, entries, 64)
    bad = entries.clone()
    bad[0, 0] = 1000
    with pytest.raises(ValueError, match="block row"):
        torch.ops.pysparse.bsr_linear_grad_input(grad, values, col_ptr, bad, 37)
    with pytest.raises(ValueError, match="crow_indices must have"):
        torch.ops.pysparse.bsr_linear_grad_values(torch.randn(3, 70), x, values, crow, col)
    with pytest.raises(ValueError, match="share their leading"):
        torch.ops.pysparse.bsr_linear_grad_values(grad, torch.randn(4, 37), values, crow, col)
    with pytest.raises(TypeError, match="input must have grad_output's dtype Float, got Half"):
        torch.ops.pysparse.bsr_linear_grad_values(grad, x.half(), values, crow, col)
    with pytest.raises(TypeError, match="values must have grad_output's dtype BFloat16, got Float"):
        torch.ops.pysparse.bsr_linear_grad_input(grad.bfloat16(), values, col_ptr, entries, 37)
    with pytest.raises(TypeError, match="int32"):
        torch.ops.pysparse.bsr_column_index(crow.long(), col, 5)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.pysparse.bsr_column_index(crow, col, 2)


def test_wrong_gradient_shape_raises():
    layer = _layer(45, 37, (8, 8), 0.5)
    y = layer(torch.randn(3, 37, requires_grad=True))
    with pytest.raises(RuntimeError, match="[Mm]ismatch in shape"):
        y.backward(torch.randn(4, 45))


@pytest.mark.parametrize("transposed", [False, True], ids=["row_major", "block_transposed"])
def test_compiled_training_step_has_no_graph_break(transposed):
    torch._dynamo.reset()
    layer = _layer(48, 40, (16, 8), 0.5)
    _set_layout(layer, transposed)
    x = torch.randn(3, 5, 40, requires_grad=True)

    def step(m, inp):
        return (m(inp) ** 2).sum()

    step(layer, x).backward()
    eager = [t.grad.clone() for t in (x, layer.values, layer.bias)]
    for t in (x, layer.values, layer.bias):
        t.grad = None
    torch.compile(step, backend="aot_eager", fullgraph=True)(layer, x).backward()
    for got, want in zip((x.grad, layer.values.grad, layer.bias.grad), eager):
        assert _rel(got, want) < 1e-6


def test_sparsify_trainable_layer_trains_on_the_kernels(no_torch_glue):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    with torch.no_grad():
        for lin in (model[0], model[2]):
            keep = (torch.rand(lin.out_features // 16, lin.in_features // 16) < 0.4)
            lin.weight.mul_(keep.repeat_interleave(16, 0).repeat_interleave(16, 1))
    sparse = pysparse.sparsify(model, block_size=(16, 16), min_sparsity=0.0, trainable=True)
    assert all(isinstance(sparse[i], SparseLinear) and isinstance(sparse[i].values, nn.Parameter) for i in (0, 2))
    x = torch.randn(8, 64)
    sparse(x).square().sum().backward()
    model(x).square().sum().backward()
    for lin, sl in ((model[0], sparse[0]), (model[2], sparse[2])):
        assert _rel(sl.values.grad, _kept_blocks(lin.weight.grad, sl.weight)) < 1e-5
        assert _rel(sl.bias.grad, lin.bias.grad) < 1e-5
