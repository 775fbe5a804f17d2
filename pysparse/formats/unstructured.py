"""UnstructuredSparseWeight: a [out_features, in_features] weight with any pattern of zeros (block size 1x1), stored
in the order pysparse's unstructured CPU kernel walks it."""
from __future__ import annotations

import torch

from .._validate import check_tensor
from .packed import PackedWeight

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Column-block widths of the format (kUnstructuredBlockCols .. kUnstructuredBlockColsWidest in
# csrc/cpu/kernels/unstructured_linear.h); the first is the default.
BLOCK_WIDTHS = (128, 256, 512)
BLOCK_COLS = BLOCK_WIDTHS[0]


def n_column_blocks(in_features: int, block_cols: int = BLOCK_COLS) -> int:
    return -(-in_features // block_cols)


def _either(options) -> str:
    """'a, b or c'."""
    words = [str(o) for o in options]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def block_cols_of(in_features: int, n_blocks: int) -> int | None:
    """The column-block width of a weight with ``in_features`` columns cut into ``n_blocks`` blocks: the width of
    :data:`BLOCK_WIDTHS` with ``ceil(in_features / width) == n_blocks`` (the narrowest where several give the count,
    which then describe the same blocks), None where none does."""
    for width in BLOCK_WIDTHS:
        if n_column_blocks(in_features, width) == n_blocks:
            return width
    return None


def entry_segments(segment_ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """The segment (``block * N + row``, int64, on ``segment_ptr``'s device) of each of the ``nnz`` entries."""
    ptr = segment_ptr.to(torch.int64)
    segments = torch.arange(ptr.numel() - 1, device=ptr.device)
    return torch.repeat_interleave(segments, ptr[1:] - ptr[:-1], output_size=nnz)


def unstructured_to_dense(values: torch.Tensor, columns: torch.Tensor, segment_ptr: torch.Tensor,
                          shape: tuple[int, int]) -> torch.Tensor:
    """Dense ``[N, K]`` weight from the parts of an :class:`UnstructuredSparseWeight`."""
    n, k = shape
    dense = values.new_zeros(n, k)
    if n:
        rows = entry_segments(segment_ptr, values.numel()) % n
        dense[rows, columns.to(torch.int64)] = values
    return dense


class UnstructuredSparseWeight(PackedWeight):
    """Unstructured sparse weight ``W [N, K]``: every nonzero kept on its own, nothing padded.

    Column-blocked CSR: the columns are cut into blocks of ``block_cols`` (128, 256 or 512), and segment
    ``(b, n) = b * N + n`` holds row ``n``'s nonzeros in column block ``b``: entries
    ``segment_ptr[b * N + n] .. segment_ptr[b * N + n + 1]`` of ``values`` (float) and ``columns`` (int32, global
    column indices, increasing within a segment). ``segment_ptr`` (int32) has ``ceil(K / block_cols) * N + 1``
    entries: its length fixes the width, which is not stored apart.

    Why this layout: the kernel multiplies a tile of tokens at a time (x packed K-major, 64 tokens on AVX-512), and
    every nonzero costs one load of x from that tile: one column block of it (32 KB) must stay in L1 while all the
    rows of a thread's share walk it, so each row's nonzeros are stored per column block, in the order the kernel
    reads them (see ``csrc/cpu/kernels/unstructured_linear.h``). Wider blocks make fewer, longer segments, which the
    kernel runs faster at high sparsity on some CPUs; the layers pick the width for the machine
    (:func:`pysparse.ops.kernel_block_cols`). Build with :meth:`from_dense`; the constructor
    validates.
    """

    _index_names = ("columns", "segment_ptr")

    def __init__(self, values: torch.Tensor, columns: torch.Tensor, segment_ptr: torch.Tensor,
                 shape: tuple[int, int]):
        self.values = values
        self.columns = columns
        self.segment_ptr = segment_ptr
        self.shape = (int(shape[0]), int(shape[1]))
        self.validate()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None, *,
                   block_cols: int = BLOCK_COLS) -> UnstructuredSparseWeight:
        """Pack ``weight [N, K]``, keeping its nonzero entries, or the entries ``mask`` (bool or 0/1, ``weight``'s
        shape) keeps: entries it drops are left out, entries it keeps are stored even when they are 0.
        ``block_cols``: the column-block width, one of :data:`BLOCK_WIDTHS`."""
        keep = cls.kept_entries(weight, mask)
        if isinstance(block_cols, bool) or not isinstance(block_cols, int):
            raise TypeError(f"block_cols must be an int, got {type(block_cols).__name__}")
        if block_cols not in BLOCK_WIDTHS:
            raise ValueError(f"block_cols must be one of {BLOCK_WIDTHS}, got {block_cols}")
        n, k = weight.shape
        rows, cols = torch.nonzero(keep, as_tuple=True)  # row-major
        block = cols // block_cols
        order = torch.sort(block, stable=True).indices  # block-major; rows, then columns, in order within a block
        rows, cols, block = rows[order], cols[order], block[order]
        counts = torch.bincount(block * n + rows, minlength=n_column_blocks(k, block_cols) * n)
        segment_ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=weight.device)
        segment_ptr[1:] = torch.cumsum(counts, 0)
        return cls(weight[rows, cols].contiguous(), cols.to(torch.int32), segment_ptr.to(torch.int32), (n, k))

    @staticmethod
    def kept_entries(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The bool ``[N, K]`` mask of the entries :meth:`from_dense` keeps (``weight``'s nonzeros, or what ``mask``
        keeps), after checking both."""
        check_tensor("weight", weight, dims=2, dtypes=_FLOAT_DTYPES)
        if mask is None:
            return weight != 0
        check_tensor("mask", mask, shape=tuple(weight.shape))
        return mask.to(device=weight.device, dtype=torch.bool)

    def to_dense(self) -> torch.Tensor:
        """Dense ``[N, K]`` weight: kept entries exactly, zeros elsewhere."""
        return unstructured_to_dense(self.values, self.columns, self.segment_ptr, self.shape)

    def to_torch_sparse(self) -> torch.Tensor:
        """``torch.sparse_csr`` tensor of the same matrix (torch's own sparse path, for comparisons)."""
        return self.to_dense().to_sparse_csr()

    @property
    def block_cols(self) -> int:
        """The column-block width (128, 256 or 512), fixed by ``segment_ptr``'s length."""
        n, k = self.shape
        return (block_cols_of(k, (self.segment_ptr.numel() - 1) // n) if n else None) or BLOCK_COLS

    @property
    def nnz(self) -> int:
        """Kept entries."""
        return int(self.values.numel())

    @property
    def density(self) -> float:
        """Fraction of the ``N x K`` entries that are kept (1.0 = dense)."""
        total = self.shape[0] * self.shape[1]
        return self.nnz / total if total else 0.0

    def __repr__(self) -> str:
        return (f"UnstructuredSparseWeight(shape={self.shape}, density={self.density:.3f}, dtype={self.dtype}, "
                f"device={self.device})")

    def validate(self) -> None:
        """Raise ValueError/TypeError if shapes, dtypes or indices are malformed. O(nnz + segments); on CUDA it
        synchronises."""
        n, k = self.shape
        if n < 0 or k < 0:
            raise ValueError(f"shape must be non-negative, got {self.shape}")
        check_tensor("values", self.values, dims=1, dtypes=_FLOAT_DTYPES)
        check_tensor("columns", self.columns, dims=1, dtypes=(torch.int32,))
        check_tensor("segment_ptr", self.segment_ptr, dims=1, dtypes=(torch.int32,))
        for name, t in (("columns", self.columns), ("segment_ptr", self.segment_ptr)):
            if t.device != self.values.device:
                raise ValueError(f"{name} must be on the values' device {self.values.device}, got {t.device}")
        nnz = self.values.numel()
        if nnz >= 2**31 or k >= 2**31:
            raise ValueError(f"at most 2^31 - 1 entries and in_features are supported (int32), got {nnz} and {k}")
        if self.columns.numel() != nnz:
            raise ValueError(f"columns must have one entry per value ({nnz}), got {self.columns.numel()}")
        entries = self.segment_ptr.numel()
        allowed = list(dict.fromkeys(n_column_blocks(k, w) * n + 1 for w in BLOCK_WIDTHS))  # by width, once each
        if entries not in allowed:
            raise ValueError(f"segment_ptr must have ceil(K / w) * N + 1 entries for a column-block width w of "
                             f"{_either(BLOCK_WIDTHS)} ({_either(allowed)} for shape {self.shape}), got {entries}")
        width = self.block_cols
        ptr = self.segment_ptr.to("cpu", torch.int64)
        if int(ptr[0]) != 0:
            raise ValueError(f"segment_ptr[0] must be 0, got {int(ptr[0])}")
        if bool((ptr[1:] < ptr[:-1]).any()):
            s = int(torch.nonzero(ptr[1:] < ptr[:-1])[0])
            raise ValueError(f"segment_ptr must be non-decreasing, got segment_ptr[{s}]={int(ptr[s])} > "
                             f"segment_ptr[{s + 1}]={int(ptr[s + 1])}")
        if int(ptr[-1]) != nnz:
            raise ValueError(f"segment_ptr[-1] must equal the number of values {nnz}, got {int(ptr[-1])}")
        if nnz == 0:
            return
        cols = self.columns.to("cpu", torch.int64)
        seg = entry_segments(ptr, nnz)
        first = (seg // n) * width
        outside = (cols < first) | (cols >= torch.clamp(first + width, max=k))
        if bool(outside.any()):
            i = int(torch.nonzero(outside)[0])
            b = int(seg[i]) // n
            raise ValueError(f"columns[{i}]={int(cols[i])} lies outside its column block {b} "
                             f"([{b * width}, {min(k, (b + 1) * width) - 1}])")
        bad = (seg[1:] == seg[:-1]) & (cols[1:] <= cols[:-1])
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0]) + 1
            raise ValueError(f"columns must strictly increase within a row's segment, got {int(cols[i - 1])} then "
                             f"{int(cols[i])} in row {int(seg[i]) % n}")
