"""Backward of ``pysparse::bsr_linear`` (registered with ``torch.library.register_autograd``).

For ``y = x @ W^T + b`` with ``W [N, K]`` block-sparse (``values [nnz, bh, bw]``, BSR indices):

* ``grad_x = grad_y @ W``: a ``bsr_linear`` with ``W^T`` in BSR form. ``W^T`` is rebuilt from the saved
  parts on every backward with torch ops (a sort of ``nnz`` keys and one copy of the kept values): that is
  O(nnz * bh * bw), against O(M * nnz * bh * bw) for the product itself, and it stays correct when the values
  are being trained, which a cache keyed on the tensors would have to track.
* ``grad_values[b] = grad_y[:, rows(b)]^T @ x[:, cols(b)]`` for the kept blocks only: batched GEMMs over
  gathered block slices, in chunks that bound the temporary memory; no dense ``[N, K]`` gradient is formed.
  Entries of a block that overhang a ragged edge get gradient 0 (the kernels never read them).
* ``grad_bias = grad_y`` summed over the leading dimensions.

Everything here is traceable (static shapes, no ``.item()``), so ``torch.compile`` captures the backward too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _C  # noqa: F401  (registers torch.ops.pysparse.*)

__all__ = ["bsr_linear_autograd", "transpose_bsr"]

# Upper bound on the gathered temporaries of one grad_values chunk (grad_y and x slices).
_GATHER_BYTES = 64 << 20


def _block_rows(crow_indices: torch.Tensor, nnz: int) -> torch.Tensor:
    """Block row of each stored block (int64), from crow_indices without data-dependent shapes."""
    crow = crow_indices.to(torch.int64)
    blocks = torch.arange(nnz, device=crow.device)
    return torch.searchsorted(crow[1:], blocks, right=True)


def transpose_bsr(values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor, n_block_cols: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BSR parts of ``W^T`` from those of ``W``: ``(values [nnz, bw, bh], crow_indices, col_indices)``, int32.

    ``n_block_cols`` is the number of block columns of ``W`` (block rows of ``W^T``).
    """
    nnz = values.shape[0]
    n_block_rows = crow_indices.shape[0] - 1
    rows = _block_rows(crow_indices, nnz)
    cols = col_indices.to(torch.int64)
    # Sort blocks by (column, row): the row-major order of W^T. Keys are unique, so any sort is exact.
    perm = torch.argsort(cols * n_block_rows + rows)
    values_t = values.index_select(0, perm).transpose(1, 2).contiguous()
    counts = torch.zeros(n_block_cols, dtype=torch.int64, device=cols.device)
    counts.index_add_(0, cols, torch.ones_like(cols))
    crow_t = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)
    col_t = rows.index_select(0, perm).to(torch.int32)
    return values_t, crow_t, col_t


def _values_grad(grad2: torch.Tensor, x2: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                 block_size: tuple[int, int], nnz: int) -> torch.Tensor:
    """``[nnz, bh, bw]``: for each kept block, ``grad2[:, block rows]^T @ x2[:, block cols]``."""
    bh, bw = block_size
    m, n = grad2.shape
    k = x2.shape[1]
    n_br, n_bc = crow_indices.shape[0] - 1, -(-k // bw)
    if nnz == 0 or m == 0:
        return grad2.new_zeros(nnz, bh, bw)
    # Zero-pad to whole blocks, then lay out block-major so each block's slice is one contiguous gather.
    g_blocks = F.pad(grad2, (0, n_br * bh - n)).reshape(m, n_br, bh).permute(1, 2, 0).contiguous()  # [n_br,bh,m]
    x_blocks = F.pad(x2, (0, n_bc * bw - k)).reshape(m, n_bc, bw).transpose(0, 1).contiguous()      # [n_bc,m,bw]
    rows = _block_rows(crow_indices, nnz)
    cols = col_indices.to(torch.int64)
    chunk = max(1, _GATHER_BYTES // (m * (bh + bw) * grad2.element_size()))
    parts = [torch.bmm(g_blocks.index_select(0, rows[s:s + chunk]), x_blocks.index_select(0, cols[s:s + chunk]))
             for s in range(0, nnz, chunk)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def bsr_linear_autograd(linear):
    """``(setup_context, backward)`` for an op with ``bsr_linear``'s signature.

    ``linear(input, values, crow_indices, col_indices, bias, out_features)`` computes the ``grad_y @ W`` product
    (with ``W^T`` passed as BSR): the registered backward uses ``torch.ops.pysparse.bsr_linear`` itself; tests
    pass ``pysparse.ops.bsr_linear_reference`` to check the same formulas in float64, which the kernels lack.
    """

    def setup_context(ctx, inputs, output):
        input, values, crow_indices, col_indices, bias, out_features = inputs
        ctx.in_features = input.shape[-1]
        ctx.out_features = out_features
        ctx.block_size = (values.shape[1], values.shape[2])
        ctx.nnz = values.shape[0]
        # Keep only what the requested gradients need: x for grad_values, the values for grad_input.
        needs_input, needs_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(input if needs_values else None, values if needs_input else None,
                              crow_indices, col_indices)

    def backward(ctx, grad):
        input, values, crow_indices, col_indices = ctx.saved_tensors
        grad_input = grad_values = grad_bias = None
        k, n = ctx.in_features, ctx.out_features
        if ctx.needs_input_grad[0]:
            n_block_cols = -(-k // ctx.block_size[1])
            values_t, crow_t, col_t = transpose_bsr(values, crow_indices, col_indices, n_block_cols)
            grad_input = linear(grad, values_t, crow_t, col_t, None, k)
        if ctx.needs_input_grad[1]:
            grad_values = _values_grad(grad.reshape(-1, n), input.reshape(-1, k), crow_indices, col_indices,
                                       ctx.block_size, ctx.nnz)
        if ctx.needs_input_grad[4]:
            grad_bias = grad.reshape(-1, n).sum(0)
        return grad_input, grad_values, None, None, grad_bias, None

    return setup_context, backward


_setup_context, _backward = bsr_linear_autograd(torch.ops.pysparse.bsr_linear.default)
torch.library.register_autograd("pysparse::bsr_linear", _backward, setup_context=_setup_context)
