"""Unstructured sparse weights (block size 1x1): the format, the ``pysparse::unstructured_linear`` op on every CPU
path the machine runs, its backward, and the layer (``SparseLinear.from_dense(block_size=(1, 1))``), against the dense
masked weight in float64."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from conftest import SEED

import pysparse
from pysparse import ops
from pysparse.demo import threads as torch_threads
from pysparse.formats import UnstructuredSparseWeight
from pysparse.formats.unstructured import BLOCK_COLS, BLOCK_WIDTHS, n_column_blocks
from pysparse.nn import SparseLinear, UnstructuredSparseLinear
from pysparse.ops.cpu_path import cpu_paths, force_cpu_path
from pysparse.ops.unstructured_linear import kernel_block_cols, transposed_index

# (M, K, N, density): odd shapes, N not a multiple of 4, M around the gather threshold (4) and the tile widths.
CASES = [(1, 384, 1536, 0.1), (3, 37, 19, 0.3), (4, 33, 9, 0.5), (17, 31, 7, 0.3), (65, 50, 21, 0.7),
         (130, 96, 40, 0.1), (9, 20, 10, 1.0), (12, 13, 6, 0.0), (5, 0, 3, 0.0), (0, 8, 8, 0.5), (6, 8, 0, 0.5)]


def make_weight(n: int, k: int, density: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``[n, k]`` weight and its mask; every third row empty (its outputs are the bias alone)."""
    mask = torch.rand(n, k, generator=gen) < density
    mask[1::3] = False if density < 1.0 else mask[1::3]
    return torch.randn(n, k, generator=gen) * mask, mask


def reference(x, weight, bias):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


def assert_close(y: torch.Tensor, want: torch.Tensor) -> None:
    assert y.shape == want.shape and y.dtype == torch.float32
    scale = max(float(want.abs().max()), 1.0) if want.numel() else 1.0
    err = float((y.double() - want).abs().max()) if want.numel() else 0.0
    assert err <= 1e-5 * scale, f"max error {err} (scale {scale})"


