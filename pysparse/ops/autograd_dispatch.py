"""When a call of a pysparse op can step below the autograd layer.

The ops' backward formulas are registered from Python (``torch.library.register_autograd``), so a call that wants
no graph still enters Python once more to find that out unless it is made below the autograd dispatch key.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad

__all__ = ["call", "wants_grad"]


def wants_grad(*args) -> bool:
    """Whether autograd must see this call (a backward graph is wanted). Dual tensors of forward-mode AD are
    refused: no op here has a jvp formula, and torch would return the result without its tangent."""
    if _forward_ad._current_level >= 0 and any(
            isinstance(a, torch.Tensor) and _forward_ad.unpack_dual(a).tangent is not None for a in args):
        raise NotImplementedError("pysparse ops have no forward-mode AD (jvp) formula: a dual tensor was passed")
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def call(op, *args):
    """``op(*args)``, below the autograd layer when no argument needs a gradient.

    The backward of these ops is registered from Python (``torch.library.register_autograd``), so every call,
    even under ``no_grad``, used to enter Python once more to find out no graph is wanted: ~10-25 us per call,
    as much as the whole kernel at batch 1. Under ``torch.compile`` the plain call is traced (no per-call cost).
    """
    if torch.compiler.is_compiling() or wants_grad(*args):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
