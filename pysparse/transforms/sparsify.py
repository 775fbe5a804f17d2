"""sparsify(): swap the block-sparse nn.Linear / nn.Conv2d layers of any model for pysparse layers.

It packs each candidate's weight, keeps the layer dense when its blocks are not sparse enough (or the layer
cannot be swapped safely), and records why in a report attached to the returned model. With ``autotune=True``
it runs the model once on ``example_inputs`` to get each layer's real input, times the dense and the sparse
layer on it, and keeps whichever is faster.

The phases, in order, each a function here: fold BatchNorms (optional), choose the layers (:func:`choose_layers`),
build their sparse replacements, keeping only the faster ones when autotuning (:func:`autotune_layers`), swap them in
(:func:`swap_layers`), fuse activations into them (:func:`fuse_activation_modules`) and what blocks' forward does
after them (:func:`fuse_forward_code`), switch a transformers model's attention, and attach the report.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.utils import benchmark

from .._module_hooks import carry_hooks
from .._validate import as_pair
from .._weight_layout import weight_matrix
from ..formats import BlockSparseWeight, UnstructuredSparseWeight
from ..nn import SparseConv2d, SparseLinear, UnstructuredSparseLinear
from ..ops import available_backends
from ..ops.unstructured_linear import pack_for_kernel
from . import fold_batchnorm as _fold
from .activation_fusion import activation_sites
from .attention_switch import use_pysparse_attention
from .format_choice import choose_block_size, cpu_table_key
from .forward_fusion import apply_forward_fusions, fusion_blocks, plan_forward_fusions
from .report import LayerReport, SparsifyReport

__all__ = ["LayerReport", "SparsifyReport", "autotune_layers", "choose_layers", "fuse_activation_modules",
           "fuse_forward_code", "inference_defaults", "sparsify", "swap_layers"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Parents whose forward reads a child Linear's .weight directly (fused attention / encoder fast paths):
# swapping the child would break them.
_FUSED_PARENTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_AUTOTUNE_MIN_RUN_S = 0.05

# A module's registrations: every (parent, attribute) it is reachable under; (None, "") for the root.
Places = dict[int, list[tuple[nn.Module | None, str]]]
# A layer chosen for swapping: the dense module, its packed weight and its report line.
Candidate = tuple[nn.Module, BlockSparseWeight | UnstructuredSparseWeight, LayerReport]


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


def _pack(module: nn.Module, matrix: torch.Tensor, block_size: tuple[int, int]
          ) -> BlockSparseWeight | UnstructuredSparseWeight:
    """``module``'s weight (as ``matrix``, its ``weight_matrix``) packed in ``block_size`` blocks; single entries of a
    linear layer on the CPU get the unstructured format and kernel (1x1 blocks elsewhere: CUDA has a BSR kernel,
    not an unstructured one)."""
    if block_size == (1, 1) and isinstance(module, nn.Linear) and matrix.device.type == "cpu":
        return pack_for_kernel(matrix)
    return BlockSparseWeight.from_dense(matrix, block_size=block_size)


def _sparse_module(module: nn.Module, weight: BlockSparseWeight | UnstructuredSparseWeight, trainable: bool
                   ) -> nn.Module:
    bias = module.bias.detach() if module.bias is not None else None
    if isinstance(module, nn.Conv2d):
        new = SparseConv2d(weight, bias, in_channels=module.in_channels, kernel_size=module.kernel_size,
                           stride=module.stride, padding=module.padding, dilation=module.dilation,
                           padding_mode=module.padding_mode, trainable=trainable)
    elif isinstance(weight, UnstructuredSparseWeight):
        new = UnstructuredSparseLinear(weight, bias, trainable=trainable)
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


def _check_arguments(model, min_sparsity, filter_fn, autotune, example_inputs, trainable, fold_batchnorm,
                     fuse_activations, fast_attention) -> None:
    """The argument errors after ``model``'s type and ``block_size``, raised before any work is done (and before
    ``model`` is copied)."""
    for name, value in (("fuse_activations", fuse_activations), ("fast_attention", fast_attention)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be None (on in eval mode), True or False, got {type(value).__name__}")
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


def inference_defaults(model: nn.Module, trainable: bool, fuse_activations: bool | None,
                       fast_attention: bool | None) -> tuple[bool, bool, str | None]:
    """``(fuse_activations, fast_attention, why)``: each None resolved to on for a model in eval mode that is not
    made trainable (both are exact at inference), off otherwise (nothing that changes training); ``why`` says which
    defaults were applied and why (None when both were given)."""
    unset = [name for name, v in (("fuse_activations", fuse_activations), ("fast_attention", fast_attention))
             if v is None]
    if not unset:
        return fuse_activations, fast_attention, None
    on = not model.training and not trainable
    if on:
        why = "the model is in eval mode and trainable=False: exact inference optimisations on, each off with False"
    elif model.training:
        why = "the model is in training mode: nothing that changes training; call model.eval() first for them"
    else:
        why = "trainable=True: nothing that changes training"
    why = f"defaults: {', '.join(f'{name}={on}' for name in unset)} ({why})"
    return (on if fuse_activations is None else fuse_activations, on if fast_attention is None else fast_attention,
            why)


def _module_places(model: nn.Module) -> Places:
    """Every place a module is registered (a module may be reachable under several names)."""
    places: Places = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            if child is not None:
                places.setdefault(id(child), []).append((parent, child_name))
    places[id(model)] = [(None, "")]
    return places


def _parameter_owners(model: nn.Module) -> dict[int, int]:
    """How many distinct modules own each parameter (more than one: tied; one module under two names is not)."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    return owners


