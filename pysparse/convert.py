"""sparsify(): swap the block-sparse nn.Linear / nn.Conv2d layers of any model for pysparse layers.

It packs each candidate's weight, keeps the layer dense when its blocks are not sparse enough (or the layer
cannot be swapped safely), and records why in a report attached to the returned model. With ``autotune=True``
it runs the model once on ``example_inputs`` to get each layer's real input, times the dense and the sparse
layer on it, and keeps whichever is faster.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils import benchmark

from . import fold as _fold
from ._module_hooks import carry_hooks
from ._text_table import left_aligned
from ._validate import as_pair
from .formats import BlockSparseWeight
from .nn import SparseConv2d, SparseLinear, conv_weight_matrix
from .nn.activation_fusion import activation_sites
from .nn.forward_fusion import apply_forward_fusions, fusion_blocks, plan_forward_fusions
from .nn.transformers_attention import use_pysparse_attention
from .ops import available_backends

__all__ = ["sparsify", "LayerReport", "SparsifyReport"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Parents whose forward reads a child Linear's .weight directly (fused attention / encoder fast paths):
# swapping the child would break them.
_FUSED_PARENTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_AUTOTUNE_MIN_RUN_S = 0.05


@dataclass
class LayerReport:
    """What sparsify did with one nn.Linear / nn.Conv2d."""
    name: str
    kind: str                          # "Linear" or "Conv2d"
    shape: tuple                       # the dense weight's shape
    swapped: bool
    reason: str
    density: float | None = None       # fraction of (bh, bw) blocks kept, in the layout the layer packs
    dense_bytes: int = 0               # the dense weight
    packed_bytes: int | None = None    # values + indices of the packed weight
    dense_ms: float | None = None      # autotune: median time of the dense layer on the sample input
    sparse_ms: float | None = None     # autotune: median time of the sparse layer on the same input
    fused_activation: str | None = None  # fuse_activations: the activation now applied by this layer
    fused_residual: bool = False         # fuse_activations: the residual add its block's forward did after it


class SparsifyReport:
    """Per-layer decisions of :func:`sparsify` (``model.sparsify_report``); ``str()`` gives a table."""

    def __init__(self, layers: list[LayerReport], block_size: tuple[int, int], min_sparsity: float):
        self.layers = layers
        self.block_size = block_size
        self.min_sparsity = min_sparsity
        self.attention: str | None = None  # what sparsify(fast_attention=True) did to the model's attention

    @property
    def swapped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.swapped]

    def __getitem__(self, name: str) -> LayerReport:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"no layer named {name!r} in the report")

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict:
        return {"block_size": list(self.block_size), "min_sparsity": self.min_sparsity,
                "layers": [asdict(r) for r in self.layers], "attention": self.attention}

    def __str__(self) -> str:
        head = ("layer", "type", "shape", "kept", "density", "packed/dense", "reason")
        rows = []
        for r in self.layers:
            ratio = f"{r.packed_bytes / r.dense_bytes:.3f}" if r.packed_bytes is not None and r.dense_bytes else "-"
            rows.append((r.name or "<root>", r.kind, "x".join(map(str, r.shape)), "sparse" if r.swapped else "dense",
                         "-" if r.density is None else f"{r.density:.3f}", ratio, r.reason))
        lines = left_aligned(head, rows)
        dense = sum(r.dense_bytes for r in self.layers)
        after = sum(r.packed_bytes if r.swapped else r.dense_bytes for r in self.layers)
        lines.append(f"{len(self.swapped)}/{len(self.layers)} layers sparse; weight bytes of these layers "
                     f"{dense / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB")
        if self.attention is not None:
            lines.append(self.attention)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SparsifyReport({len(self.swapped)}/{len(self.layers)} layers sparse, block_size={self.block_size})"


def _weight_matrix(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    return conv_weight_matrix(w) if isinstance(module, nn.Conv2d) else w


def _why_not(module: nn.Module, parents: list[nn.Module | None], shared: bool) -> str | None:
    """Why ``module`` cannot be swapped whatever its sparsity, or None."""
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "lazy module not initialised yet"
    base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    if type(module).forward is not base.forward:
        return f"{type(module).__name__} overrides {base.__name__}.forward"
    fused = [p for p in parents if isinstance(p, _FUSED_PARENTS)]
    if fused:
        return f"parent {type(fused[0]).__name__} reads its .weight directly"
    if shared:
        return "weight is shared with another module (tied)"
    if module.weight.numel() == 0:
        return "empty weight"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"groups={module.groups}: grouped/depthwise convolutions have no block-sparse kernel"
    if module.weight.dtype not in _KERNEL_DTYPES:
        return f"dtype {module.weight.dtype} has no kernel (float32, bfloat16, float16)"
    dev = module.weight.device
    if dev.type == "cuda" and not available_backends()["cuda"]:
        return "on CUDA but this build has no CUDA kernels"
    if dev.type not in ("cpu", "cuda"):
        return f"device {dev} has no kernel"
    return None


def _sparse_module(module: nn.Module, weight: BlockSparseWeight, trainable: bool) -> nn.Module:
    bias = module.bias.detach() if module.bias is not None else None
    if isinstance(module, nn.Conv2d):
        new = SparseConv2d(weight, bias, in_channels=module.in_channels, kernel_size=module.kernel_size,
                           stride=module.stride, padding=module.padding, dilation=module.dilation,
                           padding_mode=module.padding_mode, trainable=trainable)
    else:
        new = SparseLinear(weight, bias, trainable=trainable)
    return new.train(module.training)


def _as_call(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(f"example_inputs must be a Tensor, a tuple/list of positional inputs or a dict of keyword "
                    f"inputs, got {type(example_inputs).__name__}")


def _capture_inputs(model: nn.Module, modules: dict[str, nn.Module], example_inputs) -> dict[str, torch.Tensor]:
    """The first input each of ``modules`` sees when ``model`` runs on ``example_inputs``."""
    args, kwargs = _as_call(example_inputs)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in modules.items():
        def hook(mod, inputs, name=name):
            if name not in seen and inputs and isinstance(inputs[0], torch.Tensor):
                seen[name] = inputs[0].detach()
        handles.append(m.register_forward_pre_hook(hook))
    # Run in eval mode (no batch-norm statistics updated, no dropout), then restore each module's own mode.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return seen


def _median_ms(module: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        module(x)  # warm-up (first-call allocations, lazy init)
        timer = benchmark.Timer("m(x)", globals={"m": module, "x": x}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=_AUTOTUNE_MIN_RUN_S).median * 1e3


def _fuse_activations(model: nn.Module, reports: dict[int, LayerReport]) -> None:
    """Moves each provably fusable activation into the SparseLinear / SparseConv2d before it (activation_fusion)."""
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    for site in activation_sites(model):
        layer = site.parent._modules[site.layer_slot]
        # Fused only into a layer sparsify swapped, called from this one place, whose output no hook observes.
        if (id(layer) not in reports or not isinstance(layer, (SparseLinear, SparseConv2d))
                or layer.activation is not None
                or uses[id(layer)] != 1 or layer._forward_hooks):
            continue
        layer.activation, layer.activation_source = site.activation, site.activation_slot
        setattr(site.parent, site.activation_slot, nn.Identity())
        report = reports[id(layer)]
        report.fused_activation = site.activation
        report.reason += f"; fused {site.activation} (was .{site.activation_slot} of its parent)"
    # Then what blocks' code does after a layer (ResNet's residual add and shared ReLU): their forward is rewritten.
    def layer_at(_, layer):
        return layer if id(layer) in reports and uses[id(layer)] == 1 else None

    for name, block in fusion_blocks(model, lambda m: id(m) in reports):
        plan = plan_forward_fusions(block, layer_at)
        if plan is None:
            continue
        rewritten = apply_forward_fusions(block, *plan)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, rewritten)
        for f in plan[1]:
            report = reports[id(rewritten.get_submodule(f.layer))]
            report.fused_activation, report.fused_residual = f.activation, f.residual
            what = " + ".join(["residual add"] * f.residual + [f.activation] * (f.activation is not None))
            report.reason += f"; fused the {what} of {name}.forward (rewritten with torch.fx)"


def sparsify(model: nn.Module, *, block_size=(32, 32), min_sparsity: float = 0.5, filter_fn=None,
             inplace: bool = False, autotune: bool = False, example_inputs=None, trainable: bool = False,
             fold_batchnorm: bool = False, fuse_activations: bool = False, fast_attention: bool = False) -> nn.Module:
    """Swap every ``nn.Linear`` / ``nn.Conv2d`` whose weight is block-sparse enough for a pysparse layer.

    Args:
        model: any ``nn.Module`` (a bare Linear/Conv2d is replaced and returned as well).
        block_size: ``(bh, bw)`` blocks over ``weight`` (Linear) or ``conv_weight_matrix(weight)`` (Conv2d).
        min_sparsity: swap a layer when at least this fraction of its blocks is all-zero.
        filter_fn: ``filter_fn(name, module) -> bool``; layers it returns False for stay dense.
        inplace: modify ``model`` itself; by default a deep copy is converted and ``model`` is left untouched.
        autotune: time dense and sparse on each layer's real input (from one run on ``example_inputs``) and
            keep the faster; layers the example run does not reach stay dense.
        example_inputs: a Tensor, a tuple of positional inputs or a dict of keyword inputs for ``model``.
        trainable: make the packed values ``nn.Parameter`` s, for fine-tuning through the sparse layers.
        fold_batchnorm: first fold each BatchNorm that directly follows a Conv2d / Linear into that layer
            (:func:`pysparse.fold.fold_batchnorm`); inference only, so the model must be in eval mode and
            ``trainable`` False.
        fuse_activations: where the model applies ReLU, ReLU6 or exact GELU to a swapped layer's output and nothing
            else reads that output (an ``nn.Sequential`` pair, Identities between allowed, or a parent whose
            forward is exactly ``act(linear(x))`` as in transformers' BERT-style MLPs), the SparseLinear /
            SparseConv2d applies it inside its CPU kernel and the activation module becomes ``nn.Identity`` (the
            report says which). Then blocks whose own forward adds a residual to a swapped layer's output and / or
            applies such an activation (torchvision's ResNet blocks) are rewritten with ``torch.fx`` so that the
            layer does both in its kernel (:mod:`pysparse.nn.forward_fusion`; the block becomes a GraphModule).
            Saves full passes over the layer's output at inference; training is unaffected (the layer then runs
            the torch add and activation itself).
        fast_attention: a Hugging Face transformers model whose attention runs ``"sdpa"`` is switched to pysparse's
            CPU attention kernel (:func:`pysparse.nn.use_pysparse_attention`; same results, and calls the kernel
            does not take, such as CUDA or training, still go to SDPA). With its Linear layers sparse, attention is
            most of what a BERT-size encoder has left. The report's ``attention`` line says what was done.
    Hooks registered on a swapped layer move to its replacement (and keep it out of any fusion).
    Returns:
        The converted model, with ``.sparsify_report`` (a :class:`SparsifyReport`): per layer whether it was
        swapped and why, block density, packed and dense bytes, and the autotune timings; with
        ``fold_batchnorm=True`` also ``.fold_report`` (a :class:`pysparse.fold.FoldReport`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    block_size = as_pair("block_size", block_size)
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not 0 <= min_sparsity <= 1:
        raise ValueError(f"min_sparsity must be a number in [0, 1], got {min_sparsity!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(name, module) -> bool or None, got {type(filter_fn).__name__}")
    if autotune and example_inputs is None:
        raise ValueError("autotune=True needs example_inputs (the layers are timed on their real input shapes)")
    if example_inputs is not None:
        _as_call(example_inputs)  # type check before any work
    if fold_batchnorm:
        if trainable:
            raise ValueError("fold_batchnorm=True is inference-only: trainable must be False, got trainable=True "
                             "(fine-tuning would need the BatchNorm layers the fold removes)")
        _fold.check_inference(model, "sparsify(fold_batchnorm=True)")
    if not inplace:
        model = copy.deepcopy(model)
    if fold_batchnorm:
        fold_report = _fold.fold_batchnorm(model, inplace=True).fold_report

    # Every place a module is registered (a module may be reachable under several names).
    places: dict[int, list[tuple[nn.Module | None, str]]] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            if child is not None:
                places.setdefault(id(child), []).append((parent, child_name))
    places[id(model)] = [(None, "")]
    # Parameters owned by more than one distinct module are tied (one module under two names is not).
    weight_uses: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                weight_uses[id(p)] = weight_uses.get(id(p), 0) + 1

    reports: list[LayerReport] = []
    packed: dict[str, tuple[nn.Module, BlockSparseWeight, LayerReport]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        w = module.weight
        lazy = isinstance(w, nn.parameter.UninitializedParameter)
        report = LayerReport(name=name, kind="Conv2d" if isinstance(module, nn.Conv2d) else "Linear",
                             shape=() if lazy else tuple(w.shape), swapped=False, reason="",
                             dense_bytes=0 if lazy else w.numel() * w.element_size())
        reports.append(report)
        parents = [parent for parent, _ in places[id(module)]]
        reason = _why_not(module, parents, weight_uses.get(id(w), 0) > 1)
        if reason is None and filter_fn is not None and not filter_fn(name, module):
            reason = "excluded by filter_fn"
        if reason is not None:
            report.reason = reason
            continue
        weight = BlockSparseWeight.from_dense(_weight_matrix(module), block_size=block_size)
        report.density = weight.density
        report.packed_bytes = weight.nbytes
        sparsity = 1.0 - weight.density
        if sparsity < min_sparsity and not math.isclose(sparsity, min_sparsity):
            report.reason = f"block sparsity {sparsity:.3f} < min_sparsity {min_sparsity}"
            continue
        report.reason = f"block sparsity {sparsity:.3f} >= min_sparsity {min_sparsity}"
        packed[name] = (module, weight, report)

    swapped: list[tuple[nn.Module, LayerReport]] = []
    samples = _capture_inputs(model, {n: m for n, (m, _, _) in packed.items()}, example_inputs) if autotune else {}
    for name, (module, weight, report) in packed.items():
        new = _sparse_module(module, weight, trainable)
        if autotune:
            if name not in samples:
                report.reason = "autotune: not reached by example_inputs, kept dense"
                continue
            report.dense_ms = _median_ms(module, samples[name])
            report.sparse_ms = _median_ms(new, samples[name])
            if report.sparse_ms >= report.dense_ms:
                report.reason = f"autotune: sparse {report.sparse_ms:.3f} ms >= dense {report.dense_ms:.3f} ms"
                continue
            report.reason = f"autotune: sparse {report.sparse_ms:.3f} ms < dense {report.dense_ms:.3f} ms"
        report.swapped = True
        carry_hooks(module, new)
        swapped.append((new, report))
        for parent, child_name in places[id(module)]:
            if parent is None:
                model = new
            else:
                setattr(parent, child_name, new)
    if fuse_activations:
        _fuse_activations(model, {id(r_new): r for r_new, r in swapped})
    model.sparsify_report = SparsifyReport(reports, block_size, float(min_sparsity))
    if fast_attention:
        model.sparsify_report.attention = use_pysparse_attention(model)
    if fold_batchnorm:
        model.fold_report = fold_report  # again: the root itself may have been swapped
    return model
