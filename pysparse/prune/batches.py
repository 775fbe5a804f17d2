"""How a batch reaches a model: tensors, tuples and transformers-style dicts of keyword inputs.

Calibration (Wanda, Taylor, SparseGPT) and recovery (fine-tune, distill) all take batches in any of three forms,
and all of them call the model the same way, through :func:`call_model`:

- a tensor ``x``: ``model(x)``;
- a tuple or list: ``model(*batch)`` for calibration and distillation; ``fine_tune`` reads ``(input, target)``;
- a dict (``tokenizer(...)`` output, a ``BatchEncoding``): ``model(**batch)``.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["call_model", "batch_size", "to_device"]


def call_model(model: nn.Module, batch):
    """``model`` applied to ``batch``: ``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list,
    ``model(batch)`` otherwise."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


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


def to_device(batch, device):
    """``batch`` with every tensor in it moved to ``device`` (same structure)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
