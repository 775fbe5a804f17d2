"""Masks from importance scores: group scores per pattern (unstructured, block, N:M, channel) and exact selection.

A weight of any rank >= 2 is seen as its ``[out, in]`` matrix view: ``[N, K]`` for Linear, ``[O, kh*kw*I]`` for
Conv (tap-major, pysparse._weight_layout: the view SparseConv2d packs, so block masks pack exactly). Groups are
single entries (unstructured, nm), ``(bh, bw)`` tiles of that view with ragged tiles at the edges (block), or whole
output rows / conv filters (channel).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch

from .._validate import as_pair, check_tensor
from .._weight_layout import weight_from_matrix, weight_matrix

PATTERNS = ("unstructured", "block", "nm", "channel")
NORMS = ("l1", "l2")

__all__ = ["magnitude_mask", "PATTERNS", "NORMS"]


# ---- argument checks ----------------------------------------------------------------------------------------------
def check_amount(sparsity, threshold) -> None:
    """Exactly one of ``sparsity`` (in [0, 1]) and ``threshold`` (>= 0) must be given."""
    if (sparsity is None) == (threshold is None):
        got = "both" if sparsity is not None else "neither"
        raise ValueError(f"exactly one of sparsity or threshold must be given, got {got}")
    if sparsity is not None:
        check_sparsity("sparsity", sparsity)
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, Real):
            raise TypeError(f"threshold must be a real number, got {type(threshold).__name__}")
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")


def check_sparsity(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def check_pattern(pattern: str, block_size, nm) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(block_size, nm)`` as pairs of ints once ``pattern`` is known; ValueError/TypeError naming the argument."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    block = as_pair("block_size", block_size)
    n, m = as_pair("nm", nm)
    if n > m:
        raise ValueError(f"nm=(N, M) needs N <= M (keep N of every M inputs), got {(n, m)}")
    return block, (n, m)


def matrix_view(weight: torch.Tensor) -> torch.Tensor:
    """The ``[out, in]`` view every pattern is defined on (Conv ``[O, I, kh, kw]`` -> ``[O, kh*kw*I]``)."""
    return weight_matrix(weight)


def pattern_fits(shape: torch.Size, pattern: str, block_size: tuple[int, int], nm: tuple[int, int]) -> bool:
    """Whether ``pattern`` can be formed on a weight of ``shape`` (a block must fit in the matrix view)."""
    rows, cols = shape[0], math.prod(shape[1:])
    if pattern == "block":
        return block_size[0] <= rows and block_size[1] <= cols
    if pattern == "nm":
        return nm[1] <= cols
    return True


# ---- groups -------------------------------------------------------------------------------------------------------
@dataclass
class Groups:
    """One weight's prunable groups: a norm and a size (entries) per group, flat in row-major group order.

    ``forced`` marks groups the pattern itself prunes whatever the amount (the smallest M - N of every M for N:M).
    """

    norms: torch.Tensor      # [G] float
    sizes: torch.Tensor      # [G] int64
    forced: torch.Tensor     # [G] bool
    shape: torch.Size        # the weight's shape
    pattern: str
    block_size: tuple[int, int]

    def to_mask(self, pruned: torch.Tensor) -> torch.Tensor:
        """Entry-wise keep mask (True = keep) of the weight's shape from a flat [G] pruned-group flag."""
        keep = ~pruned
        rows, cols = self.shape[0], math.prod(self.shape[1:])
        if self.pattern == "block":
            bh, bw = self.block_size
            grid = keep.reshape(-(-rows // bh), -(-cols // bw))
            keep = grid.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:rows, :cols]
        elif self.pattern == "channel":
            keep = keep[:, None].expand(rows, cols)
        return weight_from_matrix(keep.reshape(rows, cols), self.shape).contiguous()


def group_scores(scores: torch.Tensor, *, norm: str, pattern: str, block_size: tuple[int, int],
                 nm: tuple[int, int]) -> Groups:
    """Group norms of entry-wise importance ``scores`` (``|weight|`` for magnitude pruning). Arguments pre-checked."""
    if not torch.isfinite(scores).all():
        raise ValueError("weight (or importance scores) contains NaN or inf; cannot rank it")
    mat = matrix_view(scores.detach()).abs()
    mat = mat.double() if mat.dtype == torch.float64 else mat.float()
    rows, cols = mat.shape
    if not pattern_fits(scores.shape, pattern, block_size, nm):
        what = f"block_size {block_size}" if pattern == "block" else f"nm={nm} (M inputs per group)"
        raise ValueError(f"{what} is larger than the weight's [{rows}, {cols}] matrix view "
                         f"(weight shape {tuple(scores.shape)})")
    power = 1 if norm == "l1" else 2
    if pattern == "block":
        bh, bw = block_size
        n_br, n_bc = -(-rows // bh), -(-cols // bw)
        padded = mat.new_zeros(n_br * bh, n_bc * bw)
        padded[:rows, :cols] = mat
        tiles = padded.reshape(n_br, bh, n_bc, bw)
        norms = tiles.pow(power).sum(dim=(1, 3)).pow(1.0 / power).flatten()
        r_sizes = torch.full((n_br,), bh, dtype=torch.int64)
        r_sizes[-1] = rows - (n_br - 1) * bh
        c_sizes = torch.full((n_bc,), bw, dtype=torch.int64)
        c_sizes[-1] = cols - (n_bc - 1) * bw
        sizes = (r_sizes[:, None] * c_sizes[None, :]).flatten()
    elif pattern == "channel":
        norms = mat.pow(power).sum(dim=1).pow(1.0 / power)
        sizes = torch.full((rows,), cols, dtype=torch.int64)
    else:  # unstructured and nm: single entries, whose L1 and L2 norms are both |score|
        norms = mat.flatten()
        sizes = torch.ones(rows * cols, dtype=torch.int64)
    forced = _nm_forced(mat, nm) if pattern == "nm" else torch.zeros(norms.numel(), dtype=torch.bool)
    dev = norms.device
    return Groups(norms, sizes.to(dev), forced.to(dev), scores.shape, pattern, block_size)


def _nm_forced(mat: torch.Tensor, nm: tuple[int, int]) -> torch.Tensor:
    """Entries outside the N largest of each run of M consecutive inputs (a ragged last run keeps up to N)."""
    n, m = nm
    rows, cols = mat.shape
    runs = -(-cols // m)
    # Padding sorts first and takes the pruned slots of a ragged last run, so that run keeps up to N real inputs.
    padded = mat.new_full((rows, runs * m), -math.inf)
    padded[:, :cols] = mat
    grouped = padded.reshape(rows * runs, m)
    # Stable ascending sort: among equal scores the earlier input is pruned first (deterministic ties).
    order = torch.sort(grouped, dim=1, stable=True).indices
    pruned = torch.zeros_like(grouped, dtype=torch.bool)
    pruned.scatter_(1, order[:, : m - n], True)
    pruned &= torch.isfinite(grouped)
    return pruned.reshape(rows, runs * m)[:, :cols].flatten()


# ---- selection ----------------------------------------------------------------------------------------------------
def pruning_order(scores: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Group indices in the order they are pruned: the ``forced`` groups, then the others by ascending score.

    Ties are broken by position (the lower flat index is pruned first), so the result is deterministic.
    """
    return torch.sort(scores.masked_fill(forced, -math.inf), stable=True).indices


def first_pruned(order: torch.Tensor, count: int) -> torch.Tensor:
    """Flat pruned flags of the first ``count`` groups of ``order``."""
    pruned = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
    pruned[order[:count]] = True
    return pruned


def min_sparsity(groups: Groups) -> float:
    """The fraction of groups the pattern prunes by itself (1 - N/M for N:M; 0 for the other patterns)."""
    return int(groups.forced.sum()) / max(groups.norms.numel(), 1)


def select(groups: Groups, *, sparsity: float | None = None, threshold: float | None = None) -> torch.Tensor:
    """Flat pruned flags for one weight: ``round(sparsity * G)`` groups exactly, or groups with norm < threshold."""
    if threshold is not None:
        return groups.forced | (groups.norms < threshold)
    total = groups.norms.numel()
    count = round(sparsity * total)
    floor = int(groups.forced.sum())
    if count < floor:
        raise ValueError(f"sparsity must be >= {floor / total:.4g} for this N:M pattern (it prunes {floor} of "
                         f"{total} entries by itself), got {sparsity}")
    return first_pruned(pruning_order(groups.norms, groups.forced), count)


def magnitude_mask(weight: torch.Tensor, *, sparsity: float | None = None, threshold: float | None = None,
                   norm: str = "l1", pattern: str = "unstructured", block_size=(32, 32), nm=(2, 4)) -> torch.Tensor:
    """Keep-mask (True = keep) of ``weight``'s shape that prunes its lowest-norm groups.

    Args:
        weight: Linear ``[N, K]`` or Conv ``[O, I, *kernel]`` weight; patterns act on its ``[O, I*kh*kw]`` view.
        sparsity: fraction of groups to prune; exactly ``round(sparsity * groups)`` are pruned, ties broken by
            position (the earlier group in row-major order goes first).
        threshold: instead of ``sparsity``, prune every group whose norm is strictly below it.
        norm: ``"l1"`` (sum of |w|) or ``"l2"`` (Euclidean) norm of each group; for single-entry groups
            (unstructured, nm) both are |w| and give the same mask.
        pattern: ``"unstructured"`` (entries), ``"block"`` (``block_size`` tiles, ragged at the edges; a tile's
            norm counts only the entries it covers), ``"nm"`` (at most N kept in every M consecutive inputs of
            a row; ``sparsity`` counts entries and must be at least what N:M prunes by itself, e.g. 0.5 for
            2:4, which is then exact 2:4; more prunes the lowest survivors too) or ``"channel"`` (whole output
            rows / conv filters).
        block_size: ``(bh, bw)`` or an int, for ``pattern="block"``; must fit in the matrix view.
        nm: ``(N, M)`` for ``pattern="nm"``, ``N <= M``.
    Returns:
        bool tensor of ``weight.shape`` on ``weight``'s device.
    """
    check_tensor("weight", weight)
    if weight.dim() < 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor with >= 2 dims (Linear or Conv weight), got "
                         f"{weight.dtype} of shape {tuple(weight.shape)}")
    check_amount(sparsity, threshold)
    check_norm(norm)
    block_size, nm = check_pattern(pattern, block_size, nm)
    groups = group_scores(weight, norm=norm, pattern=pattern, block_size=block_size, nm=nm)
    return groups.to_mask(select(groups, sparsity=sparsity, threshold=threshold))