def choose_layers(model: nn.Module, places: Places, block_size: tuple[int, int] | str, min_sparsity: float,
                  filter_fn) -> tuple[list[LayerReport], dict[str, Candidate]]:
    """A report line for every nn.Linear / nn.Conv2d of ``model``, and, by name, those to swap: the layers that can
    be swapped, pass ``filter_fn`` and whose packed weight has at least ``min_sparsity`` of its blocks all-zero.
    ``block_size="auto"``: each layer's block size by :func:`~pysparse.transforms.format_choice.choose_block_size`."""
    owners = _parameter_owners(model)
    reports: list[LayerReport] = []
    chosen: dict[str, Candidate] = {}
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
        reason = _why_not(module, parents, owners.get(id(w), 0) > 1)
        if reason is None and filter_fn is not None and not filter_fn(name, module):
            reason = "excluded by filter_fn"
        if reason is not None:
            report.reason = reason
            continue
        matrix = weight_matrix(w.detach())
        block, why = block_size, ""
        if block_size == "auto":
            on_cpu = w.device.type == "cpu"
            table = cpu_table_key(available_backends()["cpu"]) if on_cpu else w.device.type
            block, why = choose_block_size(matrix, path=table, single_entries=on_cpu and isinstance(module, nn.Linear))
            why += "; "
        weight = _pack(module, matrix, block)
        report.block_size = block
        report.density = weight.density
        report.packed_bytes = weight.nbytes
        sparsity = 1.0 - weight.density
        if sparsity < min_sparsity and not math.isclose(sparsity, min_sparsity):
            report.reason = f"{why}block sparsity {sparsity:.3f} < min_sparsity {min_sparsity}"
            continue
        report.reason = f"{why}block sparsity {sparsity:.3f} >= min_sparsity {min_sparsity}"
        chosen[name] = (module, weight, report)
    return reports, chosen


def autotune_layers(model: nn.Module, chosen: dict[str, Candidate], trainable: bool, example_inputs
                    ) -> dict[str, nn.Module]:
    """Sparse replacements, by name, for the layers of ``chosen`` that run faster sparse than dense on the input
    each gets when ``model`` (still dense) runs ``example_inputs``; each report says what was timed and decided."""
    samples = _capture_inputs(model, {n: m for n, (m, _, _) in chosen.items()}, example_inputs)
    faster = {}
    for name, (module, weight, report) in chosen.items():
        new = _sparse_module(module, weight, trainable)
        if name not in samples:
            report.reason = "autotune: not reached by example_inputs, kept dense"
            continue
        report.dense_ms = _median_ms(module, samples[name])
        report.sparse_ms = _median_ms(new, samples[name])
        if report.sparse_ms >= report.dense_ms:
            report.reason = f"autotune: sparse {report.sparse_ms:.3f} ms >= dense {report.dense_ms:.3f} ms"
            continue
        report.reason = f"autotune: sparse {report.sparse_ms:.3f} ms < dense {report.dense_ms:.3f} ms"
        faster[name] = new
    return faster


