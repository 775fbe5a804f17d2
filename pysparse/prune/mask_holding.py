"""prune_: choose masks for a model's layers and hold them through training until remove_masks.

How a mask is held: the layer's weight becomes a ``torch.nn.utils.parametrize`` parametrization,
``weight = where(mask, original, 0)``. Every read of ``layer.weight`` (forward, state_dict consumers, packing)
sees the masked value, so no optimizer can revive a pruned entry: Adam's momentum may move ``original`` there,
but that value is never used (and is zeroed again when a mask changes or is removed). The gradient reaching
``original`` is zero at pruned entries. The mask is a buffer of the parametrization, so it is in ``state_dict``
(``<layer>.parametrizations.weight.0.mask``), moves with ``.to()``, survives ``copy.deepcopy``, and
``torch.compile`` traces the ``where`` like any other op. Pickling a whole parametrized module
(``torch.save(model)``) is refused by torch: save ``state_dict()`` instead.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .mask_selection import (Groups, check_amount, check_norm, check_pattern, check_sparsity, first_pruned,
                             group_scores, pattern_fits, pruning_order, select)

__all__ = ["prune_", "prunable_layers", "apply_masks", "remove_masks", "get_masks", "masks_from_state_dict",
           "mask_sparsity", "WeightMask"]

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MASK_KEY = "parametrizations.weight.0.mask"


class WeightMask(nn.Module):
    """Parametrization ``weight -> where(mask, weight, 0)``; ``mask`` (bool, True = keep) is a buffer."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, weight, 0.0)


def _mask_module(module: nn.Module) -> WeightMask | None:
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations.weight:
            if isinstance(p, WeightMask):
                return p
    return None


def _hold(module: nn.Module, mask: torch.Tensor) -> None:
    """Zero the pruned entries in place and hold them at zero (replacing a mask the layer already holds)."""
    held = _mask_module(module)
    with torch.no_grad():
        if held is not None:
            # Entries revived by the new mask restart from zero instead of from what momentum left there.
            module.parametrizations.weight.original.masked_fill_(~(held.mask & mask), 0)
            held.mask.copy_(mask)
            return
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"cannot mask a weight that already has other parametrizations "
                             f"({module.parametrizations.weight}); remove them first")
        module.weight.masked_fill_(~mask, 0)
    parametrize.register_parametrization(module, "weight", WeightMask(mask.clone()), unsafe=True)


def prunable_layers(model: nn.Module, filter_fn=None, *, pattern: str = "block", block_size=(32, 32),
                    nm=(2, 4)) -> dict[str, nn.Module]:
    """The layers :func:`prune_` prunes: ``{name: module}`` in ``model.named_modules()`` order.

    With ``filter_fn=None``: every ``nn.Linear`` / ``nn.Conv1d/2d/3d`` except the last one in registration order
    (taken to be the output layer: pruning it costs the most accuracy for the least work saved) and except layers
    too small for the pattern (a block or an M-run larger than the weight). With ``filter_fn(name, module) ->
    bool``: exactly the Linear/Conv layers it accepts.
    """
    block_size, nm = check_pattern(pattern, block_size, nm)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    if filter_fn is not None:
        return {n: m for n, m in layers if filter_fn(n, m)}
    return {n: m for n, m in layers[:-1] if pattern_fits(m.weight.shape, pattern, block_size, nm)}


def _lamp(groups: Groups, norm: str) -> torch.Tensor:
    """Layer-comparable group scores: the size-normalised norm (mean |w| for L1, RMS for L2), squared, divided by
    the sum of the squares of all groups of the layer that score at least as high (LAMP, Lee et al. 2021).

    Raw norms are not comparable across layers (a layer with a larger fan-in is initialised, and usually trained,
    to smaller weights, and global magnitude pruning then empties it). LAMP keeps each layer's order, and its
    highest group scores 1, so no layer is pruned away entirely below sparsity 1.
    """
    denom = groups.sizes.double() if norm == "l1" else groups.sizes.double().sqrt()
    v = (groups.norms.double() / denom).pow(2).masked_fill(groups.forced, 0.0)
    ordered, order = torch.sort(v, stable=True)
    suffix = ordered.flip(0).cumsum(0).flip(0)
    scores = torch.empty_like(v)
    scores[order] = torch.where(suffix > 0, ordered / suffix, torch.zeros_like(suffix))
    return scores


