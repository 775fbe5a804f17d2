"""The CPU backward ops of ``bsr_linear`` (float32; bfloat16 natively on AMX where the CPU has it; other 16-bit
gradients through widened copies inside the ops):
``pysparse::bsr_linear_grad_input`` (``grad_y @ W`` over the packed weight), ``pysparse::bsr_linear_grad_values``
(``grad_y^T @ x`` on the kept blocks only) and ``pysparse::bsr_column_index`` (the blocks listed by block column,
which grad_input walks), called through the per-layout cache of the column index. The autograd of ``bsr_linear`` and
the ops' fake kernels live with the op in :mod:`.bsr_linear_op`, which calls these where :func:`grad_kernels_apply`.
"""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loading the library registers torch.ops.pysparse.*)
from .layer_support import LayoutCache

__all__ = ["bsr_linear_grad_input", "bsr_linear_grad_values", "column_index", "grad_kernels_apply"]

# Built once per weight layout (crow_indices, col_indices); see LayoutCache.
_COLUMN_INDEX = LayoutCache(lambda crow_indices, col_indices, n_block_cols:
                            torch.ops.pysparse.bsr_column_index.default(crow_indices, col_indices, n_block_cols))


# The ops take all three: bfloat16 runs on AMX tiles where the CPU path has them (blocks of 16-multiples dividing the
# layer); otherwise 16-bit gradients run the float32 kernels on widened copies (O(M (N + K)) conversions against the
# products' density x M N K multiply-adds; float32 accumulation, as the dense 16-bit GEMMs do), rounded back once.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grad_kernels_apply(grad: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the backward of ``bsr_linear`` runs on these kernels: CPU, float32 (16-bit floats through float32)."""
    return grad.device.type == "cpu" and values.dtype in _KERNEL_DTYPES and grad.dtype == values.dtype


def column_index(crow_indices: torch.Tensor, col_indices: torch.Tensor, n_block_cols: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(col_ptr [n_block_cols + 1], entries [nnz, 2])`` of a BSR weight (int32 indices on the CPU): the blocks of
    block column ``c`` are ``entries[col_ptr[c]:col_ptr[c + 1]]`` as (block row, block id), by increasing row.

    Built once per weight layout and cached (rebuilt when an index tensor changes); under ``torch.compile`` the op
    is traced instead (it is O(nnz), small next to the product)."""
    return _COLUMN_INDEX(crow_indices, col_indices, n_block_cols)


def bsr_linear_grad_input(grad: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                          col_indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """``grad [..., N] @ W`` -> ``[..., in_features]``, W the BSR weight (``values`` row-major or block-transposed)."""
    n_block_cols = -(-in_features // values.shape[2])
    col_ptr, entries = column_index(crow_indices, col_indices, n_block_cols)
    return torch.ops.pysparse.bsr_linear_grad_input.default(grad, values, col_ptr, entries, in_features)


def bsr_linear_grad_values(grad: torch.Tensor, input: torch.Tensor, values: torch.Tensor,
                           crow_indices: torch.Tensor, col_indices: torch.Tensor, with_bias: bool = False):
    """``grad^T @ input`` on the kept blocks: ``[nnz, bh, bw]`` in ``values``' layout (entries over padding 0).
    ``with_bias``: ``(that, grad's column sums [N])``, the bias gradient summed in float32 by the kernel from the grad
    rows it reads anyway (by torch's sum on the AMX bfloat16 path)."""
    if with_bias:
        return torch.ops.pysparse.bsr_linear_grad_values_bias.default(grad, input, values, crow_indices, col_indices)
    return torch.ops.pysparse.bsr_linear_grad_values.default(grad, input, values, crow_indices, col_indices)
