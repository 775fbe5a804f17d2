"""Sparsity-inducing training: a penalty (alpha x group norms) that pushes whole groups toward zero, so that
pruning at a threshold gamma afterwards costs little accuracy.

Patterns and their groups, on each layer's ``[out, in]`` matrix view (:func:`mask_selection.matrix_view`):

- ``"unstructured"``: single entries, L1 (Tibshirani's lasso);
- ``"block"``: ``(bh, bw)`` tiles, ragged at the edges; ``norm="group"`` is group lasso (the L2 norm per tile,
  Wen et al. 2016), ``norm="l1"`` the L1 norm per tile (whose sum is the layer's L1: it does not prefer whole
  tiles, which is why group lasso is the default);
- ``"channel"``: whole output rows / conv filters (L2 norm per row with ``"group"``, L1 with ``"l1"``);
- ``"bn"``: the BatchNorm scales gamma, L1 (network slimming, Liu et al. 2017).

The group norms match :func:`pysparse.prune.prune_`'s (``norm="group"`` is its ``"l2"``, ``"l1"`` its ``"l1"``), so
``prune_(model, threshold=gamma, pattern=..., norm=reg.prune_norm)`` removes the groups the penalty drove below
gamma, and exactly the groups :meth:`SparsityRegularizer.proximal_step` zeroed for any gamma below the smallest
surviving group norm.
"""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._validate import as_pair
from .._weight_layout import weight_from_matrix
from .mask_holding import WeightMask, prunable_layers
from .mask_selection import matrix_view, pattern_fits

__all__ = ["REGULARIZER_NORMS", "REGULARIZER_PATTERNS", "SparsityRegularizer"]

REGULARIZER_PATTERNS = ("block", "unstructured", "channel", "bn")
REGULARIZER_NORMS = ("group", "l1")


def _check_alpha(name: str, alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real):
        raise TypeError(f"{name} must be a real number >= 0, got {type(alpha).__name__}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {alpha}")
    return float(alpha)


def _trainable(name: str, module: nn.Module) -> torch.Tensor:
    """The tensor an optimizer updates for ``module.weight``: a masked layer's original (pruned entries stay
    pruned: the mask is applied on read)."""
    if not parametrize.is_parametrized(module, "weight"):
        return module.weight
    if not all(isinstance(p, WeightMask) for p in module.parametrizations.weight):
        raise ValueError(f"layer {name!r} has weight parametrizations other than prune_'s mask "
                         f"({module.parametrizations.weight}); the proximal step cannot update it")
    return module.parametrizations.weight.original