def swap_layers(model: nn.Module, places: Places, chosen: dict[str, Candidate], new_layers: dict[str, nn.Module]
                ) -> tuple[nn.Module, dict[int, LayerReport]]:
    """Registers each of ``new_layers`` wherever its dense layer was (hooks move along); returns the model (the new
    layer itself when the root was swapped) and the swapped layers' reports keyed by the new layer's ``id``."""
    swapped: dict[int, LayerReport] = {}
    for name, new in new_layers.items():
        module, _, report = chosen[name]
        report.swapped = True
        carry_hooks(module, new)
        swapped[id(new)] = report
        for parent, child_name in places[id(module)]:
            if parent is None:
                model = new
            else:
                setattr(parent, child_name, new)
    return model, swapped


def _call_counts(model: nn.Module) -> dict[int, int]:
    """How many places each module is registered under (a layer fused into must be called from one place)."""
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    return uses


def fuse_activation_modules(model: nn.Module, swapped: dict[int, LayerReport]) -> None:
    """Moves each provably fusable activation module into the SparseLinear / SparseConv2d before it (see
    :mod:`.activation_fusion`); the activation's slot becomes ``nn.Identity``."""
    uses = _call_counts(model)
    for site in activation_sites(model):
        layer = site.parent._modules[site.layer_slot]
        # Fused only into a layer sparsify swapped, called from this one place, whose output no hook observes.
        if (id(layer) not in swapped or not isinstance(layer, (SparseLinear, SparseConv2d))
                or layer.activation is not None
                or uses[id(layer)] != 1 or layer._forward_hooks):
            continue
        layer.activation, layer.activation_source = site.activation, site.activation_slot
        setattr(site.parent, site.activation_slot, nn.Identity())
        report = swapped[id(layer)]
        report.fused_activation = site.activation
        report.reason += f"; fused {site.activation} (was .{site.activation_slot} of its parent)"


def fuse_forward_code(model: nn.Module, swapped: dict[int, LayerReport]) -> None:
    """Fuses what blocks' code does after a swapped layer (ResNet's residual add and shared ReLU) into it: those
    blocks' forward is rewritten with torch.fx (see :mod:`.forward_fusion`)."""
    uses = _call_counts(model)

    def layer_at(_, layer):
        return layer if id(layer) in swapped and uses[id(layer)] == 1 else None

    for name, block in fusion_blocks(model, lambda m: id(m) in swapped):
        plan = plan_forward_fusions(block, layer_at)
        if plan is None:
            continue
        rewritten = apply_forward_fusions(block, *plan)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, rewritten)
        for f in plan[1]:
            report = swapped[id(rewritten.get_submodule(f.layer))]
            report.fused_activation, report.fused_residual = f.activation, f.residual
            what = " + ".join(["residual add"] * f.residual + [f.activation] * (f.activation is not None))
            report.reason += f"; fused the {what} of {name}.forward (rewritten with torch.fx)"


