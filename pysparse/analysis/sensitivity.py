"""Sensitivity analysis: per layer and sparsity, the metric drop *and* the measured latency of the packed layer
against dense, and a per-layer sparsity that meets a metric budget where sparse is actually faster."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import SparseLinear
from ..prune.mask_holding import prunable_layers, remove_masks
from ..prune.mask_selection import check_norm, check_pattern, check_sparsity, magnitude_mask
from .timing import median_seconds

__all__ = ["SensitivityRow", "SensitivityResult", "sensitivity", "pack_block_size"]


def pack_block_size(pattern: str, block_size, weight_shape) -> tuple[int, int]:
    """The BSR block size that stores a ``pattern`` mask without keeping pruned entries: ``block_size`` for
    blocks, one whole row ``(1, in)`` for channels, ``(1, 1)`` for unstructured and N:M masks."""
    if pattern == "block":
        return block_size
    if pattern == "channel":
        return 1, math.prod(weight_shape[1:])
    return 1, 1


@dataclass
class SensitivityRow:
    layer: str
    sparsity: float
    metric: float        # evaluate() with only this layer pruned at this sparsity
    drop: float          # metric lost against the unpruned model (positive = worse)
    dense_s: float       # median seconds of the dense layer on its recorded input
    sparse_s: float      # median seconds of the packed SparseLinear on the same input

    @property
    def speedup(self) -> float:
        return self.dense_s / self.sparse_s


@dataclass
class SensitivityResult:
    baseline: float
    rows: list[SensitivityRow]
    suggestion: dict[str, float]   # layer -> sparsity; layers left out stay dense
    suggested_metric: float        # evaluate() with every suggested layer pruned at once
    budget: float
    higher_is_better: bool

    @property
    def suggested_drop(self) -> float:
        drop = self.baseline - self.suggested_metric
        return drop if self.higher_is_better else -drop

    def table(self) -> str:
        head = (f"{'layer':<20}{'sparsity':>9}{'metric':>9}{'drop':>9}{'dense us':>10}{'sparse us':>11}"
                f"{'speedup':>9}  suggested")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            mark = "<-" if self.suggestion.get(r.layer) == r.sparsity else ""
            lines.append(f"{r.layer:<20}{r.sparsity:>9.2f}{r.metric:>9.4f}{r.drop:>+9.4f}{r.dense_s * 1e6:>10.1f}"
                         f"{r.sparse_s * 1e6:>11.1f}{r.speedup:>8.2f}x  {mark}")
        chosen = ", ".join(f"{n}={s:g}" for n, s in self.suggestion.items()) or "none (keep the model dense)"
        dense = [n for n in dict.fromkeys(r.layer for r in self.rows) if n not in self.suggestion]
        lines.append(f"baseline {self.baseline:.4f}; suggested {chosen}: metric {self.suggested_metric:.4f} "
                     f"(drop {self.suggested_drop:+.4f}, budget {self.budget:g})")
        if dense:
            lines.append(f"left dense (no sparsity within budget is faster than dense): {', '.join(dense)}")
        return "\n".join(lines)

    __str__ = table


@torch.no_grad()
def _evaluate_with(model, evaluate, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> float:
    """``evaluate(model)`` with the given layers' weights masked, restoring them afterwards."""
    originals = {n: weights[n].clone() for n in masks}
    try:
        for n, mask in masks.items():
            weights[n].masked_fill_(~mask, 0)
        return float(evaluate(model))
    finally:
        for n, original in originals.items():
            weights[n].copy_(original)


@torch.no_grad()
def sensitivity(model: nn.Module, evaluate, example_input, *, sparsities=(0.5, 0.7, 0.8, 0.9), budget: float = 0.01,
                norm: str = "l1", pattern: str = "block", block_size=(32, 32), nm=(2, 4), filter_fn=None,
                higher_is_better: bool = True, min_speedup: float = 1.0, min_run_time: float = 0.2
                ) -> SensitivityResult:
    """Prune one Linear layer at a time and measure what it costs in quality and what it gains in speed.

    For every layer :func:`pysparse.prune.prunable_layers` picks (Linear layers only: the packed conv layer does not
    exist yet) and every sparsity: the ``evaluate(model) -> float`` metric with only that layer pruned (one-shot,
    no fine-tuning), and the median latency of that layer packed as :class:`pysparse.nn.SparseLinear` against the
    dense layer, both on the input the layer receives when the model runs ``example_input``.

    The suggestion takes, per layer, the highest sparsity whose own drop is within ``budget`` and whose packed
    layer is at least ``min_speedup`` times faster than dense (layers with none stay dense), then evaluates all
    choices together and, while the joint drop exceeds ``budget``, steps back the layer with the largest drop.
    Works on a copy: ``model`` (and any masks it holds) is left as it is.

    Args:
        budget: largest allowed drop, in the metric's units (e.g. 0.01 = one accuracy point).
        higher_is_better: False for a loss.
    """
    for s in sparsities:
        check_sparsity("sparsities", s)
    check_norm(norm)
    block_size, nm = check_pattern(pattern, block_size, nm)
    work = copy.deepcopy(model)
    remove_masks(work)
    work.eval()
    layers = {n: m for n, m in prunable_layers(work, filter_fn, pattern=pattern, block_size=block_size, nm=nm).items()
              if isinstance(m, nn.Linear)}
    if not layers:
        raise ValueError("no Linear layer to analyse (see prunable_layers; pass filter_fn to choose layers)")
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, args[0].detach()))
               for n, m in layers.items()]
    try:
        work(*example_input) if isinstance(example_input, tuple) else work(example_input)
    finally:
        for h in handles:
            h.remove()

    weights = {n: m.weight for n, m in layers.items()}
    sign = 1.0 if higher_is_better else -1.0
    baseline = float(evaluate(work))
    rows, masks = [], {}
    for name, layer in layers.items():
        x = inputs[name]
        dense_s = median_seconds(layer, x, min_run_time=min_run_time)
        packing = pack_block_size(pattern, block_size, layer.weight.shape)
        for s in sparsities:
            mask = magnitude_mask(layer.weight, sparsity=s, norm=norm, pattern=pattern, block_size=block_size, nm=nm)
            masks[name, s] = mask
            metric = _evaluate_with(work, evaluate, weights, {name: mask})
            packed = SparseLinear.from_dense(layer, packing, mask)
            rows.append(SensitivityRow(name, s, metric, sign * (baseline - metric), dense_s,
                                       median_seconds(packed, x, min_run_time=min_run_time)))

    options = {n: sorted((r for r in rows if r.layer == n and r.drop <= budget and r.speedup >= min_speedup),
                         key=lambda r: r.sparsity) for n in layers}
    chosen = {n: opts[-1] for n, opts in options.items() if opts}
    while True:
        joint = _evaluate_with(work, evaluate, weights, {n: masks[n, r.sparsity] for n, r in chosen.items()})
        if not chosen or sign * (baseline - joint) <= budget:
            break
        worst = max(chosen, key=lambda n: chosen[n].drop)
        lower = [r for r in options[worst] if r.sparsity < chosen[worst].sparsity]
        if lower:
            chosen[worst] = lower[-1]
        else:
            del chosen[worst]
    return SensitivityResult(baseline, rows, {n: r.sparsity for n, r in chosen.items()}, joint, budget,
                             higher_is_better)
