"""What the op wrappers and the layers of ``pysparse.nn`` share: when a call can step below the autograd layer
(``call`` and ``wants_grad``, from :mod:`.autograd_dispatch`), the epilogue the CPU kernels fuse (activation and
residual) with its torch equivalent, and argument checks.

Internal: the names are public within pysparse (``nn`` imports them), not part of the user-facing API.
"""
from __future__ import annotations

import numbers
import weakref

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from .autograd_dispatch import call, wants_grad
from .gelu import gelu

__all__ = ["ACTIVATIONS", "LayoutCache", "bsr_int32_indices", "call", "check_activation", "check_count",
           "check_residual", "conv_output_length", "epilogue_autograd", "fake_with_residual", "fits_output",
           "only_bias_wants_grad", "torch_epilogue", "train_epilogue", "wants_grad"]

# Activations the kernels can fuse: name -> the torch function it equals (exact GELU, not the tanh form).
ACTIVATIONS = {"relu": torch.nn.functional.relu, "relu6": torch.nn.functional.relu6, "gelu": torch.nn.functional.gelu}


class LayoutCache:
    """What a backward derives from a weight's two index tensors (a column index, a transposed layout), built once
    per layout. Keyed weakly on the index tensors a layer holds as buffers: an entry lives as long as the layout and
    is rebuilt when either tensor is written in place (its version changes) or replaced. Under ``torch.compile``, and
    for tensor subclasses (fake tensors), ``build`` is called every time instead (it is traced)."""

    def __init__(self, build):
        self._build = build
        self._entries = WeakTensorKeyDictionary()  # first -> (weakref to second, key, result)

    def __call__(self, first: torch.Tensor, second: torch.Tensor, *sizes):
        plain = type(first) is torch.Tensor and type(second) is torch.Tensor
        if not plain or torch.compiler.is_compiling():
            return self._build(first, second, *sizes)
        key = (first._version, second._version, *sizes)
        hit = self._entries.get(first)
        if hit is not None and hit[0]() is second and hit[1] == key:
            return hit[2]
        result = self._build(first, second, *sizes)
        self._entries[first] = (weakref.ref(second), key, result)
        return result


def only_bias_wants_grad(bias, *others) -> bool:
    """Whether ``bias`` is the one argument autograd must see (a frozen layer, whose bias is still a Parameter,
    called without no_grad): then the op runs without it and torch adds it, so autograd records one add instead of
    the op's Python autograd (~60 us a call, more than the kernel at batch 1). Same numbers: the kernels add the
    bias last, in float32, as that add does."""
    return bias is not None and torch.is_grad_enabled() and bias.requires_grad and not wants_grad(*others)


def check_activation(activation) -> None:
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {sorted(ACTIVATIONS)}, got {activation!r}")


def check_count(name: str, value) -> int:
    """``value`` as an int >= 0 (a layer's number of outputs), or a TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value if isinstance(value, torch.SymInt) else int(value)


def check_residual(residual) -> None:
    if residual is not None and not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")


def torch_epilogue(y: torch.Tensor, activation: str | None, residual: torch.Tensor | None) -> torch.Tensor:
    """``activation(y + residual)`` in torch (either optional): what the CPU kernels' epilogue computes, for the
    paths that cannot fuse it (gradients, CUDA, a residual that broadcasts or promotes)."""
    if residual is not None:
        try:
            torch.broadcast_shapes(y.shape, residual.shape)
        except RuntimeError:  # named here, not as torch's "size of tensor a must match"
            raise ValueError(f"residual must broadcast with the output's shape {tuple(y.shape)}, got "
                             f"{tuple(residual.shape)}") from None
        y = y + residual
    return y if activation is None else ACTIVATIONS[activation](y)


# The gradient through an activation from its saved output y, by torch's own backward kernels (one vectorised pass):
# ReLU's reads y as torch's does; ReLU6's passes where 0 < y < 6, which is where 0 < z < 6 (y = min(max(z, 0), 6)
# lies strictly inside exactly where z does). GELU's derivative needs the pre-activation.
_OUTPUT_DERIVATIVES = {"relu": lambda grad, y: torch.ops.aten.threshold_backward(grad, y, 0),
                       "relu6": lambda grad, y: torch.ops.aten.hardtanh_backward(grad, y, 0.0, 6.0)}
# What applies the other activations after the op in training: GELU saves its pre-activation (the op's output).
_AFTER_THE_OP = {"gelu": gelu}


def train_epilogue(op, *args, activation: str | None, residual: torch.Tensor | None) -> torch.Tensor:
    """``activation(op(*args, activation, residual))`` for a call that wants gradients: ``op`` (an ``_act`` op whose
    backward :func:`epilogue_autograd` registered) adds the residual and applies ReLU / ReLU6 in its stores, as it
    does without gradients; GELU, whose derivative needs the pre-activation, runs after the op (which stores that
    pre-activation) in pysparse's vectorised pass (:func:`pysparse.ops.gelu.gelu`), which saves it for the backward."""
    fused = activation if activation in _OUTPUT_DERIVATIVES else None
    y = op(*args, fused, residual)
    return y if fused == activation else _AFTER_THE_OP[activation](y)


