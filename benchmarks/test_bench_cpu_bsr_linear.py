"""pytest-benchmark suite for the CPU ``bsr_linear``: issue 7's target cases, pysparse beside dense ``F.linear``.

    pytest benchmarks/test_bench_cpu_bsr_linear.py --benchmark-group-by=param:case --benchmark-columns=median,ops

Each case is one group holding a "pysparse" and a "dense" entry (and "torch_bsr" for the M=1 case), so the
ratio is read off one table. Results are checked against the dense reference before anything is timed.
The full sweep with ratios and GFLOP/s printed is ``python benchmarks/bench_cpu_bsr_linear.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench_cpu_bsr_linear import block_sparse_weight
from pysparse.bench.check import LAYER_TOLERANCE, rel_err
from pysparse.ops import bsr_linear, kernel_layout

# (K, N, block, sparsity, M, dtype)
CASES = {
    "768->3072 32x32 90% M=128": (768, 3072, 32, 0.9, 128, torch.float32),
    "768->3072 32x32 90% M=1": (768, 3072, 32, 0.9, 1, torch.float32),
    "768->3072 32x32 50% M=32": (768, 3072, 32, 0.5, 32, torch.float32),
    "768->3072 16x16 90% M=128": (768, 3072, 16, 0.9, 128, torch.float32),
    "768->3072 64x64 90% M=128": (768, 3072, 64, 0.9, 128, torch.float32),
    "768->3072 32x32 90% M=128 bf16": (768, 3072, 32, 0.9, 128, torch.bfloat16),
}
_cache = {}


def _setup(case):
    if case not in _cache:
        k, n, block, sparsity, m, dtype = CASES[case]
        weight, packed = block_sparse_weight(n, k, block, sparsity, dtype)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(m, k, generator=gen).to(dtype)
        bias = torch.randn(n, generator=gen).to(dtype)
        _cache[case] = (weight, packed, x, bias, n, block)
    return _cache[case]


@pytest.mark.parametrize("impl", ["pysparse", "dense", "torch_bsr"])
@pytest.mark.parametrize("case", list(CASES))
def test_bsr_linear_cpu(benchmark, case, impl):
    weight, packed, x, bias, n, block = _setup(case)
    if impl == "pysparse":
        values = kernel_layout(packed.values)  # as SparseLinear keeps it
        fn = lambda: bsr_linear(x, values, packed.crow_indices, packed.col_indices, bias, n,  # noqa: E731
                                check_indices=False)
    elif impl == "dense":
        fn = lambda: F.linear(x, weight, bias)  # noqa: E731
    else:
        if x.shape[0] != 1 or x.dtype != torch.float32:
            pytest.skip("torch sparse_bsr is timed at M=1 float32 only here (it takes seconds at large M)")
        w_bsr = weight.to_sparse_bsr((block, block))
        fn = lambda: F.linear(x, w_bsr, bias)  # noqa: E731
    ref = F.linear(x.double(), weight.double(), bias.double())
    assert rel_err(fn(), ref) < LAYER_TOLERANCE[x.dtype]
    benchmark.extra_info.update(case=case, impl=impl, useful_gflop=2 * x.shape[0] * packed.values.numel() / 1e9)
    benchmark(fn)
