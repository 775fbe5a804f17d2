"""The [out, in] matrix view of a weight that pruning patterns and packed formats share.

Linear weights are their own view. Conv weights [O, I, *kernel] are viewed tap-major, [O, prod(kernel) * I]:
a column block is a run of input channels at one kernel tap, which is what a channels-last (im2col) GEMM reads,
so a block pattern drawn by pysparse.prune is exactly the block pattern SparseConv2d packs.
"""
from __future__ import annotations

import torch


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` view: Linear ``[N, K]`` as is; Conv ``[O, I, kh, kw]`` -> ``[O, kh*kw*I]``."""
    if weight.dim() <= 2:
        return weight.reshape(weight.shape[0], -1)
    return weight.permute(0, *range(2, weight.dim()), 1).reshape(weight.shape[0], -1)


def weight_from_matrix(matrix: torch.Tensor, weight_shape) -> torch.Tensor:
    """Inverse of :func:`weight_matrix`: the ``[out, in]`` view back to ``weight_shape``."""
    shape = tuple(weight_shape)
    if len(shape) <= 2:
        return matrix.reshape(shape)
    o, i, *kernel = shape
    d = len(shape)
    return matrix.reshape(o, *kernel, i).permute(0, d - 1, *range(1, d - 1))