def _global_select(groups: dict[str, Groups], sparsity: float, norm: str) -> dict[str, torch.Tensor]:
    """Rank all layers' groups together on LAMP scores and prune the lowest until the pruned entries are closest
    to ``sparsity`` of all entries."""
    names = list(groups)
    dev = groups[names[0]].norms.device
    sizes = torch.cat([groups[n].sizes.to(dev) for n in names])
    forced = torch.cat([groups[n].forced.to(dev) for n in names])
    scores = torch.cat([_lamp(groups[n], norm).to(dev) for n in names])
    target = round(sparsity * int(sizes.sum()))
    floor = int(sizes[forced].sum())
    if target < floor:
        raise ValueError(f"sparsity must be >= {floor / int(sizes.sum()):.4g} for this N:M pattern, got {sparsity}")
    order = pruning_order(scores, forced)
    cum = torch.cumsum(sizes[order], 0)
    i = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype, device=dev)))
    below = int(cum[i - 1]) if i > 0 else 0
    count = i + 1 if i < cum.numel() and int(cum[i]) - target < target - below else i
    pruned = first_pruned(order, max(count, int(forced.sum())))
    return dict(zip(names, pruned.split([groups[n].norms.numel() for n in names])))


@torch.no_grad()
def prune_(model: nn.Module, *, sparsity: float | None = None, threshold: float | None = None, norm: str = "l1",
           pattern: str = "block", block_size=(32, 32), scope: str = "layer", filter_fn=None, nm=(2, 4),
           overrides: dict[str, float] | None = None, importance: dict[str, torch.Tensor] | None = None
           ) -> dict[str, torch.Tensor]:
    """Prune ``model``'s layers in place and keep the pruned weights at zero until :func:`remove_masks`.

    Masks are those of :func:`magnitude_mask` (same ``sparsity`` / ``threshold`` / ``norm`` / ``pattern`` /
    ``block_size`` / ``nm`` meaning) computed on each layer's current weight. Calling ``prune_`` again replaces
    the masks (pruned weights are zero, so they rank lowest: a higher sparsity extends the old mask).

    Args:
        scope: ``"layer"``: each layer loses ``sparsity`` of its groups. ``"global"``: groups of all layers are
            ranked together on comparable scores (size-normalised norms, L1 / entries or L2 / sqrt(entries),
            made scale-free per layer by LAMP: see ``_lamp``), pruning the lowest until ``sparsity`` of all the
            layers' entries are pruned (as close as group sizes allow); each layer keeps its best group. A
            threshold is absolute, so it prunes the same groups in either scope.
        filter_fn: ``filter_fn(name, module) -> bool`` picks the Linear/Conv layers to prune. By default every
            ``nn.Linear`` / ``nn.Conv1d/2d/3d`` is pruned except the last one registered (the output layer) and
            layers smaller than the pattern (one block, one M-run); biases, norms and embeddings never are.
        overrides: ``{layer name: sparsity}``, pruned layer-wise at that sparsity whatever the scope, the
            default skips or ``filter_fn`` (names must be Linear/Conv layers). With overrides alone (no
            ``sparsity`` / ``threshold``), only those layers are pruned.
        importance: ``{layer name: entry-wise scores of the weight's shape}`` ranked instead of ``|weight|``,
            e.g. from :func:`pysparse.prune.taylor_scores` or :func:`pysparse.prune.wanda_scores`.
    Returns:
        ``{layer name: bool mask}`` (True = kept) of every layer pruned by this call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    overrides = dict(overrides or {})
    if overrides and sparsity is None and threshold is None:
        layers = {}
    else:
        check_amount(sparsity, threshold)
        layers = prunable_layers(model, filter_fn, pattern=pattern, block_size=block_size, nm=nm)
    check_norm(norm)
    block_size, nm = check_pattern(pattern, block_size, nm)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    modules = dict(model.named_modules())
    for name, value in overrides.items():
        if not isinstance(modules.get(name), LAYER_TYPES):
            candidates = [n for n, m in modules.items() if isinstance(m, LAYER_TYPES)]
            raise ValueError(f"overrides names {name!r}, which is not a Linear/Conv layer of the model; "
                             f"layers are {candidates}")
        check_sparsity(f"overrides[{name!r}]", value)
    layers.update({n: modules[n] for n in overrides if n not in layers})
    if not layers:
        size = {"block": f" (block_size {block_size})", "nm": f" (nm {nm})"}.get(pattern, "")
        raise ValueError(f"no layer to prune: the default skips the output layer and layers smaller than the "
                         f"pattern{size}; pass filter_fn (e.g. lambda name, module: True) or overrides to choose")
    if importance is not None:
        for name, module in layers.items():
            scores = importance.get(name)
            if not isinstance(scores, torch.Tensor) or scores.shape != module.weight.shape:
                got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                raise ValueError(f"importance[{name!r}] must be a tensor of the weight's shape "
                                 f"{tuple(module.weight.shape)}, got {got}")

    groups = {}
    for name, module in layers.items():
        scores = importance[name] if importance is not None else module.weight
        groups[name] = group_scores(scores, norm=norm, pattern=pattern, block_size=block_size, nm=nm)
    pooled = [n for n in groups if n not in overrides]
    pruned = {}
    if scope == "global" and threshold is None and pooled:
        pruned = _global_select({n: groups[n] for n in pooled}, sparsity, norm)
    for name, g in groups.items():
        if name not in pruned:
            amount = {"sparsity": overrides[name]} if name in overrides else {"sparsity": sparsity,
                                                                              "threshold": threshold}
            pruned[name] = select(g, **amount)

    masks = {}
    for name, module in layers.items():
        mask = groups[name].to_mask(pruned[name]).to(module.weight.device)
        _hold(module, mask)
        masks[name] = mask
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Hold the given ``{layer name: keep mask}`` on ``model`` as :func:`prune_` does (zeroing pruned weights).

    Use it to restore masks before ``load_state_dict`` (see :func:`masks_from_state_dict`) or to hold masks
    computed elsewhere.
    """
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules.get(name)
        if not isinstance(module, LAYER_TYPES):
            raise ValueError(f"masks names {name!r}, which is not a Linear/Conv layer of the model")
        if not isinstance(mask, torch.Tensor) or mask.shape != module.weight.shape:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"masks[{name!r}] must have the weight's shape {tuple(module.weight.shape)}, got {got}")
        _hold(module, mask.to(device=module.weight.device, dtype=torch.bool))


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer name: keep mask}`` of the masks ``model`` holds now (the live buffers)."""
    return {name: held.mask for name, module in model.named_modules() if (held := _mask_module(module)) is not None}


def masks_from_state_dict(state_dict: dict) -> dict[str, torch.Tensor]:
    """The masks a pruned model's ``state_dict`` holds, as ``{layer name: mask}``.

    To load a pruned checkpoint into a freshly built model::

        apply_masks(model, masks_from_state_dict(sd)); model.load_state_dict(sd)
    """
    return {key[: -len(_MASK_KEY)].rstrip("."): value.bool() for key, value in state_dict.items()
            if key.endswith(_MASK_KEY)}


@torch.no_grad()
def remove_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Finalise: each masked weight becomes a plain Parameter holding the masked values (same Parameter object,
    so optimizers keep working). Returns the masks that were removed."""
    removed = {}
    for name, module in model.named_modules():
        held = _mask_module(module)
        if held is not None:
            removed[name] = held.mask
            # torch deletes the weight property from the module's injected class, which copy.deepcopy shares
            # between the original and the copy: removing from one would break the other. Give it its own first.
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return removed


def mask_sparsity(model: nn.Module) -> float:
    """Fraction of the masked layers' weight entries that are pruned (0.0 when no mask is held)."""
    masks = get_masks(model).values()
    total = sum(m.numel() for m in masks)
    return sum(int((~m).sum()) for m in masks) / total if total else 0.0
