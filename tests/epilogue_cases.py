"""Cases shared by the fused-epilogue tests (activations, residuals): shapes that reach every CPU kernel, and
convolutions that take every SparseConv2d path."""
from __future__ import annotations

import torch
from torch import nn

from conftest import CaseSpec
from pysparse.bench.sweep import block_mask

# M = 1..4 (dot product), 5..63 (outer product), >= 64 (broadcast), 500 (the outer product's tile-major order on
# AVX-512), with ragged N and K and block sizes that do not divide them.
ROWS = [1, 3, 4, 37, 64, 203, 500]
SPECS = [CaseSpec(block, density, dtype, dims, bias, layout, use_mask)
         for block, density, dtype, dims, bias, layout, use_mask in [
             ((32, 32), 0.3, torch.float32, 2, True, "contiguous", False),
             ((16, 16), 0.5, torch.float32, 3, False, "sliced", True),
             ((8, 24), 0.7, torch.float32, 2, True, "transposed", False),
             ((5, 7), 0.5, torch.float32, 1, True, "sliced", False),
             ((64, 64), 1.0, torch.float32, 2, True, "contiguous", True),
             ((32, 32), 0.4, torch.bfloat16, 2, True, "contiguous", False),
             ((16, 8), 0.6, torch.float16, 3, True, "contiguous", False),
         ]]

# (conv geometry, gradients wanted): one per SparseConv2d path.
CONV_PATHS = [
    (dict(c_in=64, k=1), False),                          # 1x1 stride 1: a direct bsr_linear over channels
    (dict(c_in=64, k=1, stride=2), False),                # strided 1x1: a strided view
    (dict(c_in=64, k=3, padding=1), False),               # implicit im2col (the fused conv kernel)
    (dict(c_in=64, k=3, stride=2, dilation=2), False),    # implicit, strided and dilated
    (dict(c_in=48, k=3, padding=1), False),               # bw does not divide C: im2col
    (dict(c_in=64, k=3, padding=1), True),                # gradients wanted: im2col + torch epilogue
]


def sparse_conv(c_in: int, c_out: int, k: int, seed: int, **kw) -> nn.Conv2d:
    """A dense nn.Conv2d with 75% of the 32x32 blocks of its tap-major [O, kh*kw*I] view zeroed."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, **kw)
    with torch.no_grad():
        m = block_mask(c_out, k * k * c_in, (32, 32), 0.75, torch.Generator().manual_seed(seed))
        conv.weight.mul_(m.reshape(c_out, k, k, c_in).permute(0, 3, 1, 2))
    return conv