def epilogue_autograd(setup_context, backward):
    """``(setup_context, backward)`` for the ``_act`` variant of a linear op (its arguments, then ``activation`` and
    ``residual``) from the linear op's own pair: the gradient of the epilogue, then the linear's backward with it.

    ``setup_context(ctx, inputs, output, *extra)`` of the linear must save its tensors followed by ``extra`` and its
    ``backward`` read only the ones it saved first. The activation's derivative comes from the saved output (no
    pre-activation kept); the residual's gradient is the pre-activation's (the op adds it only when it has the
    output's exact shape and dtype)."""

    def act_setup_context(ctx, inputs, output):
        *linear_inputs, activation, _residual = inputs
        ctx.activation = activation
        keep = output if activation in _OUTPUT_DERIVATIVES else None
        setup_context(ctx, tuple(linear_inputs), output, keep)

    def act_backward(ctx, grad):
        # Refused here, not in setup_context: tracing (torch.export, AOTInductor) sets up contexts it never runs.
        if ctx.activation is not None and ctx.activation not in _OUTPUT_DERIVATIVES:
            raise NotImplementedError(f"the backward of a fused {ctx.activation!r} epilogue needs the "
                                      "pre-activation: call the op with activation=None and apply the activation "
                                      "after it")
        y = ctx.saved_tensors[-1]
        if y is not None:
            grad = _OUTPUT_DERIVATIVES[ctx.activation](grad, y)
        return (*backward(ctx, grad), None, grad if ctx.needs_input_grad[-1] else None)

    return act_setup_context, act_backward


def fits_output(residual: torch.Tensor, shape, like: torch.Tensor) -> bool:
    """Whether a kernel can add ``residual`` itself: exactly the output's ``shape`` and ``like``'s dtype and
    device (anything else is added by torch, with its broadcasting and type promotion)."""
    return residual.shape == tuple(shape) and residual.dtype == like.dtype and residual.device == like.device


def fake_with_residual(y: torch.Tensor, residual) -> torch.Tensor:
    """``y`` (a fake op's output), after the check the op makes of its residual's shape."""
    torch._check(residual is None or residual.shape == y.shape,
                 lambda: f"residual must have the output's shape {tuple(y.shape)}, got {tuple(residual.shape)}")
    return y


def _to_int32_indices(name: str, t: torch.Tensor, limit: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.int32:
        return t
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > limit):
        raise ValueError(f"{name} has entries outside [0, {limit}]: min {int(t.min())}, max {int(t.max())}")
    return t.to(torch.int32)


def bsr_int32_indices(values: torch.Tensor, crow_indices, col_indices) -> tuple[torch.Tensor, torch.Tensor]:
    """``(crow, col)`` as the BSR kernels take them: int32, range-checked when they come as int64."""
    if (isinstance(crow_indices, torch.Tensor) and isinstance(col_indices, torch.Tensor)
            and crow_indices.dtype == col_indices.dtype == torch.int32):
        return crow_indices, col_indices  # what layers and formats pass: nothing to convert or range-check
    limit = max(int(values.shape[0]) if values.dim() else 0, 2**31 - 1)
    return (_to_int32_indices("crow_indices", crow_indices, limit),
            _to_int32_indices("col_indices", col_indices, limit))


def conv_output_length(size, k, s, d):
    """Output length of a convolution over ``size`` (padding included) with kernel k, stride s, dilation d."""
    return (size - d * (k - 1) - 1) // s + 1
