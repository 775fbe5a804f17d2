"""Pure-torch helpers on raw BSR parts (values, crow_indices, col_indices): validation and densification."""
from __future__ import annotations

import torch


def check_bsr_indices(crow_indices: torch.Tensor, col_indices: torch.Tensor, n_block_rows: int,
                      n_block_cols: int) -> None:
    """Raise ValueError unless (crow_indices, col_indices) describe a valid BSR layout.

    crow_indices: [n_block_rows + 1], starts at 0, non-decreasing, ends at len(col_indices);
    col_indices: in [0, n_block_cols), strictly increasing inside each block row. Runs on any device
    (on CUDA it synchronises once), O(number of blocks).
    """
    if crow_indices.dim() != 1 or crow_indices.numel() != n_block_rows + 1:
        raise ValueError(f"crow_indices must be 1-D with {n_block_rows + 1} entries, got shape "
                         f"{tuple(crow_indices.shape)}")
    if col_indices.dim() != 1:
        raise ValueError(f"col_indices must be 1-D, got shape {tuple(col_indices.shape)}")
    crow = crow_indices.to("cpu", torch.int64)
    col = col_indices.to("cpu", torch.int64)
    nnz = col.numel()
    if int(crow[0]) != 0:
        raise ValueError(f"crow_indices[0] must be 0, got {int(crow[0])}")
    if int(crow[-1]) != nnz:
        raise ValueError(f"crow_indices[-1] must equal the number of blocks {nnz}, got {int(crow[-1])}")
    steps = crow[1:] - crow[:-1]
    if bool((steps < 0).any()):
        r = int(torch.nonzero(steps < 0)[0])
        raise ValueError(f"crow_indices must be non-decreasing, got crow_indices[{r}]={int(crow[r])} > "
                         f"crow_indices[{r + 1}]={int(crow[r + 1])}")
    if nnz == 0:
        return
    if bool((col < 0).any()) or bool((col >= n_block_cols).any()):
        b = int(torch.nonzero((col < 0) | (col >= n_block_cols))[0])
        raise ValueError(f"col_indices[{b}]={int(col[b])} is out of range [0, {n_block_cols})")
    row_of_block = torch.repeat_interleave(torch.arange(n_block_rows), steps)
    same_row = row_of_block[1:] == row_of_block[:-1]
    bad = same_row & (col[1:] <= col[:-1])
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0]) + 1
        raise ValueError(f"col_indices must be strictly increasing within a block row, got {int(col[b - 1])} "
                         f"then {int(col[b])} in block row {int(row_of_block[b])}")


def bsr_to_dense(values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                 shape: tuple[int, int]) -> torch.Tensor:
    """Dense ``[N, K]`` weight from BSR parts (padding beyond ``shape`` is cut off)."""
    nnz, bh, bw = values.shape
    n, k = shape
    n_block_rows, n_block_cols = -(-n // bh), -(-k // bw)
    crow = crow_indices.to(values.device, torch.int64)
    rows = torch.repeat_interleave(torch.arange(n_block_rows, device=values.device), crow[1:] - crow[:-1])
    blocks = torch.zeros(n_block_rows, n_block_cols, bh, bw, dtype=values.dtype, device=values.device)
    blocks[rows, col_indices.to(values.device, torch.int64)] = values
    dense = blocks.permute(0, 2, 1, 3).reshape(n_block_rows * bh, n_block_cols * bw)
    return dense[:n, :k]
