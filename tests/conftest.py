"""Shared test inputs: one generator of random ``bsr_linear`` cases, the ``device`` fixture, and the reference check.

Like pytorch/extension-cpp's ``sample_inputs()``: every test of the op or of the layers draws its cases from
:func:`sample_specs` / :func:`make_case`, so a new input kind (a layout, a dtype) is added once and reaches all.
The case *kinds* are fixed (they are the test ids); shapes and values are drawn fresh each session from a seed
printed in pytest's header. ``PYSPARSE_TEST_SEED=<n>`` reproduces a session.
"""
from __future__ import annotations

import itertools
import os
import random
import threading
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from pysparse import ops
from pysparse.formats import BlockSparseWeight

SEED = int(os.environ.get("PYSPARSE_TEST_SEED", random.SystemRandom().randrange(2**31)))

BLOCK_SIZES = [(1, 1), (4, 8), (16, 16), (32, 32), (64, 64), (5, 7), (3, 16)]
DENSITIES = [0.0, 0.3, 0.7, 1.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Max error relative to the largest reference output (see assert_matches_reference).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# contiguous; transposed (K is not the unit-stride dim: the op copies); sliced (rows further apart than K: the
# kernel reads them in place); broadcast (an expanded row, stride 0).
LAYOUTS = ["contiguous", "transposed", "sliced", "broadcast"]


def pytest_report_header(config):
    return f"pysparse: seed {SEED} (PYSPARSE_TEST_SEED={SEED} reproduces), backends {ops.available_backends()}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if exitstatus != 0:  # the header is hidden under -q: repeat the seed where a failure is read
        terminalreporter.write_line(f"pysparse: test seed {SEED}; PYSPARSE_TEST_SEED={SEED} reproduces this run")


def cuda_available() -> bool:
    """A CUDA device is present and this build of pysparse has its CUDA kernels."""
    return bool(ops.available_backends()["cuda"])


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> torch.device:
    if request.param == "cuda" and not cuda_available():
        pytest.skip("needs a CUDA device and a CUDA build of pysparse (PYSPARSE_CUDA=1)")
    return torch.device(request.param)


def generator_for(name: str) -> torch.Generator:
    """A CPU generator seeded from the session seed and a test-specific name (each case reproducible alone)."""
    return torch.Generator().manual_seed((SEED ^ zlib.crc32(name.encode())) % 2**63)


@dataclass(frozen=True)
class CaseSpec:
    """The kind of a bsr_linear case; shapes and values are drawn by make_case."""
    block_size: tuple[int, int]
    density: float
    dtype: torch.dtype
    input_dims: int      # 1: [K], 2: [M, K], 3: [B, T, K]
    bias: bool
    layout: str
    use_mask: bool       # pack with from_dense(mask=...) or from a weight whose dropped blocks are zero

    @property
    def id(self) -> str:
        bh, bw = self.block_size
        return (f"{str(self.dtype).removeprefix('torch.')}-b{bh}x{bw}-d{self.density}-{self.input_dims}d-"
                f"{self.layout}-{'bias' if self.bias else 'nobias'}-{'mask' if self.use_mask else 'zeros'}")


def sample_specs(dtypes=tuple(DTYPES)) -> list[CaseSpec]:
    """Every block size x density for each dtype; input rank, bias, layout and packing path rotate across them."""
    specs = []
    for d, dtype in enumerate(dtypes):
        for i, (block, density) in enumerate(itertools.product(BLOCK_SIZES, DENSITIES)):
            j = i + 5 * d  # shift the rotation per dtype so each dtype meets different combinations
            dims = 1 + j % 3
            layout = LAYOUTS[j % 4]
            if dims == 1 and layout in ("transposed", "broadcast"):
                layout = "sliced"  # a 1-D input has no second dimension to transpose or broadcast
            specs.append(CaseSpec(block, density, dtype, dims, bias=j % 2 == 0, layout=layout,
                                  use_mask=(j // 2) % 2 == 0))
    return specs


@dataclass
class BsrLinearCase:
    spec: CaseSpec
    x: torch.Tensor               # [..., K] in spec.layout
    weight: torch.Tensor          # dense [N, K] before masking
    mask: torch.Tensor | None     # bool [N, K] passed to from_dense (None: weight already zero outside the pattern)
    masked_weight: torch.Tensor   # the dense weight the packed one stands for
    packed: BlockSparseWeight
    bias: torch.Tensor | None

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def op_args(self) -> tuple:
        p = self.packed
        return (self.x, p.values, p.crow_indices, p.col_indices, self.bias, self.out_features)

    def reference(self) -> torch.Tensor:
        """F.linear(x, masked_weight, bias) in float64 from the same (rounded) inputs; independent of the format."""
        bias = None if self.bias is None else self.bias.double()
        return F.linear(self.x.double(), self.masked_weight.double(), bias)


def _draw_dim(rng: random.Random, block: int) -> int:
    """A size spanning 1 to a few blocks; ragged (not a multiple of the block) about 4 times in 5."""
    blocks = rng.randint(1, max(3, 40 // block))
    return blocks * block - (rng.randint(1, block - 1) if block > 1 and rng.random() < 0.8 else 0)


def _make_input(spec: CaseSpec, k: int, rng: random.Random, gen: torch.Generator, device) -> torch.Tensor:
    lead = {1: (), 2: (rng.randint(1, 40),), 3: (rng.randint(1, 3), rng.randint(1, 13))}[spec.input_dims]

    def randn(*shape):  # drawn on the CPU generator, moved, then viewed: .to() would densify a strided view
        return torch.randn(*shape, generator=gen).to(device=device, dtype=spec.dtype)

    if spec.layout == "contiguous":
        return randn(*lead, k)
    if spec.layout == "transposed":
        return randn(k, *reversed(lead)).permute(*reversed(range(spec.input_dims)))  # [*lead, K], K stride != 1
    if spec.layout == "sliced":
        if spec.input_dims == 1:
            return randn(2 * k)[::2]
        # Every other leading row, and a K-wide window of a wider row: row stride > K without a copy.
        return randn(*lead[:-1], 2 * lead[-1], k + 3)[..., ::2, 1:1 + k]
    if spec.layout == "broadcast":
        return randn(*[1] * len(lead), k).expand(*lead, k)
    raise ValueError(f"unknown layout {spec.layout!r}")


def make_case(spec: CaseSpec, device, salt: str = "") -> BsrLinearCase:
    """A fresh random case of kind ``spec`` on ``device`` (same spec + salt + session seed: same case)."""
    name = spec.id + salt
    rng = random.Random(SEED ^ zlib.crc32(name.encode()))
    gen = generator_for(name)
    bh, bw = spec.block_size
    n, k = _draw_dim(rng, bh), _draw_dim(rng, bw)
    n_br, n_bc = -(-n // bh), -(-k // bw)
    # Exactly round(density * grid) blocks, at random places.
    grid = n_br * n_bc
    keep = torch.zeros(grid, dtype=torch.bool)
    keep[torch.randperm(grid, generator=gen)[:round(spec.density * grid)]] = True
    block_mask = keep.view(n_br, n_bc).repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]
    weight = torch.randn(n, k, generator=gen).to(spec.dtype)
    if spec.use_mask:
        # The mask also drops single entries inside kept blocks: kept blocks carry explicit zeros.
        mask = block_mask & (torch.rand(n, k, generator=gen) > 0.1)
        masked = torch.where(mask, weight, torch.zeros((), dtype=spec.dtype))
        packed = BlockSparseWeight.from_dense(weight.to(device), spec.block_size, mask=mask.to(device))
    else:
        mask = None
        weight = torch.where(block_mask, weight, torch.zeros((), dtype=spec.dtype))
        masked = weight
        packed = BlockSparseWeight.from_dense(weight.to(device), spec.block_size)
    bias = torch.randn(n, generator=gen).to(device=device, dtype=spec.dtype) if spec.bias else None
    x = _make_input(spec, k, rng, gen, device)
    return BsrLinearCase(spec, x, weight.to(device), None if mask is None else mask.to(device), masked.to(device),
                         packed, bias)


def op_calls(fn) -> tuple[dict[str, int], object]:
    """fn()'s result and how many times each op ran inside it (torch profiler events: ``"pysparse::gelu"`` -> n)."""
    with torch.autograd.profiler.profile() as prof:
        result = fn()
    return {e.key: e.count for e in prof.key_averages()}, result


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |out - ref| over max |ref| (elementwise relative error is meaningless near zero outputs)."""
    if ref.numel() == 0:
        return 0.0
    err = (out.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    return err / scale if scale > 0 else err


def concurrent_call_failures(call, inputs, refs, tol: float, rounds: int = 5) -> list[int]:
    """Calls ``call(x)`` ``rounds`` times on each input, each input from its own Python thread (per-call buffers must
    not be shared between callers; grad mode is per thread, so ``call`` sets its own). Returns the sorted indices of
    the inputs whose output was not finite or differed from its reference by more than ``tol`` times the reference's
    largest entry."""
    errors = set()

    def caller(i):
        for _ in range(rounds):
            y = call(inputs[i])
            if not bool(torch.isfinite(y).all()) or (y.double() - refs[i]).abs().max() > tol * refs[i].abs().max():
                errors.add(i)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(errors)


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """The op allocates its output, so it cannot be pre-filled with NaN: every element must be finite (inputs are)
    and the result within TOLERANCE of the float64 reference; an all-zero reference must come out exactly zero."""
    ctx = f"{what} (seed {SEED})"
    assert out.dtype == dtype, f"{ctx}: dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref.shape, f"{ctx}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert out.device.type == ref.device.type, f"{ctx}: device {out.device}, expected {ref.device}"
    finite = torch.isfinite(out)
    assert bool(finite.all()), f"{ctx}: {int((~finite).sum())} of {out.numel()} outputs are NaN/inf"
    err = relative_error(out, ref)
    assert err <= TOLERANCE[dtype], f"{ctx}: relative error {err:.3g} > {TOLERANCE[dtype]}"