def sparsify(model: nn.Module, *, block_size=(32, 32), min_sparsity: float = 0.5, filter_fn=None,
             inplace: bool = False, autotune: bool = False, example_inputs=None, trainable: bool = False,
             fold_batchnorm: bool = False, fuse_activations: bool | None = None,
             fast_attention: bool | None = None) -> nn.Module:
    """Swap every ``nn.Linear`` / ``nn.Conv2d`` whose weight is block-sparse enough for a pysparse layer.

    Args:
        model: any ``nn.Module`` (a bare Linear/Conv2d is replaced and returned as well).
        block_size: ``(bh, bw)`` blocks over ``weight`` (Linear) or ``conv_weight_matrix(weight)`` (Conv2d);
            ``(1, 1)`` gives a CPU linear layer the unstructured format and kernel. ``"auto"``: per layer, the
            block size (``(1, 1)`` included) whose packed form of the layer's zeros has the least estimated time on
            this machine's kernel path (:mod:`pysparse.transforms.format_choice`; the report says which and why).
        min_sparsity: swap a layer when at least this fraction of its blocks is all-zero.
        filter_fn: ``filter_fn(name, module) -> bool``; layers it returns False for stay dense.
        inplace: modify ``model`` itself; by default a deep copy is converted and ``model`` is left untouched.
        autotune: time dense and sparse on each layer's real input (from one run on ``example_inputs``) and
            keep the faster; layers the example run does not reach stay dense.
        example_inputs: a Tensor, a tuple of positional inputs or a dict of keyword inputs for ``model``.
        trainable: make the packed values ``nn.Parameter`` s, for fine-tuning through the sparse layers.
        fold_batchnorm: first fold each BatchNorm that directly follows a Conv2d / Linear into that layer
            (:func:`pysparse.fold_batchnorm`); inference only, so the model must be in eval mode and
            ``trainable`` False.
        fuse_activations: None (the default): on when ``model`` is in eval mode (``model.training`` False) and
            ``trainable`` is False, off otherwise, as for ``fast_attention``; both are exact at inference (float32
            results within 1e-5 relative of the unfused model), so an eval model gets them unless told False, and a
            model in training mode gets nothing that changes training. The report says which defaults applied.
            When on: where the model applies ReLU, ReLU6 or exact GELU to a swapped layer's output and nothing
            else reads that output (an ``nn.Sequential`` pair, Identities between allowed, or a parent whose
            forward is exactly ``act(linear(x))`` as in transformers' BERT-style MLPs), the SparseLinear /
            SparseConv2d applies it inside its CPU kernel and the activation module becomes ``nn.Identity`` (the
            report says which). Then blocks whose own forward adds a residual to a swapped layer's output and / or
            applies such an activation (torchvision's ResNet blocks) are rewritten with ``torch.fx`` so that the
            layer does both in its kernel (:mod:`pysparse.transforms.forward_fusion`; the block becomes a GraphModule).
            Saves full passes over the layer's output at inference; training is unaffected (the layer then runs
            the torch add and activation itself).
        fast_attention: None (the default): on in eval mode as ``fuse_activations``. When on, a Hugging Face
            transformers model whose attention runs ``"sdpa"`` is switched to pysparse's
            CPU attention kernel (:func:`pysparse.nn.use_pysparse_attention`; same results, and calls the kernel
            does not take, such as CUDA or training, still go to SDPA). With its Linear layers sparse, attention is
            most of what a BERT-size encoder has left. The report's ``attention`` line says what was done.
    Hooks registered on a swapped layer move to its replacement (and keep it out of any fusion).
    Returns:
        The converted model, with ``.sparsify_report`` (a :class:`SparsifyReport`): per layer whether it was
        swapped and why, block density, packed and dense bytes, and the autotune timings; with
        ``fold_batchnorm=True`` also ``.fold_report`` (a :class:`pysparse.transforms.fold_batchnorm.FoldReport`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(block_size, str):
        if block_size != "auto":
            raise ValueError(f"block_size must be (bh, bw), an int or 'auto', got {block_size!r}")
    else:
        block_size = as_pair("block_size", block_size)
    _check_arguments(model, min_sparsity, filter_fn, autotune, example_inputs, trainable, fold_batchnorm,
                     fuse_activations, fast_attention)
    fuse_activations, fast_attention, defaults = inference_defaults(model, trainable, fuse_activations,
                                                                    fast_attention)
    if not inplace:
        model = copy.deepcopy(model)
    if fold_batchnorm:
        fold_report = _fold.fold_batchnorm(model, inplace=True).fold_report

    places = _module_places(model)
    reports, chosen = choose_layers(model, places, block_size, min_sparsity, filter_fn)
    if autotune:
        new_layers = autotune_layers(model, chosen, trainable, example_inputs)
    else:
        new_layers = {name: _sparse_module(module, weight, trainable) for name, (module, weight, _) in chosen.items()}
    model, swapped = swap_layers(model, places, chosen, new_layers)
    if fuse_activations:
        fuse_activation_modules(model, swapped)
        fuse_forward_code(model, swapped)
    model.sparsify_report = SparsifyReport(reports, block_size, float(min_sparsity))
    model.sparsify_report.defaults = defaults
    if fast_attention:
        model.sparsify_report.attention = use_pysparse_attention(model)
    if fold_batchnorm:
        model.fold_report = fold_report  # again: the root itself may have been swapped
    return model
