"""A small run of every CUDA bsr_linear path, for `compute-sanitizer --tool memcheck` (gpu_check.sh).

Ragged shapes make the kernels' bounds checks matter: out-of-range tokens, padded block rows and columns.
"""
import os

import torch

from pysparse import ops
from pysparse.formats import BlockSparseWeight

torch.manual_seed(0)
cases = [  # (M, N, K, block, dtype): small-M, large-M for bh 16/32/64, generic
    (3, 72, 48, (8, 16), torch.bfloat16), (13, 100, 136, (64, 64), torch.float16),
    (130, 90, 136, (16, 16), torch.bfloat16), (129, 70, 72, (32, 32), torch.float16),
    (131, 130, 200, (64, 64), torch.bfloat16), (37, 50, 45, (5, 7), torch.float32),
    (1100, 2048, 128, (64, 64), torch.bfloat16),  # more tiles than CTAs resident at once: several waves
]
worst = 0.0
# every large-M kernel and token tile too (the launcher's own choice first, then each one forced)
runs = [(c, None) for c in cases] + [(c, t) for t in ("64", "128", "wg128", "wg256") for c in cases if c[0] > 16]
for (m, n, k, block, dtype), tile in runs:
    os.environ.pop("PYSPARSE_CUDA_TILE_M", None)
    if tile:
        os.environ["PYSPARSE_CUDA_TILE_M"] = tile
    w = torch.randn(n, k, device="cuda").to(dtype)
    mask = torch.rand(n, k, device="cuda") < 0.5
    bsw = BlockSparseWeight.from_dense(w, block, mask=mask)
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    y = ops.bsr_linear(x, bsw.values, bsw.crow_indices, bsw.col_indices, bias, n)
    ref = torch.nn.functional.linear(x.double(), bsw.to_dense().double(), bias.double())
    worst = max(worst, ((y.double() - ref).norm() / ref.norm()).item())
torch.cuda.synchronize()
print(f"sanitizer case: {len(runs)} calls, worst rel err {worst:.2e}")
