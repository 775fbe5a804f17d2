"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning that updates the kept weights to make up for the pruned.

For a layer ``y = x W^T`` with calibration inputs ``X`` (rows: tokens / positions), SparseGPT minimises the
layer's output error ``||X W^T - X W'^T||`` over weights ``W'`` with the chosen sparsity pattern. With the Hessian
``H = X^T X`` (dampened: ``+ damp * mean(diag H) * I``) it walks the input columns left to right; each pruned entry
is set to zero and its error is spread over the row's not yet visited columns by the optimal brain surgeon (OBS)
update ``W[:, j+1:] -= (w_j - q_j) / U_jj * U[j, j+1:]``, where ``U`` is the upper Cholesky factor of ``H^-1``.
Columns are processed in lazy blocks of ``blocksize``: the update of all later columns is applied once per block
(one matrix product); inside a block the column-by-column recursion is solved as one batched triangular system
(one per M-run for N:M), which gives the same result without a Python loop over columns.

Which entries go (the mask) is chosen on the updated weights, by the OBS error of removing an entry,
``w^2 / U_jj^2``:
* unstructured and ``block``: at the start of each lazy block, over that block's columns, the lowest-error
  groups (single entries, or ``(bh, bw)`` tiles of the ``[out, in]`` matrix view scored by the sum of their
  entries' errors) are pruned; the block's share of the pruned groups is the requested sparsity (rounded
  cumulatively, so the layer loses exactly ``round(sparsity * groups)`` groups, as ``prune_`` counts them).
  A tile's score ignores what pruning its first columns does to its later ones; the update does not.
* ``nm``: when the first column of each run of M inputs is reached, the ``M - N`` lowest-error entries of every
  row's run are pruned (a ragged last run keeps up to N).

Layers are pruned sequentially in forward order: a layer's Hessian comes from the inputs it receives once the
layers before it are pruned and updated, so each layer also corrects the error of the earlier ones. Each step re-runs
the calibration batches through the model, stopping as soon as the layers being pruned have seen their input;
layers that take the very same input tensor (a transformer's query, key and value projections) share one run.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .._weight_layout import weight_from_matrix, weight_matrix
from .batches import calibration_input, call_model, input_rows
from .mask_holding import _hold, prunable_layers
from .mask_selection import check_pattern, check_sparsity

__all__ = ["SPARSEGPT_PATTERNS", "sparsegpt_"]

SPARSEGPT_PATTERNS = ("unstructured", "nm", "block")
_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


class _Seen(Exception):
    """Raised by a capture hook once every layer being pruned has seen its input: the rest of the forward is
    not needed."""


def _input_matrix(module: nn.Module, x: torch.Tensor, batch) -> torch.Tensor:
    """The layer's input as rows of its weight's matrix view: ``[R, in]`` (Conv: tap-major im2col columns)."""
    x = x.detach().float()
    if isinstance(module, nn.Linear):
        return input_rows(x, batch)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if isinstance(module, nn.Conv1d):   # as a 2-D convolution of height 1
        x, kernel, dilation, stride = x.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)          # [B, C*taps, L], channel-major
    b, _, positions = cols.shape
    taps = math.prod(kernel)
    # channel-major (c * taps + t) -> tap-major (t * C + c), the order of weight_matrix's columns
    cols = cols.reshape(b, -1, taps, positions).transpose(1, 2).reshape(b, -1, positions)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class _Hessian:
    """Running mean of ``x^T x`` over the rows a layer sees."""

    def __init__(self):
        self.h, self.rows = None, 0

    def add(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        if n == 0:
            return
        product = rows.T @ rows
        if self.h is None:
            self.h = product / n
        else:
            self.h.mul_(self.rows / (self.rows + n)).add_(product, alpha=1.0 / (self.rows + n))
        self.rows += n


def _check_args(sparsity, pattern, block_size, nm, damp, blocksize):
    check_sparsity("sparsity", sparsity)
    if pattern not in SPARSEGPT_PATTERNS:
        raise ValueError(f"pattern must be one of {SPARSEGPT_PATTERNS} for sparsegpt_, got {pattern!r}")
    block_size, nm = check_pattern(pattern, block_size, nm)
    if pattern == "nm" and not math.isclose(sparsity, 1 - nm[0] / nm[1]):
        raise ValueError(f"sparsity must be 1 - N/M = {1 - nm[0] / nm[1]:g} for pattern='nm' with nm={nm} "
                         f"(SparseGPT prunes exactly N of every M), got {sparsity}")
    if isinstance(damp, bool) or not isinstance(damp, Real) or not (math.isfinite(damp) and damp > 0):
        raise ValueError(f"damp must be a finite number > 0 (a fraction of the Hessian's mean diagonal), got {damp!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, Integral) or blocksize < 1:
        raise ValueError(f"blocksize must be an int >= 1 (columns per lazy update), got {blocksize!r}")
    return block_size, nm


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; more dampening if H is still singular."""
    h = h.clone()
    dead = torch.diagonal(h) == 0          # inputs that were always zero: any weight there is as good
    h[dead, dead] = 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    scale = torch.diagonal(h).mean()
    for attempt in range(4):
        factor, info = torch.linalg.cholesky_ex(h + (damp * 10 ** attempt) * scale * eye)
        if int(info) == 0:
            # cholesky_solve on the identity, not cholesky_inverse: the same inverse, ~10x faster on CPU
            return torch.linalg.cholesky(torch.cholesky_solve(eye, factor), upper=True)
    raise ValueError(f"the calibration Hessian is not positive definite even with damp={damp * 1000:g}; "
                     f"pass more calibration data or a larger damp")


def _group_counts(boundaries: list[int], sparsity: float) -> list[int]:
    """Groups to prune in each lazy block, from the number of groups up to each block's end: cumulatively rounded,
    so they add up to ``round(sparsity * all groups)``."""
    counts, done = [], 0
    for cum in boundaries:
        target = round(sparsity * cum)
        counts.append(target - done)
        done = target
    return counts


def _tile_pruned(errors: torch.Tensor, bh: int, bw: int, count: int) -> torch.Tensor:
    """Entry-wise prune flags for ``errors`` ``[rows, cols]``: the ``count`` (bh, bw) tiles with the lowest summed
    error (ties: the earlier tile in row-major order goes first)."""
    rows, cols = errors.shape
    n_br, n_bc = -(-rows // bh), -(-cols // bw)
    padded = errors.new_zeros(n_br * bh, n_bc * bw)
    padded[:rows, :cols] = errors
    tiles = padded.reshape(n_br, bh, n_bc, bw).sum(dim=(1, 3)).flatten()
    pruned = torch.zeros_like(tiles, dtype=torch.bool)
    pruned[torch.sort(tiles, stable=True).indices[:count]] = True
    grid = pruned.reshape(n_br, n_bc)
    return grid.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:rows, :cols]


def _prune_columns(w1: torch.Tensor, u1: torch.Tensor, a: int, b: int, pruned: torch.Tensor) -> torch.Tensor:
    """Prune columns ``[a, b)`` of the lazy block ``w1`` where ``pruned`` ``[rows, b - a]`` says, spreading the error
    over the block's later columns in place; returns the scaled errors ``e`` that the later blocks receive.

    The paper walks the columns one by one: ``e_i = (w_i - q_i) / U_ii``, then ``w[:, i:] -= e_i U[i, i:]``. With
    the mask of the columns fixed, that recursion is a forward substitution: for each row, the errors of its
    pruned columns ``S`` solve ``U_SS^T e_S = w_S`` (its kept columns have ``e = 0``). Solved here for all rows
    at once (batched triangular solves, in chunks of rows to bound memory) instead of ``b - a`` Python steps.
    """
    u = u1[a:b, a:b]
    p = pruned.to(w1.dtype)
    e = torch.empty_like(p)
    chunk = max(1, 2 ** 24 // (b - a) ** 2)
    for r in range(0, p.shape[0], chunk):
        pr = p[r:r + chunk]
        lower = pr[:, :, None] * u.T[None] * pr[:, None, :]
        lower.diagonal(dim1=1, dim2=2).add_(1 - pr)
        rhs = (pr * w1[r:r + chunk, a:b])[..., None]
        e[r:r + chunk] = torch.linalg.solve_triangular(lower, rhs, upper=False).squeeze(-1)
    w1[:, a:] -= e @ u1[a:b, a:]
    w1[:, a:b].masked_fill_(pruned, 0.0)   # zero already up to rounding; exactly zero
    return e


@torch.no_grad()
def _prune_matrix(w: torch.Tensor, hinv: torch.Tensor, *, sparsity: float, pattern: str, block_size, nm,
                  blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one ``[rows, cols]`` weight matrix: ``(updated weight, keep mask)``."""
    rows, cols = w.shape
    w = w.clone()
    bh, bw = block_size if pattern == "block" else (1, 1)
    n, m = nm
    step = m if pattern == "nm" else bw
    blocksize = max(1, blocksize // step) * step     # lazy blocks hold whole tiles / M-runs
    starts = list(range(0, cols, blocksize))
    ends = [min(s + blocksize, cols) for s in starts]
    if pattern != "nm":
        n_br = -(-rows // bh)
        counts = _group_counts([n_br * -(-e // bw) for e in ends], sparsity)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    for b, (i1, i2) in enumerate(zip(starts, ends)):
        w1, u1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        d = torch.diagonal(u1)
        p1 = pruned[:, i1:i2]
        err1 = torch.zeros_like(w1)
        if pattern == "nm":
            # each M-run's mask is chosen on the weights as updated by the runs before it
            segments = [(a, min(a + m, i2 - i1)) for a in range(0, i2 - i1, m)]
        else:
            p1 |= _tile_pruned(w1.pow(2) / d.pow(2), bh, bw, counts[b])
            segments = [(0, i2 - i1)]
        for a, z in segments:
            if pattern == "nm" and z - a > n:
                errors = w1[:, a:z].pow(2) / d[a:z].pow(2)
                p1[:, a:z].scatter_(1, torch.sort(errors, dim=1, stable=True).indices[:, :z - a - n], True)
            err1[:, a:z] = _prune_columns(w1, u1, a, z, p1[:, a:z])
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w, ~pruned


def _forward_order(model, layers: dict[str, nn.Module], batch) -> tuple[dict[str, int], list[list[str]]]:
    """How often each layer is called per forward, and the layers in the order the forward reaches them, in
    groups of consecutive layers that take the very same input tensor (pruning one cannot change another's
    input)."""
    calls: list[tuple[str, torch.Tensor, int]] = []

    def hook_for(name):
        def hook(module, args):
            calls.append((name, args[0], args[0]._version))   # the version tells an in-place change apart
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    try:
        call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    counts: dict[str, int] = {}
    groups: list[list[str]] = []
    previous = None
    for name, x, version in calls:
        if name not in counts:
            if groups and previous is not None and x is previous[0] and version == previous[1]:
                groups[-1].append(name)
            else:
                groups.append([name])
        counts[name] = counts.get(name, 0) + 1
        previous = (x, version)
    missing = [n for n in layers if n not in counts]
    if missing:
        raise ValueError(f"layers {missing} saw no input during calibration (not on the forward path); "
                         f"leave them out with filter_fn")
    return counts, groups


def _hessians(model, layers: dict[str, nn.Module], group: list[str], counts: dict[str, int], batches):
    """Input Hessians of the ``group``'s layers from every calibration batch, stopping each forward early."""
    hessians = {n: _Hessian() for n in group}
    seen: dict[str, int] = {}
    current = {}

    def hook_for(name):
        def hook(module, args):
            hessians[name].add(_input_matrix(module, args[0], current["batch"]))
            seen[name] = seen.get(name, 0) + 1
            if all(seen.get(n, 0) == counts[n] for n in group):
                raise _Seen
        return hook

    handles = [layers[n].register_forward_pre_hook(hook_for(n)) for n in group]
    try:
        for batch in batches:
            seen.clear()
            current["batch"] = batch
            try:
                call_model(model, batch)
            except _Seen:
                pass
    finally:
        for h in handles:
            h.remove()
    return hessians


def sparsegpt_(model: nn.Module, calibration, *, sparsity: float, pattern: str = "unstructured", block_size=(32, 32),
               nm=(2, 4), filter_fn=None, damp: float = 0.01, blocksize: int = 128) -> dict[str, torch.Tensor]:
    """Prune ``model``'s layers in place with SparseGPT and hold the masks as :func:`pysparse.prune.prune_` does.

    See the module docstring for the method. Each pruned layer loses exactly as many entries (unstructured,
    N:M) or tiles (block) as ``prune_`` would prune at the same settings; the kept weights are changed too.

    Args:
        calibration: a sequence (or iterable, read once into a list) of batches: tensors, dicts of keyword
            inputs (a tokenizer's output: padding is left out of the statistics by its ``attention_mask``), or
            tuples whose first element is the input (``(input, target)``).
        sparsity: fraction of each layer's groups to prune, in [0, 1]; for ``pattern="nm"`` exactly ``1 - N/M``.
        pattern: ``"unstructured"``, ``"nm"`` (``nm=(N, M)``: N kept of every M consecutive inputs) or
            ``"block"`` (``block_size=(bh, bw)`` tiles of the ``[out, in]`` matrix view; ``(16, 1)`` vectors).
        filter_fn: ``filter_fn(name, module) -> bool`` picks the layers, as in ``prune_``; by default every Linear
            and Conv except the last one registered (the output layer) and layers smaller than the pattern.
            Linear, Conv1d and Conv2d (ungrouped) layers are supported.
        damp: dampening added to the Hessian's diagonal, as a fraction of its mean (the paper's 1%).
        blocksize: columns per lazy update block (rounded down to whole tiles / M-runs).
    Returns:
        ``{layer name: bool keep mask}`` in the order the layers were pruned (forward order).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    block_size, nm = _check_args(sparsity, pattern, block_size, nm, damp, blocksize)
    if isinstance(calibration, (torch.Tensor, dict)):
        raise TypeError("calibration must be a sequence of batches (e.g. [batch]), got a single "
                        f"{type(calibration).__name__}")
    batches = [calibration_input(b) for b in calibration]
    if not batches:
        raise ValueError("calibration must hold at least one batch, got none")
    layers = prunable_layers(model, filter_fn, pattern=pattern, block_size=block_size, nm=nm)
    unsupported = [f"{n} ({type(m).__name__}, groups={getattr(m, 'groups', 1)})" for n, m in layers.items()
                   if not isinstance(m, _TYPES) or getattr(m, "groups", 1) != 1]
    if unsupported:
        raise TypeError(f"sparsegpt_ prunes Linear, Conv1d and Conv2d layers with groups=1; leave out "
                        f"{unsupported} with filter_fn")
    if not layers:
        raise ValueError("no layer to prune: the default skips the output layer and layers smaller than the "
                         "pattern; pass filter_fn (e.g. lambda name, module: True) to choose")

    was_training = model.training
    model.eval()
    masks = {}
    try:
        with torch.no_grad():
            counts, groups = _forward_order(model, layers, batches[0])
            for group in groups:
                for name, hessian in _hessians(model, layers, group, counts, batches).items():
                    masks[name] = _prune_layer(layers[name], hessian, sparsity=sparsity, pattern=pattern,
                                               block_size=block_size, nm=nm, damp=damp, blocksize=blocksize, name=name)
    finally:
        model.train(was_training)
    return masks


def _prune_layer(module: nn.Module, hessian: _Hessian, *, name: str, damp: float, **options) -> torch.Tensor:
    """Run SparseGPT on one layer's weight, write the updated weight back and hold its mask."""
    if hessian.h is None:
        raise ValueError(f"layer {name!r} saw no real token during calibration (every row was padding)")
    held = parametrize.is_parametrized(module, "weight")
    # A layer that already holds a mask: update the stored original (what the mask reads), not the masked view.
    target = module.parametrizations.weight.original if held else module.weight
    w = weight_matrix(module.weight.detach()).float()
    new, keep = _prune_matrix(w, _inverse_cholesky(hessian.h, damp), **options)
    target.copy_(weight_from_matrix(new, target.shape).to(target.dtype))
    mask = weight_from_matrix(keep, module.weight.shape).contiguous()
    _hold(module, mask)
    return mask