def _tiles(mat: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """``mat`` zero-padded to whole tiles, as ``[n_row_tiles, th, n_col_tiles, tw]`` (differentiable)."""
    th, tw = tile
    rows, cols = mat.shape
    padded = nn.functional.pad(mat, (0, -cols % tw, 0, -rows % th))
    return padded.reshape(padded.shape[0] // th, th, padded.shape[1] // tw, tw)


class SparsityRegularizer:
    """``alpha x`` the sum of the chosen layers' group norms, to add to the training loss.

    Args:
        model: the model being trained (masked layers are fine: the penalty reads ``layer.weight``, the masked value).
        alpha: the penalty's strength (>= 0); settable later (``reg.alpha = ...``) to anneal it by hand.
        pattern: ``"block"``, ``"unstructured"``, ``"channel"`` or ``"bn"`` (see the module docstring).
        block_size: ``(bh, bw)`` or an int, for ``pattern="block"``; must fit in every chosen layer's matrix view.
        norm: ``"group"`` (L2 norm per group: group lasso) or ``"l1"`` (L1 norm per group). Single-entry groups
            (unstructured, bn) have one norm, |w|, whichever is given.
        filter_fn: ``filter_fn(name, module) -> bool`` picks the layers. By default the layers ``prune_`` prunes
            by default (every Linear/Conv but the output layer and those smaller than a block); for ``"bn"``,
            every affine BatchNorm layer.
        proximal: when True the training loop (``fine_tune`` / ``distill``) leaves the penalty out of the loss
            and calls :meth:`proximal_step` after each optimizer step instead (it still logs the penalty).
        alpha_schedule: ``alpha_schedule(step) -> alpha``, applied by the training loop through :meth:`update`
            before each step.
    """

    def __init__(self, model: nn.Module, *, alpha: float, pattern: str = "block", block_size=(32, 32),
                 norm: str = "group", filter_fn=None, proximal: bool = False, alpha_schedule=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.alpha = _check_alpha("alpha", alpha)
        if pattern not in REGULARIZER_PATTERNS:
            raise ValueError(f"pattern must be one of {REGULARIZER_PATTERNS}, got {pattern!r}")
        if norm not in REGULARIZER_NORMS:
            raise ValueError(f"norm must be one of {REGULARIZER_NORMS}, got {norm!r}")
        if alpha_schedule is not None and not callable(alpha_schedule):
            raise TypeError(f"alpha_schedule must be a callable(step) -> alpha, got {type(alpha_schedule).__name__}")
        self.model, self.pattern, self.norm = model, pattern, norm
        self.block_size = as_pair("block_size", block_size)
        self.proximal, self.alpha_schedule = bool(proximal), alpha_schedule
        self.layers = self._select(filter_fn)

    def _select(self, filter_fn) -> dict[str, nn.Module]:
        if self.pattern == "bn":
            layers = {n: m for n, m in self.model.named_modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
                      and (filter_fn is None or filter_fn(n, m))}
            if not layers:
                raise ValueError("no layer selected: pattern='bn' needs affine BatchNorm layers"
                                 + (" accepted by filter_fn" if filter_fn is not None else ""))
            return layers
        layers = prunable_layers(self.model, filter_fn, pattern=self.pattern, block_size=self.block_size)
        for name, module in layers.items():
            if not pattern_fits(module.weight.shape, self.pattern, self.block_size, (1, 1)):
                raise ValueError(f"block_size {self.block_size} is larger than layer {name!r}'s [out, in] matrix "
                                 f"view {tuple(matrix_view(module.weight).shape)}")
        if not layers:
            size = f" (block_size {self.block_size})" if self.pattern == "block" else ""
            raise ValueError(f"no layer selected: the default skips the output layer and layers smaller than the "
                             f"pattern{size}; pass filter_fn to choose")
        return layers

    @property
    def prune_norm(self) -> str:
        """The ``prune_`` norm that ranks groups by the norm this penalty shrinks (``"l2"`` for ``"group"``)."""
        return "l2" if self.norm == "group" and self.pattern in ("block", "channel") else "l1"

    def _matrix(self, module: nn.Module) -> torch.Tensor:
        """The penalised tensor as a matrix: the weight's ``[out, in]`` view, or BatchNorm's gamma as a column."""
        return module.weight[:, None] if self.pattern == "bn" else matrix_view(module.weight)

    def _group_shape(self, mat: torch.Tensor) -> tuple[int, int]:
        if self.pattern == "block":
            return self.block_size
        return (1, mat.shape[1]) if self.pattern == "channel" else (1, 1)

    def update(self, step: int) -> None:
        """Set ``alpha`` from ``alpha_schedule(step)`` (nothing without a schedule)."""
        if self.alpha_schedule is not None:
            self.alpha = _check_alpha(f"alpha_schedule({step})", self.alpha_schedule(step))

    def group_norms(self) -> dict[str, torch.Tensor]:
        """``{layer name: flat group norms}`` (differentiable), groups in row-major order of the matrix view."""
        ord_ = 1 if self.norm == "l1" else 2
        out = {}
        for name, module in self.layers.items():
            mat = self._matrix(module)
            out[name] = torch.linalg.vector_norm(_tiles(mat, self._group_shape(mat)), ord=ord_, dim=(1, 3)).flatten()
        return out

    def penalty(self) -> torch.Tensor:
        """``alpha x`` the sum of all chosen layers' group norms: a scalar to add to the loss."""
        return self.alpha * sum(norms.sum() for norms in self.group_norms().values())

    @torch.no_grad()
    def proximal_step(self, lr: float) -> None:
        """Soft-threshold every group by ``lr * alpha``: a group's L2 norm shrinks by that much, and a group whose
        norm is at most ``lr * alpha`` becomes exactly zero (the proximal operator of the penalty). With
        ``norm="l1"`` (a sum of |w|) the operator acts entry-wise, so a group is zero only when all its entries are.
        """
        threshold = _check_alpha("lr", lr) * self.alpha
        for name, module in self.layers.items():
            mat = self._matrix(module)
            tile = (1, 1) if self.norm == "l1" else self._group_shape(mat)
            tiles = _tiles(mat, tile)
            norms = torch.linalg.vector_norm(tiles, dim=(1, 3), keepdim=True)
            scale = torch.where(norms > threshold, 1 - threshold / norms, 0.0)
            shrunk = (tiles * scale).reshape(tiles.shape[0] * tile[0], -1)[: mat.shape[0], : mat.shape[1]]
            _trainable(name, module).copy_(weight_from_matrix(shrunk, module.weight.shape))

    def __repr__(self) -> str:
        block = f", block_size={self.block_size}" if self.pattern == "block" else ""
        return (f"SparsityRegularizer(alpha={self.alpha}, pattern={self.pattern!r}{block}, norm={self.norm!r}, "
                f"layers={list(self.layers)}, proximal={self.proximal})")
