"""How a batch reaches a model: tensors, tuples and transformers-style dicts of keyword inputs.

Calibration (Wanda, Taylor, SparseGPT) and recovery (fine-tune, distill) all take batches in any of three forms,
and all of them call the model the same way, through :func:`call_model`:

- a tensor ``x``: ``model(x)``;
- a tuple or list: ``model(*batch)`` for distillation; ``fine_tune`` and ``taylor_scores`` read ``(input, target)``,
  and activation-only calibration (Wanda, SparseGPT) takes the first element as the input
  (:func:`calibration_input`), so the ``(input, target)`` batches of a labelled ``DataLoader`` calibrate as they are;
- a dict (``tokenizer(...)`` output, a ``BatchEncoding``): ``model(**batch)``.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["batch_size", "calibration_input", "call_model", "floats_as", "input_rows", "mean_over_positions",
           "real_positions", "to_device"]


def call_model(model: nn.Module, batch, **kwargs):
    """``model`` applied to ``batch``: ``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list,
    ``model(batch)`` otherwise; ``kwargs`` (e.g. ``output_hidden_states=True``) are passed as well."""
    if isinstance(batch, Mapping):
        return model(**batch, **kwargs)
    if isinstance(batch, (tuple, list)):
        return model(*batch, **kwargs)
    return model(batch, **kwargs)


def calibration_input(batch):
    """The input of a calibration ``batch``: the first element of a tuple or list (an ``(input, target)`` pair;
    the input itself may be a tensor, tuple or dict), else the batch itself. Call it with :func:`call_model`."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def real_positions(batch, x: torch.Tensor) -> torch.Tensor | None:
    """The ``[B, T]`` boolean mask of the real (not padding) positions of ``x`` ``[B, T, D]``: a dict ``batch``'s
    ``attention_mask`` != 0 when it has ``x``'s leading shape; None when the batch has none that fits."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and x.dim() == 3 and x.shape[:2] == mask.shape:
        return mask.to(x.device) != 0
    return None


def input_rows(x: torch.Tensor, batch) -> torch.Tensor:
    """A layer's input ``x`` ``[..., K]`` as rows ``[R, K]``, leaving out padding (:func:`real_positions`), so
    calibration statistics do not depend on how much a batch was padded."""
    real = real_positions(batch, x)
    return x.reshape(-1, x.shape[-1]) if real is None else x[real]


def mean_over_positions(x: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[B, ..., D]`` averaged over its middle dimensions: ``[B, D]`` (a sentence embedding from token
    states); with ``real`` (``[B, T]``, :func:`real_positions`), over the real positions only."""
    if x.dim() <= 2:
        return x
    if real is None:
        return x.flatten(1, -2).mean(1)
    weights = real.unsqueeze(-1).to(x.dtype)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1)


def batch_size(batch) -> int:
    """The leading size of the first tensor in ``batch`` (0 when it holds none)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for value in values:
        size = batch_size(value)
        if size:
            return size
    return 0


def _map_tensors(batch, fn):
    """``batch`` (a tensor, or mappings / tuples / lists of them) with ``fn`` applied to every tensor in it."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: _map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map_tensors(v, fn) for v in batch)
    return batch


def to_device(batch, device):
    """``batch`` with every tensor in it moved to ``device`` (same structure)."""
    return _map_tensors(batch, lambda t: t.to(device))


def floats_as(batch, dtype: torch.dtype):
    """``batch`` with its floating-point tensors converted to ``dtype`` (integer ones, such as token ids, kept)."""
    return _map_tensors(batch, lambda t: t.to(dtype) if t.is_floating_point() else t)
