"""BlockSparseWeight: a [out_features, in_features] weight in BSR form (torch's naming), padded at ragged edges."""
from __future__ import annotations

import torch

from .._validate import as_pair, check_tensor
from .bsr import bsr_to_dense, check_bsr_indices
from .packed import PackedWeight

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def kept_blocks(keep: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """``[ceil(N / bh), ceil(K / bw)]`` bool: which ``bh x bw`` blocks of the ``[N, K]`` bool ``keep`` hold a True
    entry (the edge blocks ragged, padded with False)."""
    bh, bw = block_size
    n, k = keep.shape
    padded = torch.nn.functional.pad(keep, (0, -k % bw, 0, -n % bh))
    return padded.reshape(padded.shape[0] // bh, bh, padded.shape[1] // bw, bw).any(dim=3).any(dim=1)


class BlockSparseWeight(PackedWeight):
    """Block-sparse weight ``W [N, K]`` stored as kept ``(bh, bw)`` blocks.

    ``values [nnz, bh, bw]`` holds the kept blocks row-major, ``crow_indices [ceil(N / bh) + 1]`` and
    ``col_indices [nnz]`` (int32) say where they sit. When N or K is not a multiple of the block size the
    last block row / column overhangs the matrix; the overhang is stored as zeros and never read or written
    by the kernels. Construct with :meth:`from_dense` or :meth:`from_torch_sparse`; the constructor validates.
    """

    _index_names = ("crow_indices", "col_indices")

    def __init__(self, values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                 shape: tuple[int, int]):
        self.values = values
        self.crow_indices = crow_indices
        self.col_indices = col_indices
        self.shape = (int(shape[0]), int(shape[1]))
        self.validate()

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, block_size=(32, 32), mask: torch.Tensor | None = None
                   ) -> "BlockSparseWeight":
        """Pack ``weight [N, K]``, keeping every block with a nonzero entry, or every block ``mask`` keeps.

        ``mask`` is a boolean (or 0/1) tensor of ``weight``'s shape: entries it drops are zeroed, and a block is
        kept when the mask keeps any entry in it (so a block mask from ``pysparse.prune`` packs exactly).
        """
        check_tensor("weight", weight, dims=2, dtypes=_FLOAT_DTYPES)
        bh, bw = as_pair("block_size", block_size)
        n, k = weight.shape
        if mask is not None:
            check_tensor("mask", mask, shape=tuple(weight.shape))
            keep = mask.to(device=weight.device, dtype=torch.bool)
            weight = torch.where(keep, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
        else:
            keep = weight != 0
        n_br, n_bc = -(-n // bh), -(-k // bw)
        padded = weight.new_zeros(n_br * bh, n_bc * bw)
        padded[:n, :k] = weight
        blocks = padded.reshape(n_br, bh, n_bc, bw).permute(0, 2, 1, 3)           # [n_br, n_bc, bh, bw]
        block_keep = kept_blocks(keep, (bh, bw))                                    # [n_br, n_bc]
        rows, cols = torch.nonzero(block_keep, as_tuple=True)                      # row-major: sorted
        values = blocks[rows, cols].contiguous()
        counts = block_keep.sum(dim=1)
        crow = torch.zeros(n_br + 1, dtype=torch.int32, device=weight.device)
        crow[1:] = torch.cumsum(counts, 0)
        return cls(values, crow, cols.to(torch.int32), (n, k))

    @classmethod
    def from_torch_sparse(cls, tensor: torch.Tensor) -> "BlockSparseWeight":
        """From a 2-D ``torch.sparse_bsr`` tensor (its shape must be a multiple of its block size)."""
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.sparse_bsr:
            got = tensor.layout if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"tensor must be a torch.sparse_bsr tensor, got {got}")
        if tensor.dim() != 2:
            raise ValueError(f"tensor must be 2-D, got {tensor.dim()}-D (batched BSR is not supported)")
        return cls(tensor.values().contiguous(), tensor.crow_indices().to(torch.int32),
                   tensor.col_indices().to(torch.int32), tuple(tensor.shape))

    # ---- conversion ---------------------------------------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """Dense ``[N, K]`` weight: kept entries exactly, zeros elsewhere."""
        return bsr_to_dense(self.values, self.crow_indices, self.col_indices, self.shape)

    def to_torch_sparse(self) -> torch.Tensor:
        """``torch.sparse_bsr`` tensor of the same matrix; ValueError for a padded weight, which torch cannot hold."""
        n, k = self.shape
        bh, bw = self.block_size
        if n % bh == 0 and k % bw == 0:
            # Explicit: the indices were validated at construction (and torch warns when this is left implicit).
            return torch.sparse_bsr_tensor(self.crow_indices.to(torch.int64), self.col_indices.to(torch.int64),
                                           self.values, size=self.shape, check_invariants=False)
        raise ValueError(f"torch.sparse_bsr needs the shape {self.shape} to be a multiple of the block size "
                         f"{self.block_size}; this weight is padded")

    # ---- properties ---------------------------------------------------------------------------------------
    @property
    def block_size(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def nnz_blocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_block_rows(self) -> int:
        return -(-self.shape[0] // self.block_size[0])

    @property
    def n_block_cols(self) -> int:
        return -(-self.shape[1] // self.block_size[1])

    @property
    def density(self) -> float:
        """Fraction of the block grid that is stored (1.0 = all blocks kept)."""
        total = self.n_block_rows * self.n_block_cols
        return self.nnz_blocks / total if total else 0.0

    def __repr__(self) -> str:
        return (f"BlockSparseWeight(shape={self.shape}, block_size={self.block_size}, "
                f"density={self.density:.3f}, dtype={self.dtype}, device={self.device})")

    # ---- validation ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError/TypeError if shapes, dtypes or indices are malformed. O(number of blocks)."""
        n, k = self.shape
        if n < 0 or k < 0:
            raise ValueError(f"shape must be non-negative, got {self.shape}")
        check_tensor("values", self.values, dims=3, dtypes=_FLOAT_DTYPES)
        check_tensor("crow_indices", self.crow_indices, dims=1, dtypes=(torch.int32,))
        check_tensor("col_indices", self.col_indices, dims=1, dtypes=(torch.int32,))
        bh, bw = self.block_size
        if bh < 1 or bw < 1:
            raise ValueError(f"block size must be at least 1x1, got {bh}x{bw}")
        for name, t in (("crow_indices", self.crow_indices), ("col_indices", self.col_indices)):
            if t.device != self.values.device:
                raise ValueError(f"{name} must be on the values' device {self.values.device}, got {t.device}")
        if self.col_indices.numel() != self.nnz_blocks:
            raise ValueError(f"col_indices must have one entry per block ({self.nnz_blocks}), got "
                             f"{self.col_indices.numel()}")
        check_bsr_indices(self.crow_indices, self.col_indices, self.n_block_rows, self.n_block_cols)
