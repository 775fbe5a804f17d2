"""ChannelSparseWeight: a dense layer weight of which only some output rows and input columns are kept."""
from __future__ import annotations

import torch

from .._validate import check_tensor
from .packed import PackedWeight

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _as_index(name: str, index, size: int, device) -> torch.Tensor:
    """A 1-D strictly increasing int32 index into ``range(size)``, from an int tensor/list or a bool mask."""
    if isinstance(index, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in index):
            raise TypeError(f"{name} must be a list of ints, a 1-D int tensor or a bool mask, got {index!r}")
        index = torch.tensor(index, dtype=torch.int64)
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D int tensor, a list of ints or a bool mask, got "
                        f"{type(index).__name__}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(index.shape)}")
    if index.dtype == torch.bool:
        if index.numel() != size:
            raise ValueError(f"{name} as a bool mask must have {size} entries, got {index.numel()}")
        index = torch.nonzero(index).flatten()
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be int32, int64 or bool, got {index.dtype}")
    _check_index(name, index, size)
    return index.to(device=device, dtype=torch.int32)


def _check_index(name: str, index: torch.Tensor, size: int) -> None:
    if index.numel() == 0:
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"{name} entries must lie in [0, {size}), got min {lo}, max {hi}")
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        raise ValueError(f"{name} must be strictly increasing (sorted, no repeats)")


class ChannelSparseWeight(PackedWeight):
    """Weight ``W [N, K, *kernel]`` (a Linear's ``[N, K]`` or a Conv2d's ``[N, K, kh, kw]``) that is zero outside
    the kept output rows ``out_index`` and the kept input columns ``in_index``.

    ``values [len(out_index), len(in_index), *kernel]`` holds the kept block; both indices are int32, strictly
    increasing. Construct with :meth:`from_dense`; the constructor validates.
    """

    _index_names = ("out_index", "in_index")

    def __init__(self, values: torch.Tensor, out_index: torch.Tensor, in_index: torch.Tensor, shape):
        self.values = values
        self.out_index = out_index
        self.in_index = in_index
        self.shape = tuple(int(s) for s in shape)
        self.validate()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, out_index=None, in_index=None) -> "ChannelSparseWeight":
        """Keep rows ``out_index`` and columns ``in_index`` of ``weight`` (index tensors, lists or bool masks).

        An index left as None keeps every row (column) that holds a nonzero, so a weight whose pruned channels
        were zeroed packs exactly.
        """
        check_tensor("weight", weight, dtypes=_FLOAT_DTYPES)
        if weight.dim() < 2:
            raise ValueError(f"weight must be at least 2-D [out, in, ...], got shape {tuple(weight.shape)}")
        nz = weight.detach() != 0
        if out_index is None:
            out_index = nz.flatten(1).any(1)
        if in_index is None:
            in_index = nz.transpose(0, 1).flatten(1).any(1)
        out_index = _as_index("out_index", out_index, weight.shape[0], weight.device)
        in_index = _as_index("in_index", in_index, weight.shape[1], weight.device)
        values = weight.detach().index_select(0, out_index).index_select(1, in_index).contiguous()
        return cls(values, out_index, in_index, tuple(weight.shape))

    def to_dense(self) -> torch.Tensor:
        """Dense ``W``: kept entries exactly, zeros elsewhere."""
        w = self.values.new_zeros(self.shape)
        rows = w.index_select(0, self.out_index)
        rows.index_copy_(1, self.in_index.long(), self.values)
        w.index_copy_(0, self.out_index.long(), rows)
        return w

    @property
    def density(self) -> float:
        """Fraction of the dense weight's entries that are stored."""
        n, k = self.shape[0], self.shape[1]
        return self.out_index.numel() * self.in_index.numel() / (n * k) if n * k else 0.0

    def __repr__(self) -> str:
        return (f"ChannelSparseWeight(shape={self.shape}, kept_out={self.out_index.numel()}, "
                f"kept_in={self.in_index.numel()}, dtype={self.dtype}, device={self.device})")

    def validate(self) -> None:
        """Raise ValueError/TypeError if shapes, dtypes or indices are malformed."""
        if len(self.shape) < 2 or any(s < 0 for s in self.shape):
            raise ValueError(f"shape must be [out, in, ...] with non-negative sizes, got {self.shape}")
        check_tensor("values", self.values, dims=len(self.shape), dtypes=_FLOAT_DTYPES)
        check_tensor("out_index", self.out_index, dims=1, dtypes=(torch.int32,))
        check_tensor("in_index", self.in_index, dims=1, dtypes=(torch.int32,))
        for name, t in (("out_index", self.out_index), ("in_index", self.in_index)):
            if t.device != self.values.device:
                raise ValueError(f"{name} must be on the values' device {self.values.device}, got {t.device}")
        want = (self.out_index.numel(), self.in_index.numel(), *self.shape[2:])
        if tuple(self.values.shape) != want:
            raise ValueError(f"values must have shape {want} (kept outputs, kept inputs, kernel), got "
                             f"{tuple(self.values.shape)}")
        _check_index("out_index", self.out_index, self.shape[0])
        _check_index("in_index", self.in_index, self.shape[1])
