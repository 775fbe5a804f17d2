"""Importance criteria beyond magnitude, measured on calibration batches; feed them to ``prune_(importance=...)``.

Both return entry-wise scores of each weight's shape, so every pattern (unstructured, block, N:M, channel) and
both norms group them exactly as they group ``|weight|``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .batches import calibration_input, call_model, input_rows
from .mask_holding import LAYER_TYPES

__all__ = ["taylor_scores", "wanda_scores"]


def _layers(model: nn.Module, names, types) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    if names is None:
        return {n: m for n, m in modules.items() if isinstance(m, types)}
    layers = {}
    for name in names:
        if not isinstance(modules.get(name), types):
            kinds = "/".join(t.__name__ for t in types)
            # A name that is not such a layer is a wrong value (names are strings, as expected), not a wrong type.
            raise ValueError(f"names holds {name!r}, which is not one of the model's {kinds} layers")  # noqa: TRY004
        layers[name] = modules[name]
    return layers


def taylor_scores(model: nn.Module, batches, loss_fn, *, names=None) -> dict[str, torch.Tensor]:
    """First-order Taylor importance ``|w * dL/dw|`` (Molchanov et al. 2019), averaged over ``batches``.

    It estimates how much the loss changes when an entry is zeroed. The per-batch values are averaged after the
    absolute value, so gradients of opposite sign across batches do not cancel. Runs in eval mode and does not
    touch the parameters' ``.grad``.

    Args:
        batches: iterable of ``(input, target)``; ``loss_fn(model(input), target)`` must return a scalar. The
            input may be a tensor, a tuple of positional inputs or a dict of keyword inputs (a tokenizer's
            output): see :func:`pysparse.prune.batches.call_model`.
        names: layer names to score (default: every Linear/Conv layer).
    """
    layers = _layers(model, names, LAYER_TYPES)
    totals = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in layers.items()}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for inputs, targets in batches:
            # cached(): the forward reads the very masked-weight tensors we differentiate with respect to.
            with parametrize.cached():
                weights = [m.weight for m in layers.values()]
                loss = loss_fn(call_model(model, inputs), targets)
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for (name, total), w, g in zip(totals.items(), weights, grads):
                if g is not None:
                    total += (w.detach() * g).abs().float()
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("batches yielded no batch")
    return {n: t / count for n, t in totals.items()}


_WANDA_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _input_sumsq(module: nn.Module, x: torch.Tensor, batch) -> torch.Tensor:
    """Sum of squares of each weight column's input over all (real, not padding) tokens / positions:
    ``[groups, in_cols]``."""
    x = x.detach().float()
    if isinstance(module, nn.Linear):
        return input_rows(x, batch).pow(2).sum(0)[None]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if isinstance(module, nn.Conv1d):  # as a 2-D convolution of height 1
        x, kernel, dilation, stride = x.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)   # [B, C*kh*kw, L], channel-major like the weight
    return cols.pow(2).sum(dim=(0, 2)).reshape(module.groups, -1)


def wanda_scores(model: nn.Module, batches, *, names=None) -> dict[str, torch.Tensor]:
    """Activation-aware importance ``|w_ij| * ||x_j||_2`` (Wanda, Sun et al. 2023) from calibration ``batches``.

    ``||x_j||`` is the norm of input column j over every token (Linear; padding is left out where a dict batch has
    an ``attention_mask``) or every sliding-window position (Conv, via unfold: memory grows with the batch's
    unfolded size, so keep calibration batches small). Runs the model forward only, in eval mode.

    Args:
        batches: iterable of inputs (tensors, or dicts of keyword inputs such as a tokenizer's output), or of
            tuples whose first element is the input (see :func:`pysparse.prune.batches.calibration_input`).
        names: layer names to score (default: every Linear, Conv1d and Conv2d layer).
    """
    layers = _layers(model, names, _WANDA_TYPES)
    sums: dict[str, torch.Tensor] = {}
    current = {}   # the batch being run, whose attention mask (if any) tells padding apart

    def hook_for(name):
        def hook(module, args):
            s = _input_sumsq(module, args[0], current.get("batch"))
            sums[name] = sums[name] + s if name in sums else s
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                current["batch"] = calibration_input(batch)
                call_model(model, current["batch"])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    scores = {}
    for name, module in layers.items():
        if name not in sums:
            raise ValueError(f"layer {name!r} saw no input during calibration (no batch, or not on the forward path)")
        w = module.weight.detach()
        rows = w.shape[0]
        norms = sums[name].sqrt()                                   # [groups, in_cols]
        per_row = norms[torch.arange(rows, device=w.device) // (rows // norms.shape[0])]
        scores[name] = (w.reshape(rows, -1).abs().float() * per_row).reshape(w.shape)
    return scores
