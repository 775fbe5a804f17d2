"""Per-layer and total parameters, nonzeros, FLOPs and bytes of a (pruned) model, before and after packing."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from .._validate import as_pair
from ..formats import BlockSparseWeight
from ..prune.mask_holding import LAYER_TYPES
from ..prune.mask_selection import matrix_view

__all__ = ["LayerStats", "SparsityReport", "sparsity_report"]


@dataclass
class LayerStats:
    name: str
    shape: tuple
    params: int          # weight + bias entries
    nonzeros: int        # nonzero weight + bias entries
    flops_dense: int     # 2 * weight entries * positions (multiply-adds of the dense layer)
    flops_sparse: int    # 2 * nonzero weight entries * positions (the useful work left)
    bytes_dense: int     # weight + bias as dense tensors
    bytes_packed: int    # BSR-packed weight (values + indices) + bias

    @property
    def density(self) -> float:
        return self.nonzeros / self.params if self.params else 0.0


@dataclass
class SparsityReport:
    layers: list[LayerStats]
    block_size: tuple[int, int]
    per: str             # what the FLOPs are counted for

    @property
    def total(self) -> LayerStats:
        sums = {f.name: sum(getattr(r, f.name) for r in self.layers) for f in fields(LayerStats)
                if f.name not in ("name", "shape")}
        return LayerStats("total", (), **sums)

    def table(self) -> str:
        head = (f"{'layer':<24}{'shape':>18}{'params':>10}{'nonzeros':>10}{'density':>9}"
                f"{'MFLOP dense':>13}{'MFLOP sparse':>14}{'KiB dense':>11}{'KiB packed':>12}")
        lines = [f"FLOPs per {self.per}; packed = BSR with {self.block_size[0]}x{self.block_size[1]} blocks",
                 head, "-" * len(head)]
        for r in [*self.layers, self.total]:
            shape = "x".join(map(str, r.shape))
            lines.append(f"{r.name:<24}{shape:>18}{r.params:>10}{r.nonzeros:>10}{r.density:>9.3f}"
                         f"{r.flops_dense / 1e6:>13.3f}{r.flops_sparse / 1e6:>14.3f}"
                         f"{r.bytes_dense / 1024:>11.1f}{r.bytes_packed / 1024:>12.1f}")
        return "\n".join(lines)

    __str__ = table


@torch.no_grad()
def sparsity_report(model: nn.Module, example_input=None, *, block_size=(32, 32)) -> SparsityReport:
    """Report every Linear/Conv layer of ``model`` (masked weights are read as masked).

    FLOPs count multiply-adds (2 per weight entry and output position; bias adds are left out): per forward of
    ``example_input`` when it is given (a tensor or a tuple of positional inputs), else per input row (Linear) /
    output position (Conv). ``bytes_packed`` is the size of ``BlockSparseWeight.from_dense`` of the layer's
    ``[out, in*kh*kw]`` weight view with ``block_size``, which keeps every block holding a nonzero.
    """
    block_size = as_pair("block_size", block_size)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)}
    positions = {n: 1 for n in layers}
    if example_input is not None:
        def hook_for(name):
            def hook(module, args, output):
                positions[name] = output.numel() // output.shape[-1 if isinstance(module, nn.Linear) else 1]
            return hook
        handles = [m.register_forward_hook(hook_for(n)) for n, m in layers.items()]
        try:
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
        finally:
            for h in handles:
                h.remove()
    rows = []
    for name, module in layers.items():
        w = module.weight.detach()
        bias = module.bias.detach() if module.bias is not None else w.new_zeros(0)
        nnz_w = int(torch.count_nonzero(w))
        packed = BlockSparseWeight.from_dense(matrix_view(w), block_size=block_size)
        rows.append(LayerStats(
            name=name, shape=tuple(w.shape), params=w.numel() + bias.numel(),
            nonzeros=nnz_w + int(torch.count_nonzero(bias)),
            flops_dense=2 * w.numel() * positions[name], flops_sparse=2 * nnz_w * positions[name],
            bytes_dense=(w.numel() + bias.numel()) * w.element_size(),
            bytes_packed=packed.nbytes + bias.numel() * bias.element_size()))
    per = "forward of example_input" if example_input is not None else "input row / output position"
    return SparsityReport(rows, block_size, per)
