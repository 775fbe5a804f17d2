"""A model's exact-GELU modules run by pysparse's GELU (:func:`pysparse.ops.gelu`) for a while, restored after.

``distill`` uses it on the teacher and the student: a transformers encoder's ``GELUActivation`` (``F.gelu``) and
``nn.GELU()`` take 3-4 ms a call on MiniLM's 16 x 128 tokens (2 threads), pysparse's vectorised pass about 1 ms
forward and half of torch's backward, the same values within 4e-7 (its rational erf). Layers that already apply
GELU in their kernel (``sparsify(fuse_activations=True)``) have no module left to swap.

Only modules that compute exactly ``F.gelu`` are swapped (:func:`~.activation_fusion.activation_name`: no tanh
approximation, no forward hooks, no overridden forward); the swapped-in module has no parameters or buffers, so
``state_dict`` and checkpoints written meanwhile are the model's own.
"""
from __future__ import annotations

import contextlib

from torch import nn

from ..ops.gelu import gelu
from .activation_fusion import activation_name

__all__ = ["pysparse_gelu_while"]


class _PysparseGELU(nn.Module):
    """``F.gelu`` (exact) by pysparse's kernel for float32 CPU tensors, differentiable; ``F.gelu`` otherwise."""

    def forward(self, input):
        return gelu(input)


@contextlib.contextmanager
def pysparse_gelu_while(model: nn.Module):
    """Inside the block, ``model``'s exact-GELU modules are pysparse's; the model's own modules are put back on
    return (on error too). Yields the number of modules swapped."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sites = [(parent, slot, child) for parent in model.modules() for slot, child in parent._modules.items()
             if child is not None and activation_name(child) == "gelu"]
    for parent, slot, _ in sites:
        parent._modules[slot] = _PysparseGELU()
    try:
        yield len(sites)
    finally:
        for parent, slot, child in reversed(sites):
            parent._modules[slot] = child