# ---- format ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=str)
def test_format_round_trip(case):
    gen = torch.Generator().manual_seed(SEED)
    _, k, n, density = case
    weight, mask = make_weight(n, k, density, gen)
    w = UnstructuredSparseWeight.from_dense(weight, mask)
    assert torch.equal(w.to_dense(), weight)
    assert w.shape == (n, k) and w.nnz == int(mask.sum())
    assert w.density == pytest.approx(int(mask.sum()) / (n * k) if n * k else 0.0)
    assert w.nbytes == w.values.numel() * 8 + w.segment_ptr.numel() * 4
    assert w.segment_ptr.numel() == -(-k // BLOCK_COLS) * n + 1


def test_format_keeps_masked_zeros_and_drops_unmasked_entries():
    weight = torch.tensor([[1.0, 0.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    w = UnstructuredSparseWeight.from_dense(weight, mask)
    assert w.nnz == 4  # the kept 0.0 is stored
    assert torch.equal(w.to_dense(), weight * mask)


def _good():
    """5 x 130: two column blocks ([0, 127] and [128, 129]); row 3 empty."""
    weight = torch.zeros(5, 130)
    weight[0, [0, 2, 129]] = torch.tensor([1.0, 2.0, 3.0])
    weight[1, 1] = 4.0
    weight[2, [0, 1, 2, 128]] = torch.tensor([5.0, 6.0, 7.0, 8.0])
    weight[4, 0] = 9.0
    return UnstructuredSparseWeight.from_dense(weight)


def test_format_layout_of_a_small_weight():
    w = _good()
    # Block 0: rows 0 (0, 2), 1 (1), 2 (0, 1, 2), 3 (-), 4 (0); block 1: rows 0 (129), 2 (128).
    assert w.columns.tolist() == [0, 2, 1, 0, 1, 2, 0, 129, 128]
    assert w.values.tolist() == [1.0, 2.0, 4.0, 5.0, 6.0, 7.0, 9.0, 3.0, 8.0]
    assert w.segment_ptr.tolist() == [0, 2, 3, 6, 6, 7, 8, 8, 9, 9, 9]


@pytest.mark.parametrize("edit, message", [
    (lambda w: w.columns.__setitem__(0, 130), "outside its column block 0"),
    (lambda w: w.columns.__setitem__(7, 5), "outside its column block 1"),
    (lambda w: w.columns.__setitem__(0, -1), "outside its column block 0"),
    (lambda w: w.segment_ptr.__setitem__(0, 1), "segment_ptr\\[0\\]"),
    (lambda w: w.segment_ptr.__setitem__(2, 1), "non-decreasing"),
    (lambda w: w.segment_ptr.__setitem__(10, 10), "segment_ptr\\[-1\\]"),
    (lambda w: w.columns.__setitem__(1, 0), "strictly increase"),  # row 0: 0 then 0
])
def test_format_rejects_malformed(edit, message):
    w = _good()
    values, columns, segment_ptr = w.values.clone(), w.columns.clone(), w.segment_ptr.clone()
    bad = UnstructuredSparseWeight.__new__(UnstructuredSparseWeight)
    bad.values, bad.columns, bad.segment_ptr = values, columns, segment_ptr
    edit(bad)
    with pytest.raises(ValueError, match=message):
        UnstructuredSparseWeight(bad.values, bad.columns, bad.segment_ptr, w.shape)


def test_format_rejects_wrong_types():
    w = _good()
    with pytest.raises(TypeError, match="columns"):
        UnstructuredSparseWeight(w.values, w.columns.long(), w.segment_ptr, w.shape)
    with pytest.raises(ValueError, match="segment_ptr must have"):
        UnstructuredSparseWeight(w.values, w.columns, w.segment_ptr[:-1], w.shape)
    with pytest.raises(ValueError, match="one entry per value"):
        UnstructuredSparseWeight(w.values, w.columns[:-1], w.segment_ptr, w.shape)
    with pytest.raises(ValueError, match="mask must have shape"):
        UnstructuredSparseWeight.from_dense(torch.ones(3, 4), mask=torch.ones(4, 3, dtype=torch.bool))


# ---- op ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_op_matches_dense(case, with_bias):
    gen = torch.Generator().manual_seed(SEED + 1)
    m, k, n, density = case
    weight, mask = make_weight(n, k, density, gen)
    w = UnstructuredSparseWeight.from_dense(weight, mask)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    y = ops.unstructured_linear(x, w.values, w.columns, w.segment_ptr, bias, n)
    assert_close(y, reference(x, weight, bias))


def test_op_input_layouts_and_leading_dims():
    gen = torch.Generator().manual_seed(SEED + 2)
    weight, mask = make_weight(10, 24, 0.4, gen)
    w = UnstructuredSparseWeight.from_dense(weight, mask)
    base = torch.randn(2, 3, 48, generator=gen)
    for x in (base[..., ::2], base[..., :24], torch.randn(24, 7, generator=gen).t(),
              torch.randn(1, 24, generator=gen).expand(9, 24)):
        y = ops.unstructured_linear(x, w.values, w.columns, w.segment_ptr, None, 10)
        assert_close(y, reference(x, weight, None))


def test_infinite_input_in_a_dropped_column_stays_out():
    """Padding reads the packed zero column, never a real x: an inf where no row keeps a weight must not give NaN."""
    gen = torch.Generator().manual_seed(SEED + 3)
    weight, mask = make_weight(9, 20, 0.5, gen)
    weight[:, 7] = 0
    mask[:, 7] = False
    w = UnstructuredSparseWeight.from_dense(weight, mask)
    for m in (1, 2, 40):
        x = torch.randn(m, 20, generator=gen)
        x[:, 7] = float("inf")
        y = ops.unstructured_linear(x, w.values, w.columns, w.segment_ptr, None, 9)
        assert torch.isfinite(y).all()
        x[:, 7] = 0
        assert_close(y, reference(x, weight, None))


def test_op_rejects_malformed_indices_with_a_clear_error():
    w = _good()
    x = torch.randn(3, 130)
    bad_columns = w.columns.clone()
    bad_columns[2] = 999
    # The raw op checks what memory safety needs on every call: the columns where each kernel path first reads them
    # (batch-1 gathers, a few-token tile, many tiles), the same message on each.
    for m in (1, 3, 200):
        with pytest.raises(ValueError, match="columns\\[2\\]=999 is outside its column block 0"):
            torch.ops.pysparse.unstructured_linear(torch.randn(m, 130), w.values, bad_columns, w.segment_ptr, None, 5)
    bad_ptr = w.segment_ptr.clone()
    bad_ptr[-1] += 1
    with pytest.raises(ValueError, match="segment_ptr\\[-1\\]"):
        torch.ops.pysparse.unstructured_linear(x, w.values, w.columns, bad_ptr, None, 5)
    bad_ptr = w.segment_ptr.clone()
    bad_ptr[3] = 100
    with pytest.raises(ValueError, match="non-decreasing"):
        torch.ops.pysparse.unstructured_linear(x, w.values, w.columns, bad_ptr, None, 5)
    with pytest.raises(ValueError, match="segment_ptr must have"):
        torch.ops.pysparse.unstructured_linear(x, w.values, w.columns, w.segment_ptr, None, 9)
    with pytest.raises(TypeError, match="int32"):
        torch.ops.pysparse.unstructured_linear(x, w.values, w.columns.long(), w.segment_ptr, None, 5)
    # The wrapper validates the whole format first.
    with pytest.raises(ValueError, match="outside its column block"):
        ops.unstructured_linear(x, w.values, bad_columns, w.segment_ptr, None, 5)
    with pytest.raises(TypeError, match="out_features"):
        ops.unstructured_linear(x, w.values, w.columns, w.segment_ptr, None, 5.0)


def test_other_dtypes_and_devices_take_the_reference():
    w = _good()
    x = torch.randn(4, 130, dtype=torch.float64)
    y = ops.unstructured_linear(x, w.values.double(), w.columns, w.segment_ptr, None, 5)
    assert y.dtype == torch.float64
    assert torch.allclose(y, F.linear(x, w.to_dense().double()))


EPILOGUES = {None: lambda v: v, "relu": torch.relu, "relu6": lambda v: v.clamp(0, 6), "gelu": F.gelu}


@pytest.mark.parametrize("activation", list(EPILOGUES), ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_epilogue_matches_torch(case, activation):
    """activation(linear + residual) fused into the kernel's stores (no gradient wanted), on the batch-1 gathers and
    the token tiles alike, against float64."""
    gen = torch.Generator().manual_seed(SEED + 40)
    m, k, n, density = case
    weight, mask = make_weight(n, k, density, gen)
    w = UnstructuredSparseWeight.from_dense(weight, mask)
    x, bias = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    res = torch.randn(m, n, generator=gen) * 2
    for r in (res, None):
        if r is None and activation is None:
            continue
        want = EPILOGUES[activation](reference(x, weight, bias) + (0 if r is None else r.double()))
        torch.full((m, n), float("nan")).zero_()  # likely hands the op this memory back: unwritten outputs stay NaN
        y = ops.unstructured_linear(x, w.values, w.columns, w.segment_ptr, bias, n, activation=activation, residual=r)
        assert_close(y, want)


def test_fused_epilogue_propagates_nan_and_takes_the_torch_path_where_it_must():
    gen = torch.Generator().manual_seed(SEED + 41)
    weight, mask = make_weight(30, 50, 0.4, gen)
    w = UnstructuredSparseWeight.from_dense(weight, mask)
    x, bias = torch.randn(7, 50, generator=gen), torch.randn(30, generator=gen)
    res = torch.randn(7, 30, generator=gen)
    res[2, 3] = float("nan")
    for act in ("relu", "relu6", "gelu"):
        y = ops.unstructured_linear(x, w.values, w.columns, w.segment_ptr, bias, 30, activation=act, residual=res)
        assert torch.isnan(y[2, 3]) and int(torch.isnan(y).sum()) == 1, act
    # A residual that broadcasts or promotes, and a call that wants a gradient: torch adds and activates after the op.
    lin = reference(x, weight, bias)
    row = torch.randn(30, generator=gen)
    y = ops.unstructured_linear(x, w.values, w.columns, w.segment_ptr, bias, 30, activation="gelu", residual=row)
    assert_close(y, F.gelu(lin + row.double()))
    xg = x.clone().requires_grad_()
    y = ops.unstructured_linear(xg, w.values, w.columns, w.segment_ptr, bias, 30, activation="relu",
                                residual=res.nan_to_num())
    y.sum().backward()
    want = torch.relu(lin + res.nan_to_num().double())
    assert_close(y.detach(), want)
    assert torch.allclose(xg.grad.double(), (want > 0).double() @ weight.double(), atol=1e-4)


def test_fused_epilogue_rejects_bad_arguments():
    w = UnstructuredSparseWeight.from_dense(torch.eye(4))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="activation must be None or one of"):
        ops.unstructured_linear(x, w.values, w.columns, w.segment_ptr, None, 4, activation="tanh")
    with pytest.raises(TypeError, match="residual must be a torch.Tensor or None"):
        ops.unstructured_linear(x, w.values, w.columns, w.segment_ptr, None, 4, residual=[1.0])
    op = torch.ops.pysparse.unstructured_linear_act.default
    with pytest.raises(ValueError, match="activation must be 'relu', 'relu6' or 'gelu', got 'tanh'"):
        op(x, w.values, w.columns, w.segment_ptr, None, 4, "tanh", None)
    with pytest.raises(ValueError, match=r"residual must have the output's shape \[2, 4\]"):
        op(x, w.values, w.columns, w.segment_ptr, None, 4, None, torch.randn(3, 4))
    with pytest.raises(TypeError, match="residual must have the input's dtype"):
        op(x, w.values, w.columns, w.segment_ptr, None, 4, None, torch.randn(2, 4, dtype=torch.float64))


def test_opcheck():
    gen = torch.Generator().manual_seed(SEED + 4)
    for m, k, n, density in [(5, 13, 9, 0.4), (1, 16, 8, 0.5), (70, 8, 3, 1.0)]:
        weight, mask = make_weight(n, k, density, gen)
        w = UnstructuredSparseWeight.from_dense(weight, mask)
        args = (torch.randn(m, k, generator=gen, requires_grad=True), w.values.requires_grad_(), w.columns,
                w.segment_ptr, torch.randn(n, generator=gen, requires_grad=True), n)
        torch.library.opcheck(torch.ops.pysparse.unstructured_linear.default, args)
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.pysparse.unstructured_linear_act.default,
                              (*plain, "gelu", torch.randn(m, n, generator=gen)))


def test_backward_matches_dense():
    gen = torch.Generator().manual_seed(SEED + 5)
    weight, mask = make_weight(11, 17, 0.4, gen)
    w = UnstructuredSparseWeight.from_dense(weight, mask)
    x = torch.randn(2, 6, 17, generator=gen, requires_grad=True)
    values = w.values.clone().requires_grad_()
    bias = torch.randn(11, generator=gen, requires_grad=True)
    y = ops.unstructured_linear(x, values, w.columns, w.segment_ptr, bias, 11)
    grad = torch.randn(y.shape, generator=gen)
    y.backward(grad)
    dense = weight.clone().requires_grad_()
    xd, bd = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    F.linear(xd, dense, bd).backward(grad)
    assert torch.allclose(x.grad, xd.grad, atol=1e-5)
    assert torch.allclose(bias.grad, bd.grad, atol=1e-5)
    grad_w = UnstructuredSparseWeight(values.grad, w.columns, w.segment_ptr, w.shape).to_dense()
    assert torch.allclose(grad_w, dense.grad * mask, atol=1e-5)


# ---- backward kernels (grad_values, grad_x through W^T) -------------------------------------------------------------
def _backward_against_dense(m, k, n, density, gen, leading=(), block_cols=BLOCK_COLS):
    weight, mask = make_weight(n, k, density, gen)
    w = UnstructuredSparseWeight.from_dense(weight, mask, block_cols=block_cols)
    x = torch.randn(*leading, m, k, generator=gen, requires_grad=True)
    values = w.values.clone().requires_grad_()
    bias = torch.randn(n, generator=gen, requires_grad=True)
    grad = torch.randn(*leading, m, n, generator=gen)
    ops.unstructured_linear(x, values, w.columns, w.segment_ptr, bias, n).backward(grad)
    xd, wd = x.detach().double().requires_grad_(), weight.double().requires_grad_()
    F.linear(xd, wd).backward(grad.double())
    assert_close(x.grad, xd.grad)
    assert_close(UnstructuredSparseWeight(values.grad, w.columns, w.segment_ptr, w.shape).to_dense(), wd.grad * mask)
    assert_close(bias.grad, grad.double().flatten(0, -2).sum(0))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_kernels_match_dense(case):
    _backward_against_dense(*case, torch.Generator().manual_seed(SEED + 20))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_backward_thread_counts(threads):
    gen = torch.Generator().manual_seed(SEED + 21)
    with torch_threads(threads):
        for m in (5, 700):
            _backward_against_dense(m, 300, 45, 0.3, gen, leading=(2,))


def test_transposed_index_is_the_transpose_and_is_cached():
    gen = torch.Generator().manual_seed(SEED + 22)
    weight, mask = make_weight(37, 300, 0.3, gen)
    w = UnstructuredSparseWeight.from_dense(weight, mask)
    columns = w.columns.clone()
    columns_t, segment_ptr_t, perm = first = transposed_index(columns, w.segment_ptr, 300, 37)
    transposed = UnstructuredSparseWeight(w.values[perm.long()], columns_t, segment_ptr_t, (300, 37))  # validates
    assert torch.equal(transposed.to_dense(), weight.t())
    assert transposed_index(columns, w.segment_ptr, 300, 37) is first
    columns.add_(0)  # written in place: the cached index is rebuilt
    again = transposed_index(columns, w.segment_ptr, 300, 37)
    assert again is not first and all(torch.equal(a, b) for a, b in zip(again, first))


def test_backward_ops_reject_bad_input():
    w = _good()
    x, grad = torch.randn(3, 130), torch.randn(3, 5)
    grad_values = torch.ops.pysparse.unstructured_linear_grad_values
    transpose = torch.ops.pysparse.unstructured_transpose
    with pytest.raises(ValueError, match="share their leading dimensions"):
        grad_values(torch.randn(4, 5), x, w.columns, w.segment_ptr)
    with pytest.raises(TypeError, match="float32"):
        grad_values(grad.double(), x, w.columns, w.segment_ptr)
    with pytest.raises(ValueError, match="segment_ptr must have"):
        grad_values(torch.randn(3, 6), x, w.columns, w.segment_ptr)
    bad_columns = w.columns.clone()
    bad_columns[2] = 999
    for call in (lambda: grad_values(grad, x, bad_columns, w.segment_ptr),
                 lambda: transpose(bad_columns, w.segment_ptr, 130, 5)):
        with pytest.raises(ValueError, match="columns\\[2\\]=999 is outside its column block 0"):
            call()
    with pytest.raises(ValueError, match="segment_ptr must have"):
        transpose(w.columns, w.segment_ptr, 130, 7)
    with pytest.raises(ValueError, match=">= 0"):
        transpose(w.columns, w.segment_ptr, -1, 5)


def test_opcheck_backward_ops():
    gen = torch.Generator().manual_seed(SEED + 23)
    for m, k, n, density in [(5, 13, 9, 0.4), (1, 16, 8, 0.5), (70, 140, 3, 1.0)]:
        weight, mask = make_weight(n, k, density, gen)
        w = UnstructuredSparseWeight.from_dense(weight, mask)
        x, grad = torch.randn(m, k, generator=gen), torch.randn(m, n, generator=gen)
        torch.library.opcheck(torch.ops.pysparse.unstructured_linear_grad_values.default,
                              (grad, x, w.columns, w.segment_ptr))
        torch.library.opcheck(torch.ops.pysparse.unstructured_transpose.default, (w.columns, w.segment_ptr, k, n))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_and_both_work_splits(threads):
    """Few token tiles split each tile's rows between threads; many tiles (here M = 700, over 3 x 64 tokens) give
    each thread whole tiles: both splits and every thread count against the dense reference."""
    gen = torch.Generator().manual_seed(SEED + 7)
    weight, mask = make_weight(45, 300, 0.3, gen)
    w = UnstructuredSparseWeight.from_dense(weight, mask)
    bias = torch.randn(45, generator=gen)
    with torch_threads(threads):
        for m in (70, 700):
            x = torch.randn(m, 300, generator=gen)
            y = ops.unstructured_linear_packed(x, w.values, w.columns, w.segment_ptr, bias, 45)
            assert_close(y, reference(x, weight, bias))


def test_concurrent_calls_from_python_threads():
    gen = torch.Generator().manual_seed(SEED + 6)
    weight, mask = make_weight(64, 96, 0.2, gen)
    w = UnstructuredSparseWeight.from_dense(weight, mask)
    xs = [torch.randn(m, 96, generator=gen) for m in (1, 8, 70, 200)]
    errors = []

    def work(x):
        for _ in range(20):
            y = ops.unstructured_linear_packed(x, w.values, w.columns, w.segment_ptr, None, 64)
            if float((y.double() - reference(x, weight, None)).abs().max()) > 1e-4:
                errors.append(x.shape)

    threads = [threading.Thread(target=work, args=(x,)) for x in xs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_cpu_path(isa):
    """Each path the machine runs, forced through PYSPARSE_CPU_ISA in a fresh process (the choice is made at load)."""
    code = (
        "import torch, pysparse.ops as ops\n"
        "from pysparse.formats import UnstructuredSparseWeight\n"
        f"g, g2 = torch.Generator().manual_seed({SEED}), torch.Generator().manual_seed({SEED + 1})\n"
        "for m, k, n, width in [(1, 100, 30, 128), (3, 64, 9, 128), (20, 33, 13, 128), (150, 70, 21, 128),\n"
        "                        (1, 1100, 21, 512), (5, 600, 13, 256), (70, 1030, 9, 512)]:\n"
        "    mask = torch.rand(n, k, generator=g) < 0.3\n"
        "    w = torch.randn(n, k, generator=g) * mask\n"
        "    x, b = torch.randn(m, k, generator=g), torch.randn(n, generator=g)\n"
        "    p = UnstructuredSparseWeight.from_dense(w, mask, block_cols=width)\n"
        "    y = ops.unstructured_linear(x, p.values, p.columns, p.segment_ptr, b, n)\n"
        "    want = torch.nn.functional.linear(x.double(), w.double(), b.double())\n"
        "    assert (y.double() - want).abs().max() < 1e-4, (m, k, n)\n"
        "    r = torch.randn(m, n, generator=g)\n"
        "    y = ops.unstructured_linear(x, p.values, p.columns, p.segment_ptr, b, n, activation='gelu', residual=r)\n"
        "    assert (y.double() - torch.nn.functional.gelu(want + r.double())).abs().max() < 1e-4, (m, k, n)\n"
        "    xg, v = x.clone().requires_grad_(), p.values.clone().requires_grad_()\n"
        "    gy = torch.randn(m, n, generator=g2)\n"
        "    ops.unstructured_linear(xg, v, p.columns, p.segment_ptr, b, n).backward(gy)\n"
        "    assert (xg.grad.double() - gy.double() @ w.double()).abs().max() < 1e-4, (m, k, n)\n"
        "    gw = UnstructuredSparseWeight(v.grad, p.columns, p.segment_ptr, (n, k)).to_dense().double()\n"
        "    assert (gw - (gy.double().t() @ x.double()) * mask).abs().max() < 1e-4, (m, k, n)\n"
        "print(ops.available_backends()['cpu'])\n"
    )
    env = dict(os.environ, PYSPARSE_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() != isa:
        pytest.skip(f"this CPU does not run the {isa} path (ran {out.stdout.strip()})")


# ---- column-block widths -----------------------------------------------------------------------------------------
# (M, K, N, density): several wide blocks and a ragged last one, batch 1-3 (gathers), one tile, several tiles.
WIDTH_CASES = [(1, 1100, 37, 0.1), (2, 600, 19, 0.3), (3, 513, 40, 0.2), (16, 1100, 45, 0.05), (70, 700, 31, 0.3),
               (130, 1030, 29, 0.1), (9, 300, 10, 1.0), (5, 200, 9, 0.0)]


@pytest.mark.parametrize("width", BLOCK_WIDTHS[1:])
@pytest.mark.parametrize("case", WIDTH_CASES, ids=str)
def test_wide_column_blocks_match_dense_and_the_narrow_format(case, width):
    gen = torch.Generator().manual_seed(SEED + 30)
    m, k, n, density = case
    weight, mask = make_weight(n, k, density, gen)
    wide = UnstructuredSparseWeight.from_dense(weight, mask, block_cols=width)
    narrow = UnstructuredSparseWeight.from_dense(weight, mask)
    assert wide.segment_ptr.numel() == n_column_blocks(k, width) * n + 1
    assert n_column_blocks(k, wide.block_cols) == n_column_blocks(k, width)  # the narrowest width of that count
    assert torch.equal(wide.to_dense(), weight) and wide.nnz == narrow.nnz
    x, bias = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    y = ops.unstructured_linear(x, wide.values, wide.columns, wide.segment_ptr, bias, n)
    assert_close(y, reference(x, weight, bias))
    if m >= 4:  # token tiles on every path: each row's additions in the same order whatever the width
        assert torch.equal(y, ops.unstructured_linear(x, narrow.values, narrow.columns, narrow.segment_ptr, bias, n))
    _backward_against_dense(m, k, n, density, gen, block_cols=width)


def test_widths_are_checked():
    weight, mask = make_weight(6, 300, 0.3, torch.Generator().manual_seed(SEED + 31))
    with pytest.raises(ValueError, match="block_cols must be one of \\(128, 256, 512\\), got 384"):
        UnstructuredSparseWeight.from_dense(weight, mask, block_cols=384)
    with pytest.raises(TypeError, match="block_cols must be an int"):
        UnstructuredSparseWeight.from_dense(weight, mask, block_cols=True)
    w = UnstructuredSparseWeight.from_dense(weight, mask, block_cols=256)
    assert w.block_cols == 256 and w.segment_ptr.numel() == 2 * 6 + 1
    # 300 columns: 3, 2 or 1 blocks make 19, 13 or 7 pointers; 8 fits no width.
    short = torch.cat([w.segment_ptr[:7], w.segment_ptr[-1:]])
    with pytest.raises(ValueError, match="width w of 128, 256 or 512 \\(19, 13 or 7 for shape \\(6, 300\\)\\), got 8"):
        UnstructuredSparseWeight(w.values, w.columns, short, w.shape)
    x = torch.randn(2, 300)
    with pytest.raises(ValueError, match="column-block width w of 128, 256 or 512 \\(19, 13 or 7"):
        torch.ops.pysparse.unstructured_linear(x, w.values, w.columns, short, None, 6)
    # A column of block 1 (256..299) moved into block 0's range is caught by the op for its width.
    cols = w.columns.clone()
    first_of_block_1 = int(w.segment_ptr[6])
    cols[first_of_block_1] = 10
    with pytest.raises(ValueError, match="outside its column block 1 \\(\\[256, 299\\]\\)"):
        torch.ops.pysparse.unstructured_linear(x, w.values, cols, w.segment_ptr, None, 6)
    with pytest.raises(ValueError, match="density must be in"):
        kernel_block_cols(1.5)
    with pytest.raises(TypeError, match="density must be a number, got str"):
        kernel_block_cols("0.1")


def test_layers_pack_at_the_width_of_the_cpu_path():
    linear, mask = _linear(20, 1100, 0.1, SEED + 32)
    paths = {"generic": (128, 128, 128), "avx2": (512, 128, 128), "avx512": (128, 128, 128)}
    for path in cpu_paths():
        if path not in paths:
            continue
        with force_cpu_path(path):
            assert tuple(kernel_block_cols(d) for d in (0.1, 0.3, 0.5)) == paths[path]
            layer = SparseLinear.from_dense(linear, (1, 1), mask=mask)
            assert layer.weight.block_cols == paths[path][0]
            model = pysparse.sparsify(torch.nn.Sequential(torch.nn.Linear(1100, 20)), block_size=(1, 1),
                                      min_sparsity=0.0)
            assert model[0].weight.block_cols == 128  # a dense weight: density 1
        x = torch.randn(3, 1100)
        with torch.no_grad():
            assert_close(layer(x), reference(x, linear.weight * mask, linear.bias))


# ---- layer -------------------------------------------------------------------------------------------------------
def _linear(n: int, k: int, density: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n)
    _, mask = make_weight(n, k, density, gen)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen))
    return linear, mask


def test_layer_from_dense_block_1x1_is_unstructured():
    linear, mask = _linear(37, 300, 0.2, SEED + 10)
    layer = SparseLinear.from_dense(linear, block_size=(1, 1), mask=mask)
    assert isinstance(layer, UnstructuredSparseLinear) and isinstance(layer, SparseLinear)
    assert layer.block_size == (1, 1) and layer.density == pytest.approx(float(mask.float().mean()))
    assert set(layer.state_dict()) == {"values", "columns", "segment_ptr", "bias"}
    x = torch.randn(3, 5, 300)
    with torch.no_grad():
        assert_close(layer(x), reference(x, linear.weight * mask, linear.bias))
    assert torch.equal(layer.weight.to_dense(), (linear.weight * mask).detach())
    dense = layer.to_linear()
    assert torch.equal(dense.weight, (linear.weight * mask).detach())
    assert "block_size=(1, 1)" in repr(layer)
    with pytest.raises(ValueError, match="block_size"):
        UnstructuredSparseLinear.from_dense(linear, block_size=(4, 4))


def test_layer_activation_residual_and_dtype_moves():
    linear, mask = _linear(20, 40, 0.5, SEED + 11)
    layer = SparseLinear.from_dense(linear, (1, 1), mask=mask, activation="relu")
    x, res = torch.randn(6, 40), torch.randn(6, 20)
    want = torch.relu(reference(x, linear.weight * mask, linear.bias) + res.double())
    with torch.no_grad():
        assert_close(layer(x, res), want)
        wide = layer.to(torch.float64)  # no float64 kernel: the reference path, same numbers
        assert wide.values.dtype == torch.float64 and wide.columns.dtype == torch.int32
        assert torch.allclose(wide(x.double(), res.double()), want)


def test_layer_state_dict_round_trip_into_another_pattern_and_corruption():
    saved_linear, saved_mask = _linear(30, 140, 0.2, SEED + 12)
    fresh_linear, fresh_mask = _linear(30, 140, 0.6, SEED + 13)
    saved = SparseLinear.from_dense(saved_linear, (1, 1), mask=saved_mask)
    fresh = SparseLinear.from_dense(fresh_linear, (1, 1), mask=fresh_mask)
    fresh.load_state_dict(saved.state_dict())
    x = torch.randn(4, 140)
    with torch.no_grad():
        assert torch.equal(fresh(x), saved(x))
    state = saved.state_dict()
    state["columns"] = state["columns"].clone()
    first, width = int(state["columns"][0]), saved.weight.block_cols
    state["columns"][0] = min(first + width, 140)  # into the next column block, or past in_features
    with pytest.raises(RuntimeError, match="column block"):
        fresh.load_state_dict(state)


def test_layer_trains_its_kept_entries():
    linear, mask = _linear(12, 20, 0.5, SEED + 14)
    layer = SparseLinear.from_dense(linear, (1, 1), mask=mask, trainable=True)
    assert isinstance(layer.values, torch.nn.Parameter)
    x = torch.randn(5, 20)
    layer(x).square().sum().backward()
    dense = (linear.weight * mask).detach().requires_grad_()
    F.linear(x, dense, linear.bias.detach()).square().sum().backward()
    grad_w = UnstructuredSparseWeight(layer.values.grad, layer.columns, layer.segment_ptr, (12, 20)).to_dense()
    assert torch.allclose(grad_w, dense.grad * mask, atol=1e-4)


def test_layer_under_torch_compile():
    linear, mask = _linear(24, 64, 0.3, SEED + 15)
    layer = SparseLinear.from_dense(linear, (1, 1), mask=mask)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(7, 64)
    with torch.no_grad():
        assert torch.allclose(compiled(x), layer(x), atol=1e-6)


def test_training_step_under_torch_compile():
    """Forward and backward (the transpose op and the grad_values op traced) in one graph, gradients as eager."""
    linear, mask = _linear(24, 140, 0.3, SEED + 16)
    layer = SparseLinear.from_dense(linear, (1, 1), mask=mask, trainable=True)
    x = torch.randn(9, 140, requires_grad=True)

    def step(inp):
        return layer(inp).square().sum()

    step(x).backward()
    want = (x.grad.clone(), layer.values.grad.clone(), layer.bias.grad.clone())
    x.grad = layer.values.grad = layer.bias.grad = None
    torch.compile(step, fullgraph=True)(x).backward()
    for got, ref in zip((x.grad, layer.values.grad, layer.bias.grad), want):
        assert torch.allclose(got, ref, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(SEED % 1000)
    net = torch.nn.Sequential(torch.nn.Linear(50, 30), torch.nn.ReLU(), torch.nn.Linear(30, 10)).eval()
    sparse = torch.nn.Sequential(SparseLinear.from_dense(net[0], (1, 1), mask=torch.rand(30, 50) < 0.3),
                                 torch.nn.ReLU(), net[2])
    path = tmp_path / "u.safetensors"
    pysparse.save(sparse, path)
    fresh = torch.nn.Sequential(torch.nn.Linear(50, 30), torch.nn.ReLU(), torch.nn.Linear(30, 10)).eval()
    pysparse.load(fresh, path)
    assert isinstance(fresh[0], UnstructuredSparseLinear)
    x = torch.randn(3, 50)
    with torch.no_grad():
        assert torch.equal(fresh(x), sparse(x))
    # A corrupted index in the file is refused before any kernel runs, the model left as it was.
    tensors = safetensors.torch.load_file(path)
    tensors["0.columns"][0] = 10_000
    with safetensors.safe_open(path, "pt") as f:
        metadata = f.metadata()
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(tensors, bad, metadata=metadata)
    target = torch.nn.Sequential(torch.nn.Linear(50, 30), torch.nn.ReLU(), torch.nn.Linear(30, 10))
    with pytest.raises(ValueError, match="column block"):
        pysparse.load(target, bad)
    assert type(target[0]) is torch.nn.Linear
