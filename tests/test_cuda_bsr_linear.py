"""CUDA bsr_linear: every kernel path (small-M and large-M tensor-core, generic) against the dense reference.

Skipped without a CUDA device. Outputs are poisoned through the caching allocator: a NaN-filled tensor of the
output's size is freed just before each call, so the op's output reuses that memory and any element the kernel
fails to write stays NaN.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import generator_for
from pysparse import ops
from pysparse.formats import BlockSparseWeight

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not ops.available_backends()["cuda"], reason="needs a CUDA device")]

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def cuda_generator(*case) -> torch.Generator:
    """A CUDA generator seeded as conftest.generator_for seeds: from the session seed and a stable digest of the case
    (hash() of a tuple holding a str differs between processes, so a failure could not be reproduced)."""
    return torch.Generator("cuda").manual_seed(generator_for(repr(case)).initial_seed())


def random_bsr(n, k, block, density, dtype, gen):
    w = torch.randn(n, k, generator=gen, device="cuda", dtype=torch.float32)
    bh, bw = block
    grid = torch.rand(-(-n // bh), -(-k // bw), generator=gen, device="cuda") < density
    mask = grid.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]
    return BlockSparseWeight.from_dense(w.to(dtype), block, mask=mask)


def run_poisoned(x, bsw, bias, n):
    poison = torch.full((*x.shape[:-1], n), float("nan"), dtype=x.dtype, device=x.device)
    del poison
    return ops.bsr_linear(x, bsw.values, bsw.crow_indices, bsw.col_indices, bias, n)


def check(y, x, bsw, bias):
    ref = F.linear(x.double(), bsw.to_dense().double(), None if bias is None else bias.double())
    assert torch.isfinite(y).all(), "unwritten (NaN) outputs"
    err = ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < TOL[y.dtype], err


CASES = [
    # (M, N, K, block) — small-M path (M <= 16), large-M path, ragged edges, rectangular blocks
    (1, 256, 512, (64, 64)), (5, 200, 136, (16, 16)), (16, 96, 64, (32, 32)), (3, 72, 48, (8, 16)),
    (17, 128, 256, (64, 64)), (300, 200, 136, (32, 32)), (257, 64, 128, (16, 64)), (130, 96, 96, (64, 32)),
    (64, 50, 40, (16, 16)), (33, 70, 70, (32, 32)),  # K % 8 != 0 -> generic
    (40, 60, 48, (5, 7)), (2, 30, 30, (3, 16)),      # odd blocks -> generic
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=[f"M{c[0]}_N{c[1]}_K{c[2]}_b{c[3][0]}x{c[3][1]}" for c in CASES])
@pytest.mark.parametrize("density", [0.0, 0.35, 1.0])
def test_matches_dense_reference(case, dtype, density):
    m, n, k, block = case
    gen = cuda_generator("dense-reference", case, dtype, density)
    bsw = random_bsr(n, k, block, density, dtype, gen)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    for bias in (None, torch.randn(n, generator=gen, device="cuda").to(dtype)):
        y = run_poisoned(x, bsw, bias, n)
        check(y, x, bsw, bias)


TILE_CASES = [
    # (M, N, K, block): ragged token tiles, every BH x bw the large-M kernels specialise, and a row of 600 kept
    # blocks (longer than the mma.sync kernel's shared-memory column cache of 512)
    (17, 128, 256, (64, 64)), (300, 200, 136, (32, 32)), (257, 64, 128, (16, 64)), (130, 96, 96, (64, 32)),
    (520, 72, 200, (16, 16)), (1000, 64, 9600, (16, 16)),
    # more tiles than CTAs resident at once on an H100 / H200 (the grid runs in waves), with empty block rows
    (2000, 2048, 256, (64, 64)), (1500, 1024, 320, (32, 64)),
]


@pytest.mark.parametrize("tile_m", ["64", "128", "wg128", "wg256"])
@pytest.mark.parametrize("case", TILE_CASES, ids=[f"M{c[0]}_N{c[1]}_K{c[2]}_b{c[3][0]}x{c[3][1]}" for c in TILE_CASES])
def test_every_large_m_token_tile(case, tile_m, monkeypatch):
    # The launcher picks the kernel (mma.sync, or wgmma on sm_90a) and token tile from the device and the grid
    # size; PYSPARSE_CUDA_TILE_M forces each variant here (wgmma ones only where the device and block allow).
    monkeypatch.setenv("PYSPARSE_CUDA_TILE_M", tile_m)
    m, n, k, block = case
    gen = cuda_generator("token-tile", case, tile_m)
    for dtype in (torch.bfloat16, torch.float16):
        bsw = random_bsr(n, k, block, 1.0 if k > 4096 else 0.35, dtype, gen)
        x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
        bias = torch.randn(n, generator=gen, device="cuda").to(dtype)
        check(run_poisoned(x, bsw, bias, n), x, bsw, bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_leading_dims_and_non_contiguous(dtype):
    gen = torch.Generator("cuda").manual_seed(1)
    bsw = random_bsr(128, 192, (32, 32), 0.5, dtype, gen)
    x = torch.randn(2, 3, 7, 192, generator=gen, device="cuda").to(dtype)
    check(run_poisoned(x, bsw, None, 128), x, bsw, None)
    xt = torch.randn(192, 40, generator=gen, device="cuda").to(dtype).t()  # non-contiguous rows
    check(run_poisoned(xt, bsw, None, 128), xt, bsw, None)
    x1 = torch.randn(192, generator=gen, device="cuda").to(dtype)  # 1-D input
    check(run_poisoned(x1, bsw, None, 128), x1, bsw, None)


def test_misaligned_input_falls_back_correctly():
    gen = torch.Generator("cuda").manual_seed(2)
    bsw = random_bsr(64, 128, (16, 16), 0.5, torch.bfloat16, gen)
    base = torch.randn(40 * 128 + 1, generator=gen, device="cuda").to(torch.bfloat16)
    x = base[1:].view(40, 128)  # 2-byte offset: not 16-byte aligned
    check(run_poisoned(x, bsw, None, 64), x, bsw, None)


def test_runs_on_current_stream_and_in_cuda_graph():
    gen = torch.Generator("cuda").manual_seed(3)
    for m in (4, 200):
        bsw = random_bsr(256, 256, (64, 64), 0.3, torch.bfloat16, gen)
        x = torch.randn(m, 256, generator=gen, device="cuda").to(torch.bfloat16)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            y = ops.bsr_linear(x, bsw.values, bsw.crow_indices, bsw.col_indices, None, 256, check_indices=False)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=s):
                y_graph = ops.bsr_linear(x, bsw.values, bsw.crow_indices, bsw.col_indices, None, 256,
                                         check_indices=False)
        torch.cuda.current_stream().wait_stream(s)
        check(y, x, bsw, None)  # the eager call on a side stream
        x.copy_(torch.randn(m, 256, generator=gen, device="cuda").to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        check(y_graph, x, bsw, None)  # the replay read the new x


def test_wrong_device_raises():
    bsw = BlockSparseWeight.from_dense(torch.randn(64, 64), (32, 32))
    x = torch.randn(3, 64, device="cuda")
    with pytest.raises(ValueError, match="values"):
        ops.bsr_linear(x, bsw.values, bsw.crow_indices.cuda(), bsw.col_indices.cuda(), None, 64)
